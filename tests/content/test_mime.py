"""The fast MIME reader builds exactly the tree the email package builds, or declines."""

from email import message_from_bytes
from email.message import Message

from twisted.trial import unittest

from mailgw.content import message as message_module
from mailgw.content.message import _POLICY, parse_message
from mailgw.content.mime import read_message


def _tree(message: Message):
    """Everything the content layer reads of a parsed message."""
    payload = message.get_payload()
    if message.is_multipart():
        payload = [_tree(part) for part in payload]
    return message.items(), payload


ALTERNATIVE = (
    b"From: =?utf-8?q?Ana_P=C3=A9rez?= <ana@example.org>\r\n"
    b"To: <bo@example.net>\r\n"
    b"Subject: Folded\r\n  subject line\r\n\twith a tab\r\n"
    b"X-Custom:   value with leading blanks\r\n"
    b"X-Empty:\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative;\r\n boundary="=_b 1"\r\n'
    b"\r\n"
    b"This is the preamble.\r\n"
    b"--=_b 1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Caf=C3=A9 con leche\r\n"
    b"--=_b 1 \t\r\n"
    b"Content-Type: text/html; charset=\"iso-8859-1\"\r\n"
    b"\r\n"
    b"<p>Caf\xe9</p>\r\n"
    b"\r\n"
    b"--=_b 1--\r\n"
    b"epilogue\r\n")

MIXED_WITH_ATTACHMENT = (
    b"From: a@example.org\n"
    b"Subject: Report\n"
    b"Content-Type: multipart/mixed; boundary=XyZ\n"
    b"\n"
    b"--XyZ\n"
    b"Content-Type: text/html\n"
    b"\n"
    b"<p>See attached</p>\n"
    b"--XyZ\n"
    b"Content-Type: application/pdf; name=report.pdf\n"
    b"Content-Disposition: attachment; filename=\"report.pdf\"\n"
    b"Content-Transfer-Encoding: base64\n"
    b"\n"
    b"JVBERi0xLjQK\n"
    b"--XyZ--")

SINGLE_PART = (
    b"From: a@example.org\r\nSubject: Plain\r\n\r\nHello\r\n\r\n.. a line with a dot\r\n")

NO_HEADERS = b"\r\nJust a body\r\n"

PART_WITHOUT_HEADERS = (
    b"From: a@example.org\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n"
    b"--b\r\n\r\nno headers here\r\n--b\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--b--\r\n")

# What the fast reader leaves to the email package.
DECLINED = {
    "bare CR": b"Subject: x\r\n\r\nline\rother\r\n",
    "mbox From_ line": b"From someone Sat Nov 28\r\nSubject: x\r\n\r\nbody\r\n",
    "a line that is no header": b"Subject: x\r\nnot a header\r\n\r\nbody\r\n",
    "first line a continuation": b" folded\r\nSubject: x\r\n\r\nbody\r\n",
    "headers only": b"Subject: x\r\n",
    "no boundary": b"Content-Type: multipart/mixed\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n",
    "no closing boundary": (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
                            b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n"),
    "repeated boundaries": (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
                            b"--b\r\n--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--\r\n"),
    "nested multipart": (b"Content-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\n"
                         b"Content-Type: multipart/alternative; boundary=i\r\n\r\n"
                         b"--i\r\nContent-Type: text/plain\r\n\r\nx\r\n--i--\r\n--o--\r\n"),
    "attached message": (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                         b"Content-Type: message/rfc822\r\n\r\nSubject: in\r\n\r\nx\r\n"
                         b"--b--\r\n"),
    "empty part body": (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                        b"Content-Type: text/plain\r\n\r\n--b--\r\n"),
}


class ReadMessageTests(unittest.TestCase):
    def assertSameTree(self, raw: bytes) -> None:
        fast = read_message(raw, _POLICY)
        self.assertIsNotNone(fast, "the fast reader declined a well-formed message")
        self.assertEqual(_tree(fast), _tree(message_from_bytes(raw, policy=_POLICY)))

    def test_multipart_alternative_with_folding_8bit_and_blanks(self):
        self.assertSameTree(ALTERNATIVE)

    def test_multipart_mixed_with_lf_line_ends_and_no_final_newline(self):
        self.assertSameTree(MIXED_WITH_ATTACHMENT)

    def test_single_part(self):
        self.assertSameTree(SINGLE_PART)

    def test_no_headers(self):
        self.assertSameTree(NO_HEADERS)

    def test_part_without_headers(self):
        self.assertSameTree(PART_WITHOUT_HEADERS)

    def test_declines_what_the_email_package_reads_its_own_way(self):
        for case, raw in DECLINED.items():
            self.assertIsNone(read_message(raw, _POLICY), case)

    def test_parse_message_reads_declined_messages_all_the_same(self):
        self.assertEqual(parse_message(DECLINED["nested multipart"]).text, "x")
        self.assertEqual(parse_message(DECLINED["bare CR"]).text, "line\rother\n")

    def test_parse_message_gives_the_same_result_either_way(self):
        samples = (ALTERNATIVE, MIXED_WITH_ATTACHMENT, SINGLE_PART, PART_WITHOUT_HEADERS)
        fast = [parse_message(raw) for raw in samples]
        self.patch(message_module, "read_message", lambda raw, policy: None)
        self.assertEqual(fast, [parse_message(raw) for raw in samples])
