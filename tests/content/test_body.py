"""The stored body of a message: its JSON form, written by submission, read by delivery."""

import json

from twisted.trial import unittest

from mailgw.content.body import StoredBody
from mailgw.content.message import Attachment, MessageOptions, ParsedMessage

LOGO = Attachment("logo.png", "image/png", b"\x89PNG\x00\xff", "logo@x", True)
INVOICE = Attachment("factura ñ.pdf", "application/pdf", b"%PDF", None, False)
CONTENT = ParsedMessage(
    subject="Oferta", from_address="news@example.org", from_name="Tienda", reply_to=[],
    text="Hola", html='<img src="cid:logo@x">', attachments=(LOGO, INVOICE),
    options=MessageOptions(), custom_headers={}, headers=(("X-Campaign", "spring"),))


class StoredBodyTests(unittest.TestCase):
    def test_json_keys_are_those_of_stored_messages(self):
        """Messages already queued were stored with exactly these keys."""
        self.assertEqual(StoredBody.of(CONTENT).to_json(), {
            "subject": "Oferta",
            "from_name": "Tienda",
            "html": '<img src="cid:logo@x">',
            "text": "Hola",
            "headers": [["X-Campaign", "spring"]],
            "attachments": [
                {"filename": "logo.png", "content_type": "image/png", "content_id": "logo@x",
                 "inline": True, "data": "iVBORwD/"},
                {"filename": "factura ñ.pdf", "content_type": "application/pdf",
                 "content_id": None, "inline": False, "data": "JVBERg=="},
            ],
        })

    def test_round_trip_through_the_database_form(self):
        body = StoredBody.of(CONTENT)
        stored = json.loads(json.dumps(body.to_json(), separators=(",", ":")))
        self.assertEqual(StoredBody.from_json(stored), body)

    def test_missing_and_null_keys_read_as_defaults(self):
        empty = StoredBody("", None, None, None, (), ())
        self.assertEqual(StoredBody.from_json({}), empty)
        self.assertEqual(StoredBody.from_json(
            {"subject": None, "from_name": None, "html": None, "text": None,
             "headers": None, "attachments": None}), empty)
        self.assertEqual(StoredBody.from_json({"attachments": [{}]}).attachments,
                         (Attachment("", "", b"", None, False),))
