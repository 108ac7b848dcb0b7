"""What a message to the bounce domain reports (D-7), and bad input (R-3)."""

from twisted.trial import unittest

from mailgw.config import InboundConfig
from mailgw.inbound import reports
from mailgw.inbound.reports import (
    BOUNCE,
    COMPLAINT,
    DELAYED,
    HARD,
    MAX_CONTENT_TYPE,
    MAX_NESTED_PARTS,
    NOTHING,
    SOFT,
    UNREADABLE,
    read_report,
)
from tests.child import assert_finishes
from tests.inbound import samples

VERP = "b-7-abcdefghijklmnop@bounces.example.org"
MESSAGE_ID = "<7.abcdefghijklmnop@mx.test.example>"
# As much as the listener keeps of a message by default.
SIZE = InboundConfig().max_message_size


class DSNTests(unittest.TestCase):
    def test_hard_bounce(self):
        report = read_report(samples.dsn(VERP, MESSAGE_ID))
        self.assertEqual((report.kind, report.bounce_type, report.status, report.standard),
                         (BOUNCE, HARD, "5.1.1", True))
        self.assertEqual(report.reply, "550 5.1.1 <ana@example.net>: Recipient address "
                                       "rejected: User unknown in virtual mailbox table")
        self.assertEqual(report.references, (f"<{VERP}>", MESSAGE_ID))

    def test_soft_bounce(self):
        report = read_report(samples.dsn(status="4.2.2",
                                         diagnostic="smtp; 452 4.2.2 Mailbox full"))
        self.assertEqual((report.kind, report.bounce_type, report.reply),
                         (BOUNCE, SOFT, "452 4.2.2 Mailbox full"))

    def test_when_in_doubt_soft(self):
        """A failure whose status is missing or no failure's (a lying DSN) does not
        count towards invalidation."""
        for status in ("", "2.0.0", "bogus", "5.1"):
            report = read_report(samples.dsn(status=status, diagnostic=""))
            self.assertEqual((report.kind, report.bounce_type), (BOUNCE, SOFT), status)
            self.assertTrue(report.reply)

    def test_diagnostic_without_its_type(self):
        report = read_report(samples.dsn(diagnostic="550 no such user; sorry"))
        self.assertEqual(report.reply, "550 no such user; sorry")

    def test_delayed_and_positive_dsns_are_no_bounces(self):
        self.assertEqual(read_report(samples.dsn(action="delayed", status="4.4.7")).kind,
                         DELAYED)
        for action in ("delivered", "relayed", "expanded"):
            self.assertEqual(read_report(samples.dsn(action=action, status="2.0.0")).kind,
                             NOTHING)

    def test_non_standard_bounce(self):
        report = read_report(samples.exim_bounce(VERP, MESSAGE_ID))
        self.assertEqual((report.kind, report.bounce_type, report.standard),
                         (BOUNCE, HARD, False))
        self.assertEqual(report.reply,
                         "550 5.1.1 <ana@example.net>: Recipient address rejected")
        self.assertEqual(report.references, (VERP, MESSAGE_ID))
        soft = read_report(samples.exim_bounce(reply="452 4.2.2 Mailbox full"))
        self.assertEqual(soft.bounce_type, SOFT)

    def test_auto_reply_is_nothing(self):
        self.assertEqual(read_report(samples.out_of_office()).kind, NOTHING)


class ARFTests(unittest.TestCase):
    def test_complaint(self):
        report = read_report(samples.arf(VERP, MESSAGE_ID,
                                         original_mail_from="b-8-abcdefghijklmnop@x.example"))
        self.assertEqual((report.kind, report.feedback_type, report.user_agent),
                         (COMPLAINT, "abuse", "SomeGenerator/1.0"))
        self.assertEqual(report.references, ("<b-8-abcdefghijklmnop@x.example>", f"<{VERP}>",
                                             MESSAGE_ID))
        self.assertEqual(report.subject, "FW: Earn money")

    def test_reports_that_are_no_complaints(self):
        """RFC 6650's not-spam and RFC 6591's DMARC failure reports."""
        for feedback_type in ("not-spam", "auth-failure"):
            self.assertEqual(read_report(samples.arf(feedback_type=feedback_type)).kind,
                             NOTHING)

    def test_redacted_report(self):
        report = read_report(samples.arf(return_path="", message_id=""))
        self.assertEqual((report.kind, report.references), (COMPLAINT, ()))


class BadInputTests(unittest.TestCase):
    """R-3: no crash, and no work worse than linear, whatever comes to port 25."""

    def test_garbage(self):
        for raw in (b"", b"\x00\xff" * 100, b"Content-Type: multipart/report\r\n\r\n--",
                    b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\nx",
                    b"Content-Type: multipart/report; report-type=feedback-report;"
                    b" boundary=b\r\n\r\n--b\r\nContent-Type: message/feedback-report\r\n"):
            self.assertIn(read_report(raw).kind, (NOTHING, COMPLAINT), raw)

    def test_truncated_reports(self):
        """Cut anywhere (the listener keeps a message's head only), a report is read as
        far as it goes."""
        for whole in (samples.dsn(VERP), samples.arf(VERP), samples.exim_bounce(VERP)):
            for end in range(0, len(whole), 37):
                read_report(whole[:end])

    def test_lying_reports(self):
        """A report of one kind that holds another's parts, or none."""
        dsn_as_arf = samples.dsn(VERP).replace(b"report-type=delivery-status",
                                               b"report-type=feedback-report")
        self.assertEqual(read_report(dsn_as_arf).kind, COMPLAINT)
        arf_as_dsn = samples.arf(VERP).replace(b"report-type=feedback-report",
                                               b"report-type=delivery-status")
        self.assertNotEqual(read_report(arf_as_dsn).kind, BOUNCE)

    def test_too_deeply_nested(self):
        nested = b"".join(b'Content-Type: multipart/mixed; boundary="%d"\r\n\r\n--%d\r\n'
                          % (i, i) for i in range(MAX_NESTED_PARTS + 1))
        report = read_report(nested + b"\r\ntext\r\n")
        self.assertEqual(report.kind, UNREADABLE)
        self.assertIn("17 multipart or message parts", report.reply)
        # Hidden behind bare CRs, which the parser takes for line ends.
        self.assertEqual(read_report(nested.replace(b"\r\n", b"\r")).kind, UNREADABLE)

    def test_content_type_too_long(self):
        raw = b"Content-Type: multipart/report;\r\n " + b"a=b; " * MAX_CONTENT_TYPE + b"\r\n\r\n"
        self.assertEqual(read_report(raw).kind, UNREADABLE)

    def test_a_choking_detector_is_no_crash(self):
        """flufl.bounce's detectors raise on some input (Yale's on a From with no
        address): nothing detected, nothing logged as a traceback."""
        raw = b"From: \r\nSubject: x\r\n\r\nMessage not delivered to the following\r\n"
        self.assertEqual(read_report(raw).kind, NOTHING)


def read_reports(raws: list[bytes]) -> None:
    for raw in raws:
        read_report(raw)


class CraftedInputTests(unittest.TestCase):
    """R-3, R-6: input built so that a parser's work grows faster than its size must not
    stall the process (the listener reads reports in a thread, but a thread that never
    ends holds the GIL's share and a thread of the pool). Each is read by a child
    Python, killed if it hangs; each took seconds to hours before its bound."""

    def test_nested_parts_under_the_cap_with_many_lines(self):
        nested = b"".join(b'Content-Type: multipart/mixed; boundary="%d"\r\n\r\n--%d\r\n'
                          % (i, i) for i in range(MAX_NESTED_PARTS))
        assert_finishes(self, read_report, nested + b"x\r\n" * (SIZE // 3), seconds=10)

    def test_content_type_parameters(self):
        """The email package scans a Content-Type's parameters once per ";" (quotes
        counted from its start): a few seconds for a field of 4 MiB (a listener that
        keeps that much), minutes for 1 MiB."""
        for size in (MAX_CONTENT_TYPE, 4 * 1024 * 1024):
            for pattern in (b';a="', b'";', b';"'):
                raw = (b"Content-Type: multipart/report; report-type=x"
                       + pattern * (size // len(pattern) - 20) + b"\r\n\r\nbody\r\n")
                assert_finishes(self, read_report, raw, seconds=10)

    def test_long_lines_for_the_heuristics(self):
        """flufl.bounce's patterns ([^\\s@]+@... on ..., ,\\s*\\S+@[^,]+, ...) take the
        square of a line's length: about 2 s for each of these lines of 32 KiB, read
        whole (one child reads them all)."""
        raws = []
        for line in (b"a" * SIZE, b"," + b"a@" * (SIZE // 2), b"<a" * (SIZE // 2)):
            for head in (b"did not reach the following recipient\r\n",
                         b"This Message was undeliverable due to the following reason:\r\n",
                         b"Message not delivered to the following\r\n"):
                raws.append((b"From: x@y.example\r\nSubject: x\r\n\r\n" + head + line)[:SIZE])
        assert_finishes(self, read_reports, raws, seconds=5)

    def test_many_short_report_blocks(self):
        raw = samples.dsn(VERP)
        head, _, tail = raw.partition(b"Final-Recipient")
        blocks = b"Action: delayed\r\nStatus: 4.0.0\r\n\r\n" * (SIZE // 34)
        assert_finishes(self, read_report, (head + blocks + b"Final-Recipient" + tail)[:SIZE],
                        seconds=10)


class BoundsTests(unittest.TestCase):
    def test_bounded_copy(self):
        copy, text = reports._bounded_copy(
            reports.message_from_bytes(b"Subject: x\r\n\r\n" + (b"a" * 1000 + b"\r\n") * 100))
        self.assertLessEqual(len(text), reports.MAX_TEXT)
        self.assertTrue(all(len(line) <= reports.MAX_LINE for line in text.splitlines()))
        self.assertEqual(copy["From"], "MAILER-DAEMON")
