"""Machine activity told apart from people's (T-6).

Mail privacy proxies fetch every image of a message, opened or not (Apple Mail Privacy
Protection prefetches on delivery, Gmail and Yahoo fetch through their image proxies),
and link scanners of mail security gateways follow every link before the recipient sees
the message. Their hits are recorded with `machine: true` and the rule that matched,
and the statistics count them apart (`*_machine`). The rules, first match wins:

1. `head`: a HEAD request (a link checker; a browser GETs).
2. `no_user_agent`: no User-Agent header (every browser and mail client sends one).
3. `scanner_agent`: a user agent ua-parser knows as a bot, or one holding a word of
   SCANNER_AGENTS or of `tracking.machine_agents`.
4. `privacy_proxy` (opens only): a user agent holding a word of PROXY_AGENTS, or a
   client address in PROXY_NETWORKS or `tracking.machine_networks`.
5. `soon_after_delivery`: within `tracking.scanner_seconds` (5) of the delivery, or
   before its outcome is recorded (a scanner behind the receiving server can click
   before our commit of the 250).

Nothing is downloaded: the lists are these, and what an operator adds in config.
"""

from __future__ import annotations

from collections.abc import Iterable

from mailgw.events.agents import Agent
from mailgw.events.client import in_networks, networks

# Words (matched case-insensitively anywhere in the User-Agent) of link scanners, URL
# preview fetchers and HTTP libraries; generic bots are caught by ua-parser.
SCANNER_AGENTS = (
    "barracuda", "mimecast", "proofpoint", "urldefense", "symantec", "messagelabs",
    "trend micro", "trendmicro", "forcepoint", "zscaler", "sophos", "fortiguard",
    "ironport", "microsoft office existence discovery", "ms-office",
    "skypeuripreview", "headlesschrome", "phantomjs", "python-requests", "python-urllib",
    "aiohttp", "go-http-client", "okhttp", "libwww-perl", "apache-httpclient", "java/",
    "curl/", "wget/", "facebookexternalhit", "slackbot", "linkedinbot", "discordbot",
    "telegrambot", "whatsapp",
)
# Words of mail providers' image proxies.
PROXY_AGENTS = ("googleimageproxy", "ggpht.com", "yahoomailproxy")
# Networks of mail privacy proxies, as their owners publish them: Apple's 17.0.0.0/8,
# from which Mail Privacy Protection prefetches images; the ranges of Google's image
# proxy (ggpht.com, googleusercontent.com) in Google's published netblocks.
PROXY_NETWORKS = ("17.0.0.0/8", "66.102.0.0/20", "66.249.80.0/20", "64.233.160.0/19",
                  "72.14.192.0/18", "74.125.0.0/16")


class MachineRules:
    def __init__(self, scanner_seconds: float, extra_networks: Iterable[str] = (),
                 extra_agents: Iterable[str] = ()) -> None:
        self.scanner_seconds = scanner_seconds
        self._proxy_networks = networks((*PROXY_NETWORKS, *extra_networks))
        self._scanner_agents = (*SCANNER_AGENTS, *(a.strip().lower() for a in extra_agents))

    def judge(self, *, opening: bool, method: bytes, agent: Agent, address: str,
              since_delivery: float | None) -> str | None:
        """The rule that makes this hit a machine's, or None for a person's.
        `since_delivery`: seconds since the delivery was recorded sent; None when it is
        not recorded yet (0 is as good), or never will be (use float("inf"))."""
        if method == b"HEAD":
            return "head"
        if not agent.user_agent:
            return "no_user_agent"
        lowered = agent.user_agent.lower()
        if agent.spider or any(word in lowered for word in self._scanner_agents):
            return "scanner_agent"
        if opening and (any(word in lowered for word in PROXY_AGENTS)
                        or in_networks(address, self._proxy_networks)):
            return "privacy_proxy"
        if since_delivery is None or since_delivery < self.scanner_seconds:
            return "soon_after_delivery"
        return None
