"""The HTTP root on a real Site over a StringTransport: which app answers a path, and
what path that app sees."""

import io

from klein import Klein
from klein.interfaces import IKleinRequest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web import server
from twisted.web.resource import Resource

from mailgw.http.root import HTTPRoot, ListenerSite, MeteredSite
from mailgw.metrics import Metrics


def echo_app(name: str) -> Resource:
    """A Klein app that answers every path with its name and the path it routes on."""
    app = Klein()

    @app.route("/", branch=True)
    def echo(request) -> str:
        return f"{name} {IKleinRequest(request).mapper.path_info}"

    return app.resource()


def get(resource: Resource, path: bytes, site: server.Site | None = None) -> tuple[int, str]:
    """The status and body of a GET of `path` (as sent, not normalised)."""
    site = site or server.Site(resource, reactor=task.Clock())
    site.timeOut = None
    transport = StringTransport()
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 80))
    channel.makeConnection(transport)
    channel.dataReceived(b"GET " + path + b" HTTP/1.0\r\nHost: example.org\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


class HTTPRootTests(unittest.TestCase):
    def setUp(self):
        self.root = HTTPRoot({("v1", "email"): echo_app("aldeamo"),
                              ("v1", "admin"): echo_app("management"),
                              ("v1",): echo_app("dmds"),
                              ("t",): echo_app("tracking"), ("a",): echo_app("tracking")},
                             default=echo_app("operations"))

    def answers(self, path: bytes) -> str:
        status, body = get(self.root, path)
        self.assertEqual(status, 200)
        return body

    def test_longest_prefix_wins(self):
        self.assertEqual(self.answers(b"/v1/email"), "aldeamo /v1/email")
        self.assertEqual(self.answers(b"/v1/admin/accounts/7"), "management /v1/admin/accounts/7")
        self.assertEqual(self.answers(b"/v1/contacto/"), "dmds /v1/contacto/")
        # Whole segments only.
        self.assertEqual(self.answers(b"/v1/emails"), "dmds /v1/emails")
        self.assertEqual(self.answers(b"/v1/campania/email"), "dmds /v1/campania/email")

    def test_app_sees_the_full_path_and_query(self):
        self.assertEqual(self.answers(b"/v1/email/x/y?to=a"), "aldeamo /v1/email/x/y")
        self.assertEqual(self.answers(b"/t/o/tok.gif"), "tracking /t/o/tok.gif")
        self.assertEqual(self.answers(b"/a/tok"), "tracking /a/tok")
        self.assertEqual(self.answers(b"/healthz"), "operations /healthz")

    def test_app_reads_the_same_standalone_and_mounted(self):
        aldeamo = echo_app("aldeamo")
        root = HTTPRoot({("v1", "email"): aldeamo}, default=echo_app("operations"))
        for path in (b"/v1/email", b"/v1/email/", b"/v1/email/%41?x=1"):
            self.assertEqual(get(root, path), get(aldeamo, path))

    def test_unknown_paths_go_to_the_default(self):
        for path in (b"/", b"/nothing", b"/v2/email", b"/email", b"/V1/email", b"/ta"):
            self.assertEqual(self.answers(path), f"operations {path.decode()}")

    def test_trailing_slashes_and_empty_segments(self):
        self.assertEqual(self.answers(b"/v1"), "dmds /v1")
        self.assertEqual(self.answers(b"/v1/"), "dmds /v1/")
        self.assertEqual(self.answers(b"/v1/email/"), "aldeamo /v1/email/")
        # An empty segment is a segment: it is not skipped to reach a longer prefix.
        self.assertEqual(self.answers(b"/v1//email"), "dmds /v1//email")
        self.assertTrue(self.answers(b"//v1/email").startswith("operations "))

    def test_percent_encoded_segments(self):
        self.assertEqual(self.answers(b"/v%31/%65mail"), "aldeamo /v1/email")
        self.assertEqual(self.answers(b"/%61/t%20k"), "tracking /a/t k")
        # An encoded slash does not split its segment.
        self.assertTrue(self.answers(b"/v1%2Femail").startswith("operations "))
        self.assertTrue(self.answers(b"/a%2Ftok").startswith("operations "))

    def test_prefixes_are_whole_segments(self):
        for prefix in ((), ("",), ("v1", ""), ("v1/email",)):
            with self.assertRaises(ValueError):
                HTTPRoot({prefix: echo_app("x")}, default=echo_app("operations"))

    def test_paths_that_are_not_utf8(self):
        """R-3: a plain 400 before any app (Klein would log each as an error)."""
        for path in (b"/t/c/%ff", b"/%c3", b"/v1/email/%00%fe"):
            status, body = get(self.root, path)
            self.assertEqual(status, 400, path)
            self.assertIn("not UTF-8", body)
        self.assertEqual(self.flushLoggedErrors(), [])


class QuietSiteTests(unittest.TestCase):
    def test_no_access_log_line_for_tracking_hits(self):
        """Tracking hits (T-1, T-2) are events; they write no access-log line each, and
        are counted in the metrics all the same."""
        root = HTTPRoot({("t",): echo_app("tracking")}, default=echo_app("operations"))
        metrics = Metrics()
        site = ListenerSite(root, metrics, max_body_size=1000, request_timeout=10,
                            idle_timeout=10, reactor=task.Clock())
        site.startFactory()
        self.addCleanup(site.stopFactory)
        lines = io.StringIO()
        site.logFile = lines
        for path in (b"/t/o/tok.gif", b"/t/c/tok", b"/healthz", b"/tracking"):
            get(root, path, site)
        logged = lines.getvalue()
        self.assertNotIn("/t/", logged)
        self.assertIn('"GET /healthz HTTP/1.0" 200', logged)
        self.assertIn('"GET /tracking HTTP/1.0" 200', logged)
        counted = {sample.labels["route"]: sample.value
                   for family in metrics.registry.collect() for sample in family.samples
                   if sample.name == "mailgw_http_requests_total"}
        self.assertEqual(counted, {"/t": 2, "/": 2})


class MeteredSiteTests(unittest.TestCase):
    def test_requests_counted_by_mount_point_and_status(self):
        """O-5: the route is the mount point that answered, a handful of values
        whatever paths clients ask for; the status is the answer's."""
        missing = Resource()  # answers 404 to everything
        root = HTTPRoot({("v1", "email"): echo_app("aldeamo"), ("v1",): echo_app("dmds"),
                         ("a",): missing}, default=echo_app("operations"))
        metrics = Metrics()
        site = MeteredSite(root, metrics, reactor=task.Clock())
        for path in (b"/v1/email", b"/v1/%65mail", b"/v1/contacto/7", b"/healthz",
                     b"/wp-login.php", b"/a/x"):
            get(root, path, site)
        counted = {(sample.labels["route"], sample.labels["status"]): sample.value
                   for family in metrics.registry.collect() for sample in family.samples
                   if sample.name == "mailgw_http_requests_total"}
        self.assertEqual(counted, {("/v1/email", "200"): 2, ("/v1", "200"): 1,
                                   ("/", "200"): 2, ("/a", "404"): 1})
