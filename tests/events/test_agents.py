"""User agents read into device type, OS and browser with ua-parser (T-1)."""

from twisted.trial import unittest

from mailgw.events.agents import MAX_AGENT_LENGTH, AgentParser

IPHONE = (b"Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
          b"(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1")
WINDOWS = (b"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
           b"Chrome/120.0.0.0 Safari/537.36")
ANDROID_TABLET = (b"Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 "
                  b"(KHTML, like Gecko) Chrome/112.0.0.0 Safari/537.36")


class AgentParserTests(unittest.TestCase):
    parser = AgentParser()

    def test_device_os_and_browser(self):
        for raw, expected in ((IPHONE, ("mobile", "iOS", "Mobile Safari")),
                              (WINDOWS, ("desktop", "Windows", "Chrome")),
                              (ANDROID_TABLET, ("tablet", "Android", "Chrome"))):
            agent = self.parser.agent(raw)
            self.assertEqual((agent.device_type, agent.os, agent.browser), expected)
            self.assertEqual(agent.user_agent, raw.decode())
            self.assertFalse(agent.spider)

    def test_bots_are_known(self):
        self.assertTrue(self.parser.agent(b"Googlebot/2.1 (+http://www.google.com/bot.html)")
                        .spider)

    def test_missing_and_absurd_agents(self):
        none = self.parser.agent(None)
        self.assertEqual((none.user_agent, none.device_type, none.browser),
                         ("", "unknown", "unknown"))
        huge = self.parser.agent(IPHONE + b"x" * 1_000_000)
        self.assertEqual(len(huge.user_agent), MAX_AGENT_LENGTH)
        self.assertEqual(huge.browser, "Mobile Safari")
        garbage = self.parser.agent(b"\xff\xfe\x00\r\nX-Evil: 1")
        self.assertNotIn("\n", garbage.user_agent)
        self.assertNotIn("\x00", garbage.user_agent)
        self.assertEqual(garbage.device_type, "unknown")
