"""The content fetcher (R-4) against a local twisted.web and the tests' DNS server."""

import base64

from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web import resource, server

from mailgw.fetch import MAX_REDIRECTS, ContentFetcher, FetchRefused, decode_data_uri
from tests.dns_server import LocalDNS
from tests.harness import until

GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01"


class Files(resource.Resource):
    """/file.gif, /big (declared length), /stream (chunked, no length), /hop/<n> (a chain
    of n redirects to /file.gif), /hang (never answers), /trickle (one byte of a body,
    then nothing), /missing (404)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hosts: list[bytes] = []
        self.hanging: list = []
        self.away = b""  # where /away redirects to

    def render_GET(self, request):  # noqa: N802 - twisted.web's name
        self.hosts.append(request.getHeader(b"host"))
        path = request.path
        if path == b"/file.gif":
            request.setHeader(b"content-type", b"image/gif")
            return GIF
        if path == b"/big":
            return b"x" * 5000
        if path == b"/stream":
            for _ in range(50):
                request.write(b"y" * 100)
            request.finish()
            return server.NOT_DONE_YET
        if path.startswith(b"/hop/"):
            left = int(path.rpartition(b"/")[2])
            request.setResponseCode(302 if left % 2 else 301)
            request.setHeader(b"location", b"/file.gif" if left == 1 else b"/hop/%d" % (left - 1))
            return b""
        if path == b"/away":
            request.setResponseCode(302)
            request.setHeader(b"location", self.away)
            return b""
        if path == b"/hang":
            self.hanging.append(request)
            return server.NOT_DONE_YET
        if path == b"/trickle":  # a body begun and never finished
            request.write(b"y")
            self.hanging.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(404)
        return b"no"


class FetcherTests(unittest.TestCase):
    async def setUp(self):
        self.files = Files()
        site = server.Site(self.files)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        self.files.away = f"http://127.0.0.2:{self.port}/file.gif".encode()
        self.dns = LocalDNS({"files.example": {"A": ["127.0.0.1"]},
                             "public.example": {"A": ["192.0.2.10"]}})
        _, dns_port = self.dns.start(reactor)
        self.addCleanup(self.dns.stop)
        self.allowing = self.fetcher(["127.0.0.0/8"], dns_port)
        self.refusing = self.fetcher([], dns_port)

    def fetcher(self, allowed, dns_port, timeout=5.0, max_bytes=1000):
        fetcher = ContentFetcher(reactor, [("127.0.0.1", dns_port)], allowed, timeout, max_bytes)
        self.addCleanup(fetcher.pool.closeCachedConnections)
        return fetcher

    def url(self, path: str, host: str = "files.example") -> str:
        return f"http://{host}:{self.port}{path}"

    async def refused(self, fetcher, url) -> str:
        with self.assertRaises(FetchRefused) as caught:
            await fetcher.fetch(url)
        return str(caught.exception)

    async def test_a_file_by_name_resolved_with_the_configured_dns(self):
        fetched = await self.allowing.fetch(self.url("/file.gif"))
        self.assertEqual((fetched.data, fetched.content_type, fetched.filename),
                         (GIF, "image/gif", "file.gif"))
        # Connected to the checked address, the name in the Host header.
        self.assertEqual(self.files.hosts, [f"files.example:{self.port}".encode()])
        self.assertEqual(self.dns.count("files.example", "A"), 1)

    async def test_private_loopback_and_link_local_refused_unless_allowed(self):
        self.assertIn("127.0.0.1, a private, loopback or link-local address",
                      await self.refused(self.refusing, self.url("/file.gif")))
        for host in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "[::1]", "192.168.0.1",
                     "[::ffff:127.0.0.1]"):
            self.assertIn("private, loopback or link-local",
                          await self.refused(self.refusing, self.url("/file.gif", host)))
        self.assertEqual(self.files.hosts, [])  # never connected

    async def test_redirects_followed_up_to_five(self):
        fetched = await self.allowing.fetch(self.url(f"/hop/{MAX_REDIRECTS}"))
        self.assertEqual(fetched.data, GIF)
        self.assertEqual(await self.refused(self.allowing, self.url(f"/hop/{MAX_REDIRECTS + 1}")),
                         f"more than {MAX_REDIRECTS} redirects")

    async def test_a_redirect_to_a_private_address_is_refused(self):
        """Each hop's address is checked: an allowed first hop cannot lead elsewhere."""
        fetcher = self.fetcher(["127.0.0.1/32"], 53)
        self.assertEqual(await self.refused(fetcher, self.url("/away", "127.0.0.1")),
                         "127.0.0.2 is at 127.0.0.2, a private, loopback or link-local address")
        self.assertEqual(len(self.files.hosts), 1)

    async def test_size_limit_declared_and_streamed(self):
        self.assertEqual(await self.refused(self.allowing, self.url("/big")),
                         "larger than 1000 bytes")
        self.assertEqual(await self.refused(self.allowing, self.url("/stream")),
                         "larger than 1000 bytes")

    async def test_time_limit(self):
        fetcher = self.fetcher(["127.0.0.0/8"], 53, timeout=0.2)
        self.assertEqual(await self.refused(fetcher, self.url("/hang", "127.0.0.1")),
                         "no answer within 0.2 s")
        for request in self.files.hanging:
            request.finish()

    async def test_time_limit_in_the_body_closes_the_connection(self):
        """A server that sends its body a byte at a time keeps no socket past the limit."""
        fetcher = self.fetcher(["127.0.0.0/8"], 53, timeout=0.2)
        self.assertEqual(await self.refused(fetcher, self.url("/trickle", "127.0.0.1")),
                         "no answer within 0.2 s")
        [request] = self.files.hanging
        lost = []
        request.notifyFinish().addBoth(lost.append)
        await until(lambda: lost, "the server to see the connection go")

    async def test_schemes_names_and_answers(self):
        for url in ("ftp://files.example/x", "file:///etc/passwd", "gopher://x", "http:///x",
                    "javascript:alert(1)", "http://files.example:99999/x"):
            await self.refused(self.allowing, url)
        self.assertEqual(await self.refused(self.allowing, self.url("/x", "nowhere.example")),
                         "nowhere.example does not exist")
        self.assertEqual(await self.refused(self.allowing, self.url("/missing")),
                         "files.example answered 404")

    async def test_data_uris(self):
        fetched = await self.refusing.fetch(
            "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4").decode())
        self.assertEqual((fetched.data, fetched.content_type, fetched.filename),
                         (b"%PDF-1.4", "application/pdf", None))
        # Line breaks inside the base64, as the seed's example has them.
        self.assertEqual(decode_data_uri("data:image/gif;base64,R0lG\n  ODlh", 100).data,
                         b"GIF89a")
        for uri in ("data:text/plain,hello", "data:image/gif;base64,%%%",
                    "data:not a type;base64,AAAA", "data:;base64," + "A" * 2000):
            with self.assertRaises(FetchRefused):
                decode_data_uri(uri, 1000)
