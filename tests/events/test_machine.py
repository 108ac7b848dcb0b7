"""Machine activity told apart from people's (T-6): each rule, and a person's hit."""

from twisted.trial import unittest

from mailgw.events.agents import AgentParser
from mailgw.events.machine import MachineRules
from tests.events.test_agents import IPHONE

PARSER = AgentParser()


class MachineRulesTests(unittest.TestCase):
    rules = MachineRules(5.0, extra_networks=["192.0.2.0/24"], extra_agents=["AcmeScanner"])

    def judge(self, opening=False, method=b"GET", agent=IPHONE, address="203.0.113.7",
              since=60.0):
        return self.rules.judge(opening=opening, method=method, agent=PARSER.agent(agent),
                                address=address, since_delivery=since)

    def test_a_person(self):
        self.assertIsNone(self.judge())
        self.assertIsNone(self.judge(opening=True))

    def test_head_requests(self):
        self.assertEqual(self.judge(method=b"HEAD"), "head")

    def test_no_user_agent(self):
        self.assertEqual(self.judge(agent=None), "no_user_agent")

    def test_scanner_agents(self):
        for agent in (b"Mozilla/5.0 (compatible; Barracuda Sentinel)", b"python-requests/2.31",
                      b"Googlebot/2.1 (+http://www.google.com/bot.html)",
                      b"Mozilla/5.0 acmescanner/1.0", b"Mozilla/5.0 (X11) HeadlessChrome/120"):
            self.assertEqual(self.judge(agent=agent), "scanner_agent", agent)

    def test_privacy_proxies_for_opens_only(self):
        gmail = (b"Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 "
                 b"(via ggpht.com GoogleImageProxy)")
        self.assertEqual(self.judge(opening=True, agent=gmail), "privacy_proxy")
        for address in ("17.58.1.2", "66.102.8.9", "192.0.2.44"):  # Apple, Google, config
            self.assertEqual(self.judge(opening=True, agent=b"Mozilla/5.0", address=address),
                             "privacy_proxy")
            self.assertIsNone(self.judge(agent=b"Mozilla/5.0", address=address))

    def test_soon_after_delivery(self):
        self.assertEqual(self.judge(since=4.9), "soon_after_delivery")
        self.assertEqual(self.judge(since=-1.0), "soon_after_delivery")
        self.assertEqual(self.judge(since=None), "soon_after_delivery")  # not recorded yet
        self.assertIsNone(self.judge(since=5.0))
        self.assertIsNone(MachineRules(0.0).judge(opening=False, method=b"GET",
                                                  agent=PARSER.agent(IPHONE),
                                                  address="203.0.113.7", since_delivery=0.0))
