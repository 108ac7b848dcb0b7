"""The webhook signature (W-2), and the README's receiver checks in Python and in Node
run against signatures mailgw makes: the documentation cannot drift from the code."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from mailgw.events.webhooks.signing import sign, verify

README = Path(__file__).parents[2] / "README.md"
SECRET = "4kqfT0Jm-secret-of-the-endpoint"
BODY = '{"type":"SMTP","event":"sent","subject":"Año nuevo"}'.encode()


def readme_block(language: str) -> str:
    """The code block of `language` in the README's "Verifying the signature"."""
    section = README.read_text().split("**Verifying the signature.**", 1)[1]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


class SigningTests(unittest.TestCase):
    def test_header_form(self):
        header = sign(SECRET, 1764676800, BODY)
        self.assertRegex(header, r"^t=1764676800,v1=[0-9a-f]{64}$")

    def test_verify(self):
        header = sign(SECRET, 1000, BODY)
        self.assertTrue(verify(SECRET, header, BODY, 1000 + 299))
        self.assertFalse(verify(SECRET, header, BODY, 1000 + 301))  # an old post again
        self.assertFalse(verify(SECRET, header, BODY + b" ", 1000))
        self.assertFalse(verify("other", header, BODY, 1000))
        self.assertFalse(verify(SECRET, header.replace("t=1000", "t=1001"), BODY, 1000))
        for broken in ("", "t=x,v1=00", "v1=00", "t=1000"):
            self.assertFalse(verify(SECRET, broken, BODY, 1000))


class ReadmeReceiverTests(unittest.TestCase):
    def cases(self) -> list[tuple[str, bytes, bool]]:
        now = int(time.time())
        good = sign(SECRET, now, BODY)
        return [(good, BODY, True), (good, BODY + b"x", False),
                (sign("another", now, BODY), BODY, False),
                (sign(SECRET, now - 3600, BODY), BODY, False), ("v1=00", BODY, False)]

    def test_python(self):
        namespace: dict = {}
        exec(readme_block("python"), namespace)  # noqa: S102 - the README's own example
        for header, body, expected in self.cases():
            self.assertEqual(namespace["verify"](SECRET, header, body), expected, header)

    async def test_node(self):
        node = shutil.which("node")
        if node is None:
            raise unittest.SkipTest("node is not installed")
        cases = [(header, body.decode(), expected) for header, body, expected in self.cases()]
        script = readme_block("javascript") + (
            f"const cases = {json.dumps(cases)};\n"
            "for (const [header, body, expected] of cases) {\n"
            f"  const got = verify({json.dumps(SECRET)}, header, Buffer.from(body));\n"
            "  if (got !== expected) { console.log('wrong for ' + header); process.exit(1); }\n"
            "}\nconsole.log('ok');\n")
        out, err, code = await getProcessOutputAndValue(node, ["-e", script], reactor=reactor)
        self.assertEqual((out, code), (b"ok\n", 0), err)
