"""one_line: what may go into a header, a reply or a log line (R-5)."""

from twisted.trial import unittest

from mailgw.text import one_line


class OneLineTests(unittest.TestCase):
    def test_line_breaks_and_controls_become_one_space(self):
        self.assertEqual(one_line("550 no such\r\n user"), "550 no such user")
        self.assertEqual(one_line("a\x00b\tc\x85d\u2028e"), "a b c d e")
        self.assertEqual(one_line("Subject\r\nBcc: x@example.net"), "Subject Bcc: x@example.net")

    def test_blanks_elsewhere_are_kept(self):
        self.assertEqual(one_line("  two  spaces  "), "two  spaces")
