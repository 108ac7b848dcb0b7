"""Parsing submitted messages, the S-8 content policy and S-10 template input."""

import contextlib
import random
from dataclasses import replace
from email.utils import getaddresses

from twisted.trial import unittest

from mailgw.accounts.settings import AccountSettings
from mailgw.content.message import (
    _SIMPLE_ADDRESS,
    Attachment,
    ContentPolicy,
    ContentRefused,
    MessageOptions,
    _parse_addresses,
    append_attachment_links,
    apply_policy,
    parse_message,
    replace_cid_references,
    split_template_tag,
    template_variables,
)
from tests.child import assert_finishes

# The conversation of Teenvio's SMTP-API document, section 3.2.2, lines 022-069.
TEENVIO_SAMPLE = b"\r\n".join([
    b"Message-ID: <5231AC96.9010208@dominio.com>",
    b"Date: Thu, 12 Sep 2013 13:59:18 +0200",
    b"From: =?ISO-8859-1?Q?=22V=EDctor J=2E Chamorro=22?= <victor@dominio.com>",
    b"X-Teenvio-SocialLinks: yes",
    b"User-Agent: Mozilla/5.0 (X11; Linux x86 64; rv:10.0.12) Gecko/20130116",
    b" Thunderbird/10",
    b"MIME-Version: 1.0",
    b"To: usuario@dominio.com",
    b"Subject: prueba correo simple",
    b"Content-Type: multipart/alternative;",
    b' boundary="-----050004090406000109090608"',
    b"",
    b"This is a multi-part message in MIME format.",
    b"-------050004090406000109090608",
    b"Content-Type: text/plain; charset=ISO-8859-1; format=flowed",
    b"Content-Transfer-Encoding: 8bit",
    b"",
    b"Buenas,",
    b"",
    b"Esto es un email *html* para probar el servidor smtp-api de teenvio",
    b"Un saludo,",
    b"",
    b"_Victor J. Chamorro_ - teenvio.com",
    b"",
    b"",
    b"-------050004090406000109090608",
    b"Content-Type: text/html; charset=ISO-8859-1",
    b"Content-Transfer-Encoding: 7bit",
    b"",
    b"<html>",
    b"<head>",
    b'<meta http-equiv="content-type" content="text/html; charset=ISO-8859-1">',
    b"</head>",
    b'<body bgcolor="#FFFFFF" text="#000000">',
    b"Buenas,<br>",
    b"Esto es un email <b>html</b> para probar el servidor smtp-api de teenvio<br>",
    b"<u>V&iacute;ctor J. Chamorro</u> - teenvio.com<br>",
    b"</body>",
    b"</html>",
    b"",
    b"-------050004090406000109090608--",
    b"",
])


def message(*headers: bytes, body: bytes = b"Hola") -> bytes:
    """The given headers and body, with a From, Subject and Content-Type unless given."""
    lines = list(headers)
    for default in (b"From: a@example.com", b"Subject: s",
                    b"Content-Type: text/plain; charset=utf-8"):
        name = default.partition(b":")[0].lower() + b":"
        if not any(header.lower().startswith(name) for header in headers):
            lines.append(default)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def multipart(subtype: bytes, *parts: bytes, boundary: bytes = b"b0") -> bytes:
    """A multipart body built from parts given as 'headers\\r\\n\\r\\nbody'."""
    delimited = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
    return b"Content-Type: multipart/%s; boundary=\"%s\"\r\n\r\n%s--%s--\r\n" % (
        subtype, boundary, delimited, boundary)


def top(body: bytes, *headers: bytes) -> bytes:
    """A whole message whose top-level part is body (which starts with its Content-Type)."""
    return b"\r\n".join([b"From: a@example.com", b"Subject: s", *headers]) + b"\r\n" + body


TEXT = b"Content-Type: text/plain; charset=utf-8\r\n\r\nplain body"
HTML = b"Content-Type: text/html; charset=utf-8\r\n\r\n<p>html body</p>"
PDF = (b'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename="Factura.PDF"'
       b"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=")
LOGO = (b"Content-Type: image/png\r\nContent-ID: <logo@x>\r\nContent-Disposition: inline\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\niVBORw==")


def parsed(text="t", html="<p>h</p>", attachments=()):
    """A ParsedMessage for policy tests, without going through MIME."""
    base = parse_message(message())
    return replace(base, text=text, html=html, attachments=tuple(attachments))


def attachment(filename, content_type="application/pdf", inline=False, content_id=None):
    return Attachment(filename, content_type, b"data", content_id, inline)


class TeenvioSampleTests(unittest.TestCase):
    def setUp(self):
        self.message = parse_message(TEENVIO_SAMPLE)

    def test_subject_and_sender(self):
        self.assertEqual(self.message.subject, "prueba correo simple")
        self.assertEqual(self.message.from_address, "victor@dominio.com")
        self.assertEqual(self.message.from_name, "Víctor J. Chamorro")

    def test_bodies(self):
        self.assertIn("Buenas,", self.message.text)
        self.assertNotIn("\r", self.message.text)
        self.assertIn("<b>html</b>", self.message.html)
        self.assertIn("V&iacute;ctor", self.message.html)
        self.assertEqual(self.message.attachments, ())

    def test_control_header_read_and_removed(self):
        self.assertEqual(self.message.options, MessageOptions(social_links=True))
        names = [name.lower() for name, _ in self.message.headers]
        self.assertNotIn("x-teenvio-sociallinks", names)
        self.assertEqual(self.message.custom_headers, {})

    def test_headers_kept_for_delivery(self):
        self.assertEqual(self.message.headers, (
            ("Message-ID", "<5231AC96.9010208@dominio.com>"),
            ("Date", "Thu, 12 Sep 2013 13:59:18 +0200"),
            ("To", "usuario@dominio.com")))

    def test_generated_text_decodes_entities(self):
        generated = apply_policy(replace(self.message, text=None), ContentPolicy())
        self.assertIn("Víctor J. Chamorro", generated.text)
        self.assertIn("**html**", generated.text)


class CharsetTests(unittest.TestCase):
    def body(self, content_type: bytes, data: bytes, *headers: bytes) -> str:
        return parse_message(message(b"Content-Type: " + content_type, *headers, body=data)).text

    def test_declared_latin1(self):
        self.assertEqual(self.body(b"text/plain; charset=ISO-8859-1", b"V\xedctor"), "Víctor")

    def test_latin1_label_read_as_windows_1252(self):
        self.assertEqual(self.body(b"text/plain; charset=iso-8859-1", b"\x93hola\x94 5\x80"),
                         "\u201chola\u201d 5\u20ac")

    def test_koi8r(self):
        self.assertEqual(self.body(b"text/plain; charset=koi8-r", "Привет".encode("koi8-r")),
                         "Привет")

    def test_undeclared_8bit_utf8(self):
        self.assertEqual(self.body(b"text/plain", "Víctor ñ".encode()), "Víctor ñ")

    def test_unknown_charset_falls_back_to_utf8_then_latin1(self):
        self.assertEqual(self.body(b"text/plain; charset=x-nonsense", "ñ".encode()), "ñ")
        self.assertEqual(self.body(b"text/plain; charset=x-nonsense", b"\xf1"), "ñ")

    def test_wrong_charset_falls_back(self):
        self.assertEqual(self.body(b"text/plain; charset=utf-8", b"caf\xe9"), "café")
        self.assertEqual(self.body(b"text/plain; charset=base64", b"caf\xe9"), "café")

    def test_transfer_encodings(self):
        self.assertEqual(self.body(b"text/plain; charset=utf-8", b"caf=C3=A9 =\r\nok",
                                   b"Content-Transfer-Encoding: quoted-printable"), "café ok")
        self.assertEqual(self.body(b"text/plain; charset=utf-8", b"Y2Fmw6k=",
                                   b"Content-Transfer-Encoding: base64"), "café")

    def test_no_lone_surrogates(self):
        """UTF-7 and the escape codecs decode to lone surrogates, which neither UTF-8 nor
        PostgreSQL can hold: such a decoding is a wrong charset, read as UTF-8. (Compared
        as ascii(), which a failure report can print.)"""
        self.assertEqual(self.body(b"text/plain; charset=utf-7", b"a +AOk-"), "a é")
        for charset, data in [(b"utf-7", b"a +2AA-"), (b"unicode-escape", b"\\ud800")]:
            self.assertEqual(ascii(self.body(b"text/plain; charset=" + charset, data)),
                             ascii(data.decode()))
        raw = message(b"Subject: =?utf-7?q?+2AA-?= =?unicode-escape?q?=5Cudc00?=")
        self.assertEqual(ascii(parse_message(raw).subject), ascii("+2AA-\\udc00"))

    def test_byte_order_mark_dropped(self):
        self.assertEqual(self.body(b"text/plain; charset=utf-8", b"\xef\xbb\xbfhi"), "hi")

    def test_single_part_html(self):
        result = parse_message(message(b"Content-Type: text/html", body=b"<p>hi</p>"))
        self.assertEqual((result.text, result.html), (None, "<p>hi</p>"))

    def test_blank_body_counts_as_missing(self):
        self.assertIsNone(parse_message(message(body=b"  \r\n")).text)


class HeaderDecodingTests(unittest.TestCase):
    def test_encoded_words_folded_and_joined(self):
        raw = message(b"Subject: =?utf-8?q?Hola_se=C3=B1or?=\r\n =?iso-8859-1?b?IOFiY2Q=?= fin")
        self.assertEqual(parse_message(raw).subject, "Hola señor ábcd fin")

    def test_plain_subject_unfolded(self):
        self.assertEqual(parse_message(message(b"Subject: one\r\n two")).subject, "one two")

    def test_8bit_subject(self):
        self.assertEqual(parse_message(message("Subject: Año ñ".encode())).subject, "Año ñ")
        self.assertEqual(parse_message(message(b"Subject: A\xf1o")).subject, "Año")

    def test_broken_encoded_words(self):
        for encoded, decoded in [(b"=?x-unknown?q?caf=E9?=", "café"),
                                 (b"a =?utf-8?b?Q?= b", "a =?utf-8?b?Q?= b"),
                                 (b"=?utf-8?q?one=0D=0ABcc:_x?=", "one Bcc: x")]:
            self.assertEqual(parse_message(message(b"Subject: " + encoded)).subject, decoded)

    def test_first_subject_wins_and_missing_subject_is_empty(self):
        self.assertEqual(parse_message(b"Subject: a\r\nSubject: b\r\n\r\nx").subject, "a")
        self.assertEqual(parse_message(b"\r\nx").subject, "")

    def test_addresses(self):
        raw = message(b"Reply-To: One <One@Example.COM>, two@Example.org",
                      b'From: "Doe, Jane" <Jane@EXAMPLE.com>')
        result = parse_message(raw)
        self.assertEqual(result.reply_to, ["One@example.com", "two@example.org"])
        self.assertEqual((result.from_name, result.from_address),
                         ("Doe, Jane", "Jane@example.com"))

    def test_missing_or_bad_from(self):
        self.assertIsNone(parse_message(b"Subject: x\r\n\r\nbody").from_address)
        result = parse_message(b"From: nobody\r\n\r\nbody")
        self.assertEqual((result.from_address, result.from_name), (None, None))

    def test_huge_header(self):
        result = parse_message(message(b"Subject: " + b"x" * 200_000))
        self.assertEqual(len(result.subject), 200_000)


class NulTests(unittest.TestCase):
    """PostgreSQL text and jsonb hold no NUL, nor do RFC 5322 headers and MIME text: a NUL
    in a header or a text body, raw or encoded, refuses the message, naming where; binary
    attachments keep theirs."""

    def assertRefused(self, raw: bytes, where: str) -> None:
        error = self.assertRaises(ContentRefused, parse_message, raw)
        self.assertEqual(str(error), f"message contains a NUL character in {where}")

    def test_in_headers_raw_and_encoded(self):
        for header, where in [
                (b"Subject: a\x00b", "the Subject header"),
                (b"Subject: =?utf-8?q?a=00b?=", "the Subject header"),
                (b"Subject: =?utf-8?b?YQBi?=", "the Subject header"),
                (b"Received: from x\x00", "the Received header"),
                (b"Cc: a\x00@example.com", "the Cc header"),
                (b"X-Order: =?utf-8?q?4=002?=", "the X-Order header"),
                (b"X-Mailgw-Category: =?utf-8?q?news=00?=", "the X-Mailgw-Category header"),
                (b"From: =?utf-8?q?Ana=00?= <a@example.com>", "the From header"),
                (b"Reply-To: =?utf-8?q?=00?= <b@example.com>", "the Reply-To header"),
                (b"Reply-To: b\x00@example.com", "the Reply-To header")]:
            self.assertRefused(message(header), where)
            self.assertRefused(message(header, b"X-Bare-CR: \r"), where)  # the email package

    def test_in_text_bodies_raw_and_encoded(self):
        for encoding, data in [(b"8bit", b"a\x00b"), (b"quoted-printable", b"a=00b"),
                               (b"base64", b"YQBi")]:
            for subtype in (b"plain", b"html"):
                self.assertRefused(
                    message(b"Content-Type: text/%s; charset=utf-8" % subtype,
                            b"Content-Transfer-Encoding: " + encoding, body=data),
                    f"the text/{subtype.decode()} part")
        self.assertRefused(top(multipart(b"alternative", TEXT, HTML + b"\x00")),
                           "the text/html part")

    def test_in_part_headers_and_file_names(self):
        for disposition, where in [
                (b"filename*=utf-8''a%00b.pdf", "the file name of an attachment"),
                (b'filename="=?utf-8?q?a=00b.pdf?="', "the file name of an attachment"),
                (b'filename="a\x00b.pdf"', "the Content-Disposition header of a MIME part")]:
            part = b"Content-Type: application/pdf\r\nContent-Disposition: attachment; "
            self.assertRefused(top(multipart(b"mixed", TEXT, part + disposition + b"\r\n\r\nx")),
                               where)
        self.assertRefused(top(multipart(b"related", HTML, LOGO.replace(b"<logo@x>", b"<\x00>"))),
                           "the Content-ID header of a MIME part")

    def test_binary_content_keeps_its_nuls(self):
        """Attachments are bytes: a file, a second text/plain, an attached message."""
        forwarded = b"Content-Type: message/rfc822\r\n\r\nSubject: a\x00\r\n\r\nb\x00"
        second = b"Content-Type: text/plain\r\nContent-Disposition: attachment\r\n\r\nc\x00"
        pdf = PDF.replace(b"JVBERi0=", b"JQBQAERG")
        result = parse_message(top(multipart(b"mixed", TEXT, pdf, second, forwarded)))
        self.assertEqual([a.data for a in result.attachments][:2], [b"%\x00P\x00DF", b"c\x00"])
        self.assertIn(b"Subject: a\x00", result.attachments[2].data)

    def test_in_a_dropped_alternative(self):
        """Another rendering (text/watch-html) is not kept, so its NUL is no matter."""
        watch = b"Content-Type: text/watch-html\r\n\r\n<p>\x00</p>"
        result = parse_message(top(multipart(b"alternative", TEXT, watch, HTML)))
        self.assertEqual((result.text, result.attachments), ("plain body", ()))


class ControlHeaderTests(unittest.TestCase):
    def options(self, *headers: bytes) -> MessageOptions:
        return parse_message(message(*headers)).options

    def test_defaults(self):
        """The language is the account's default unless the message names one."""
        self.assertEqual(self.options(), MessageOptions(True, False, None, True, True))

    def test_each_switch_under_both_names(self):
        cases = [(b"ShowCab: no", "show_cab", False), (b"SocialLinks: yes", "social_links", True),
                 (b"Language: 4", "language", 4), (b"TrackingOpening: no", "track_opens", False),
                 (b"TrackingClicks: no", "track_clicks", False)]
        for prefix in (b"X-Teenvio-", b"X-Mailgw-"):
            for header, field, expected in cases:
                options = self.options(prefix + header)
                self.assertEqual(getattr(options, field), expected, prefix + header)

    def test_names_and_values_case_insensitive(self):
        self.assertFalse(self.options(b"x-teenvio-showcab: NO").show_cab)
        self.assertTrue(self.options(b"X-MAILGW-SOCIALLINKS:  Yes ").social_links)

    def test_other_values_keep_the_default(self):
        """Teenvio (S-9): "no" switches a feature off and "yes" SocialLinks on; any other
        value leaves the default, and the message is accepted, the value noted for the
        log."""
        for value in (b"off", b"false", b"0", b"si", b"true", b"1", b"maybe", b""):
            result = parse_message(message(b"X-Teenvio-ShowCab: " + value,
                                           b"X-Teenvio-SocialLinks: " + value,
                                           b"X-Mailgw-TrackingOpening: " + value))
            self.assertEqual(result.options, MessageOptions(), value)
            self.assertEqual(len(result.notices), 3, value)
        result = parse_message(message(b"X-Teenvio-TrackingClicks: off"))
        self.assertEqual(result.notices, ("X-Teenvio-TrackingClicks: 'off' is not a value "
                                          "it takes; the default applies",))
        self.assertEqual(parse_message(message(b"X-Teenvio-ShowCab: no")).notices, ())

    def test_every_language(self):
        for language in (3, 4, 5, 6, 7, 8, 11, 13, 14, 15, 16, 17, 18):
            header = b"X-Teenvio-Language: %d" % language
            self.assertEqual(self.options(header).language, language)

    def test_unknown_language_is_the_default(self):
        """An unknown id is not refused (footer_texts.py: Spanish, unless the account
        has another default language)."""
        for value in (b"9", b"es", b"", b"\xd9\xa3"):
            result = parse_message(message(b"X-Teenvio-Language: " + value))
            self.assertIsNone(result.options.language, value)
            self.assertIn("X-Teenvio-Language: ", result.notices[0])

    def test_category(self):
        """D-6: the campaign category, as written (trimmed); kept out of the headers."""
        result = parse_message(message(b"X-Mailgw-Category:  Ofertas de primavera "))
        self.assertEqual(result.options.category, "Ofertas de primavera")
        self.assertEqual(result.headers, ())
        for value in (b"", b"x" * 65, b"a\x01b"):
            error = self.assertRaises(ContentRefused, parse_message,
                                      message(b"X-Mailgw-Category: " + value))
            self.assertIn("X-Mailgw-Category must be a category name of 1 to 64", str(error))

    def test_control_headers_never_kept(self):
        result = parse_message(message(b"X-Teenvio-ShowCab: no", b"X-Mailgw-TrackingClicks: no",
                                       b"X-Teenvio-Unknown: 1", b"X-Campaign: verano"))
        self.assertEqual(result.custom_headers, {"X-Campaign": "verano"})
        self.assertEqual(result.headers, (("X-Campaign", "verano"),))


class KeptHeaderTests(unittest.TestCase):
    def test_custom_headers_decoded_and_kept_as_written(self):
        result = parse_message(message(b"X-Tag: =?utf-8?q?ni=C3=B1o?=", b"x-order-ID: 42"))
        self.assertEqual(result.custom_headers, {"X-Tag": "niño", "x-order-ID": "42"})
        self.assertIn(("X-Tag", "=?utf-8?q?ni=C3=B1o?="), result.headers)

    def test_delivery_headers_only(self):
        result = parse_message(message(
            b"Received: from x", b"DKIM-Signature: v=1", b"Bcc: secret@example.com",
            b"MIME-Version: 1.0", b"In-Reply-To: <a@b>", b"List-Unsubscribe: <mailto:u@x>",
            b"Cc: c@example.com"))
        self.assertEqual(result.headers, (("In-Reply-To", "<a@b>"),
                                          ("List-Unsubscribe", "<mailto:u@x>"),
                                          ("Cc", "c@example.com")))


class StructureTests(unittest.TestCase):
    def test_mixed_alternative_with_attachment(self):
        raw = top(multipart(b"mixed", multipart(b"alternative", TEXT, HTML, boundary=b"b1"), PDF))
        result = parse_message(raw)
        self.assertEqual((result.text, result.html), ("plain body", "<p>html body</p>"))
        self.assertEqual(result.attachments, (
            Attachment("Factura.PDF", "application/pdf", b"%PDF-", None, False),))

    def test_related_inline_image(self):
        related = multipart(b"related", HTML, LOGO, boundary=b"b2")
        result = parse_message(top(multipart(b"alternative", TEXT, related)))
        self.assertEqual(result.html, "<p>html body</p>")
        [logo] = result.attachments
        self.assertEqual((logo.content_id, logo.inline, logo.filename),
                         ("logo@x", True, "attachment-1"))

    def test_image_attached_with_content_id_is_not_inline(self):
        image = LOGO.replace(b"inline", b'attachment; filename="logo.png"')
        [logo] = parse_message(top(multipart(b"mixed", HTML, image))).attachments
        self.assertEqual((logo.inline, logo.content_id, logo.filename),
                         (False, "logo@x", "logo.png"))

    def test_file_with_content_id_is_not_inline(self):
        exe = b"Content-Type: application/octet-stream\r\nContent-ID: <x@y>\r\n\r\nMZ"
        [part] = parse_message(top(multipart(b"related", HTML, exe))).attachments
        self.assertFalse(part.inline)

    def test_text_attachment_is_not_the_body(self):
        notes = b'Content-Type: text/plain\r\nContent-Disposition: attachment; filename="a.txt"'
        result = parse_message(top(multipart(b"mixed", HTML, notes + b"\r\n\r\nnotes")))
        self.assertIsNone(result.text)
        self.assertEqual(result.attachments[0].filename, "a.txt")

    def test_first_bodies_win_and_other_alternatives_dropped(self):
        watch = b"Content-Type: text/watch-html\r\n\r\n<b>watch</b>"
        second = b"Content-Type: text/plain\r\n\r\nsecond"
        result = parse_message(top(multipart(b"alternative", TEXT, second, watch, HTML)))
        self.assertEqual((result.text, result.html, result.attachments),
                         ("plain body", "<p>html body</p>", ()))

    def test_attached_message_is_an_attachment(self):
        forwarded = b"Content-Type: message/rfc822\r\n\r\nSubject: old\r\n\r\nold body"
        result = parse_message(top(multipart(b"mixed", TEXT, forwarded)))
        self.assertEqual(result.text, "plain body")
        [part] = result.attachments
        self.assertEqual(part.content_type, "message/rfc822")
        self.assertIn(b"old body", part.data)

    def test_filenames_decoded_and_without_paths(self):
        names = [b'filename="=?utf-8?q?ma=C3=B1ana.pdf?="',
                 b"filename*=utf-8''r%C3%A9sum%C3%A9.pdf",
                 b'filename="C:\\\\Users\\\\me\\\\secret.pdf"',
                 b'filename="../../etc/passwd"']
        parts = [b"Content-Type: application/pdf\r\nContent-Disposition: attachment; " + name
                 + b"\r\n\r\nx" for name in names]
        result = parse_message(top(multipart(b"mixed", TEXT, *parts)))
        self.assertEqual([a.filename for a in result.attachments],
                         ["mañana.pdf", "résumé.pdf", "secret.pdf", "passwd"])


class BrokenMessageTests(unittest.TestCase):
    def assertParsesOrRefuses(self, raw: bytes) -> None:
        with contextlib.suppress(ContentRefused):
            parse_message(raw)

    def test_binary_garbage(self):
        generator = random.Random(8)
        for _ in range(200):
            garbage = bytes(generator.getrandbits(8) for _ in range(generator.randrange(300)))
            self.assertParsesOrRefuses(garbage)
            self.assertParsesOrRefuses(TEENVIO_SAMPLE[:700] + garbage + TEENVIO_SAMPLE[700:])

    def test_empty_and_headers_only(self):
        self.assertIsNone(parse_message(b"").text)
        self.assertIsNone(parse_message(b"Subject: only headers\r\n").text)

    def test_missing_boundary_is_guessed(self):
        raw = top(multipart(b"alternative", TEXT, HTML).replace(b'; boundary="b0"', b""))
        result = parse_message(raw)
        self.assertEqual((result.text, result.html), ("plain body", "<p>html body</p>"))

    def test_wrong_boundary_is_guessed(self):
        raw = top(multipart(b"mixed", TEXT, PDF).replace(b'boundary="b0"', b'boundary="zz"'))
        result = parse_message(raw)
        self.assertEqual((result.text, len(result.attachments)), ("plain body", 1))

    def test_multipart_without_any_delimiter(self):
        result = parse_message(top(b"Content-Type: multipart/mixed\r\n\r\njust text"))
        self.assertEqual((result.text, result.html, result.attachments), (None, None, ()))

    def test_truncated_message(self):
        raw = top(multipart(b"mixed", TEXT, PDF))
        for end in range(0, len(raw), 7):
            self.assertParsesOrRefuses(raw[:end])

    def test_bad_base64_and_bad_content_type(self):
        raw = message(b"Content-Type: text/plain; charset=utf-8; ;;",
                      b"Content-Transfer-Encoding: base64", body=b"Y2Fm!!!w6k")
        self.assertEqual(parse_message(raw).text, "café")
        self.assertEqual(parse_message(message(b"Content-Type: ???", body=b"x")).text, "x")

    def test_absurd_nesting_refused(self):
        depth = 3000
        raw = b"".join(b'Content-Type: multipart/mixed; boundary="%d"\r\n\r\n--%d\r\n' % (i, i)
                       for i in range(depth))
        self.assertParsesOrRefuses(top(raw + TEXT))


class PolicyTests(unittest.TestCase):
    def test_from_settings(self):
        policy = ContentPolicy.from_settings(AccountSettings.from_json(
            {"multipart": "strict", "attachments": "links"}))
        self.assertEqual(policy, ContentPolicy("strict", "links"))
        self.assertEqual(ContentPolicy.from_settings(AccountSettings.from_json({})),
                         ContentPolicy("generate", "keep"))
        unknown = AccountSettings.from_json({"multipart": "lenient", "attachments": ["reject"]})
        self.assertEqual(ContentPolicy.from_settings(unknown), ContentPolicy())

    def test_no_body_refused_in_both_modes(self):
        for mode in ("strict", "generate"):
            error = self.assertRaises(ContentRefused, apply_policy,
                                      parsed(text=None, html=None), ContentPolicy(mode))
            self.assertEqual(str(error), "message has no text or HTML body")

    def test_strict(self):
        for missing in ({"text": None}, {"html": None}):
            error = self.assertRaises(ContentRefused, apply_policy, parsed(**missing),
                                      ContentPolicy("strict"))
            self.assertEqual(str(error), "message needs a text/plain and a text/html part")
        complete = parsed()
        self.assertIs(apply_policy(complete, ContentPolicy("strict")), complete)

    def test_generate_html_from_text(self):
        result = apply_policy(parsed(text="Hola <amigo> & co\nline 2\n\n\nPara 2", html=None),
                              ContentPolicy())
        self.assertIn('<meta charset="utf-8">', result.html)
        self.assertIn("<p>Hola &lt;amigo&gt; &amp; co<br>\nline 2</p>\n<p>Para 2</p>",
                      result.html)
        self.assertEqual(result.text, "Hola <amigo> & co\nline 2\n\n\nPara 2")

    def test_generate_text_from_html(self):
        long_line = "palabra " * 40
        document = (f'<html><head><style>p {{ color: red; }}</style></head><body><p>{long_line}'
                    '</p><p>1. Baja <a href="[Unsubscribe]">aqu&iacute;</a> '
                    '<a href="https://x.example/a?b=1&amp;c=2">web</a> {nombre}</p></body></html>')
        text = apply_policy(parsed(text=None, html=document), ContentPolicy()).text
        self.assertIn(long_line.strip() + "\n", text)
        self.assertIn("1. Baja [aquí]([Unsubscribe]) [web](https://x.example/a?b=1&c=2) {nombre}",
                      text)
        self.assertNotIn("color", text)

    def test_reject_names_the_extension(self):
        for name, content_type, extension in [("Factura.PDF", "application/pdf", "pdf"),
                                              ("a.tar.gz", "application/gzip", "gz"),
                                              ("attachment-1", "application/zip", "zip"),
                                              ("x.ñ", "image/png", "png")]:
            message = parsed(attachments=[attachment(name, content_type)])
            error = self.assertRaises(ContentRefused, apply_policy, message,
                                      ContentPolicy(attachments="reject"))
            self.assertEqual(str(error), f"Not allowed attachment type {extension}")

    def test_reject_allows_inline_images(self):
        message = parsed(attachments=[attachment("logo.png", "image/png", True, "logo")])
        self.assertIs(apply_policy(message, ContentPolicy(attachments="reject")), message)

    def test_keep_and_links_leave_attachments(self):
        message = parsed(attachments=[attachment("a.pdf")])
        for mode in ("keep", "links"):
            self.assertIs(apply_policy(message, ContentPolicy(attachments=mode)), message)


class CidTests(unittest.TestCase):
    def test_both_quotes_and_any_case(self):
        html = """<img src="cid:logo@x"><IMG SRC = 'CID:logo@x'>"""
        self.assertEqual(replace_cid_references(html, {"logo@x": "https://h/l.png"}),
                         ("""<img src="https://h/l.png"><IMG SRC = 'https://h/l.png'>""",
                          {"logo@x"}))

    def test_unknown_left_alone_and_url_escaped(self):
        html = '<img src="cid:other"><img src="cid:a%40b">'
        self.assertEqual(replace_cid_references(html, {"a@b": "https://h/i?x=1&y=2"}),
                         ('<img src="cid:other"><img src="https://h/i?x=1&amp;y=2">', {"a@b"}))

    def test_css_urls(self):
        """Backgrounds shown through CSS, in a style block or attribute, quoted or not."""
        html = ("<style>td{background:url(cid:a)}</style><td style=\"background:"
                "url(&quot;cid:a&quot;)\"><div style='background: url( \"cid:b\" )'>")
        result = replace_cid_references(html, {"a": "https://h/a", "c": "https://h/c"})
        self.assertEqual(result, (
            "<style>td{background:url(https://h/a)}</style><td style=\"background:"
            "url(&quot;https://h/a&quot;)\"><div style='background: url( \"cid:b\" )'>", {"a"}))


class AttachmentLinkTests(unittest.TestCase):
    def setUp(self):
        logo = attachment("logo.png", "image/png", True, "logo")
        self.message = parsed(text="Hola\n", html="<html><body><p>Hola</p></BODY></html>",
                              attachments=[attachment("a.pdf"), logo])
        self.links = [("a<1>.pdf", "https://h/a?x=1&y=2")]

    def test_links_before_body_end(self):
        result = append_attachment_links(self.message, self.links)
        self.assertEqual(result.html, '<html><body><p>Hola</p><ul class="mailgw-attachments">\n'
                         '<li><a href="https://h/a?x=1&amp;y=2">a&lt;1&gt;.pdf</a></li>\n'
                         "</ul>\n</BODY></html>")
        self.assertEqual(result.text, "Hola\n\na<1>.pdf: https://h/a?x=1&y=2\n")
        self.assertEqual(result.attachments, ())

    def test_fragment_without_body(self):
        result = append_attachment_links(replace(self.message, html="<p>x</p>"), self.links)
        self.assertTrue(result.html.startswith("<p>x</p><ul"))

    def test_no_links(self):
        result = append_attachment_links(self.message, [])
        self.assertEqual((result.html, result.text), (self.message.html, self.message.text))
        self.assertEqual(result.attachments, ())


class TemplateTests(unittest.TestCase):
    def test_split_template_tag(self):
        self.assertEqual(split_template_tag("*|tid:42eqy7oaigql|* Hola {nombre}"),
                         ("42eqy7oaigql", "Hola {nombre}"))
        self.assertEqual(split_template_tag("  *|tid:t1|*  two spaces"), ("t1", " two spaces"))
        self.assertEqual(split_template_tag("*|tid:t1|*"), ("t1", ""))

    def test_no_tag(self):
        for subject in ("Hola", "Re: *|tid:t1|* x", "*|tid:|* x", ""):
            self.assertEqual(split_template_tag(subject), (None, subject))

    def test_variables(self):
        body = '{"nombre": "Ana", "var 3": "x", "precio": 1.50, "n": 2, "ok": true, "no": null}'
        self.assertEqual(template_variables(body), {"nombre": "Ana", "var 3": "x", "precio": "1.50",
                                                    "n": "2", "ok": "true", "no": ""})

    def test_no_variables(self):
        for body in (None, "", "null", " null\n", "\n"):
            self.assertEqual(template_variables(body), {})

    def test_variables_postgresql_cannot_store(self):
        error = self.assertRaises(ContentRefused, template_variables, '{"a": "x\\u0000"}')
        self.assertEqual(str(error),
                         "message contains a NUL character in the template variable 'a'")
        error = self.assertRaises(ContentRefused, template_variables, '{"b": "\\udfff"}')
        self.assertEqual(str(error), "template variables are not a valid JSON object:"
                                     " value of 'b' is not valid Unicode")

    def test_bad_variables(self):
        for body, detail in [('{"a": ', "Expecting value at line 1 column 7"),
                             ("nul", "Expecting value"),
                             ('["a"]', "expected an object"),
                             ('"a"', "expected an object"),
                             ('{"a": {"b": 1}}', "value of 'a' is not a string or number"),
                             ('{"a": [1]}', "value of 'a'"),
                             ("[" * 100_000, "")]:
            error = self.assertRaises(ContentRefused, template_variables, body)
            self.assertTrue(str(error).startswith(
                "template variables are not a valid JSON object: "), str(error))
            self.assertIn(detail, str(error))


class AddressParsingTests(unittest.TestCase):
    """From and Reply-To: plain addresses are read with a regex, everything else with the
    email package, and both give getaddresses' answer."""

    SAMPLES = [
        "a@b.com", "<a@b.com>", "Name <a@b.com>", "Name  Two <a@b.com>", " Name\tTwo <a@b.com> ",
        "-_- <x.y+z@sub.example.org>", "123 <a@b.co>", "a.b.c@d-e.f", "Demo <demo@example.com>",
        "o'brien@example.com", "Name<a@b.com>", "N <a@b>", "  <a@b.com>", "a@b.com ",
        "x <a..b@c.com>", '"Quoted" <a@b.com>', "J. Smith <a@b.com>", "a@b.com, c@d.com",
        "Name (comment) <a@b.com>", "=?utf-8?q?V=C3=ADctor?= <a@b.com>", "a@[1.2.3.4]",
        "a@b.com (x)", "Group: a@b.com;", "", "Name <>", "<@b.com>", "a@", "@b",
        "weird <<a@b.com>>", "Nombre Apellido <remitente@dominio.com>", "a{b}c@d.com",
        "a#b@d.com", "ÄÖ <a@b.com>", "a@b.com\t", "a+tag@b.com", "Name - Dept <a@b.com>",
    ]

    def test_same_as_getaddresses(self):
        for value in self.SAMPLES:
            self.assertEqual(_parse_addresses([value]), getaddresses([value]), value)
        self.assertEqual(_parse_addresses(self.SAMPLES), getaddresses(self.SAMPLES))

    def test_plain_addresses_take_the_fast_path(self):
        for value in ("a@b.com", "Demo <demo@example.com>", "<a@b.com>"):
            self.assertIsNotNone(_SIMPLE_ADDRESS.fullmatch(value), value)
        for value in ('"Quoted" <a@b.com>', "J. Smith <a@b.com>", "a@b.com, c@d.com"):
            self.assertIsNone(_SIMPLE_ADDRESS.fullmatch(value), value)


def parse_with_policy(*raw_messages: bytes) -> None:
    for raw in raw_messages:
        apply_policy(parse_message(raw), ContentPolicy())


class CraftedInputTests(unittest.TestCase):
    """R-3: input built so that a parser's work grows with the square of its size (tens
    of seconds to hours at this size before, one linear pass now) must not stall the
    reactor that parses it. Each is parsed by a child Python, killed if it hangs."""

    SIZE = 120_000

    def test_encoded_words_that_never_end(self):
        word = b"=?a?q?x"
        assert_finishes(self, parse_with_policy,
                        message(b"Subject: " + word * (self.SIZE // len(word))))

    def test_an_address_after_a_run_of_blanks(self):
        assert_finishes(self, parse_with_policy,
                        *(message(header + b" " * self.SIZE + b"b")
                          for header in (b"From: a", b"Reply-To: a")))

    def test_html_that_never_ends_its_tags(self):
        """Each makes Python's HTMLParser (before 3.11.13) rescan the rest of the document
        per occurrence when the missing text part is generated."""
        assert_finishes(self, parse_with_policy,
                        *(message(b"Content-Type: text/html; charset=utf-8",
                                  body=pattern * (self.SIZE // len(pattern)))
                          for pattern in (b"<a ", b"</", b"<!--", b"<!-- >", b"<?",
                                          b"<![CDATA[ >", b'<a "')))

    def test_text_generated_from_html_keeps_its_words(self):
        """What the parser is spared does not cost the text its words: comments and
        declarations hold none, and a lone "<" is text."""
        document = ("<!DOCTYPE html><!-- hidden <b>x</b> --><p>1 < 2 and 3 > 2</p>"
                    "<![CDATA[ y ]]><p>a <b>bold</b> end</p><!-- never closed <p>gone")
        result = apply_policy(parsed(text=None, html=document), ContentPolicy())
        self.assertEqual(result.text, "1 < 2 and 3 > 2\n\na **bold** end\n")
