"""The SMTP session on a StringTransport and task.Clock: no sockets, no database.

The submission service is a stand-in that records what the session hands
it; the cred portal is real, with an in-memory checker.  One test class per
verb (docs/architecture.md, Tests).
"""

import base64
import copy
import dataclasses
import ipaddress

from twisted.cred import checkers, portal
from twisted.internet import address, defer, task
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from mailgw.accounts.avatar import ISubmissionAccount, SubmissionAccount
from mailgw.accounts.settings import AccountSettings
from mailgw.errors import DatabaseUnavailable
from mailgw.smtp.auth import AuthThrottle
from mailgw.smtp.protocol import CLOSE_GRACE_SECONDS, DataCollector, SubmissionFactory
from mailgw.store.contacts import ContactLimitReached, ImportedRecipient, RecipientImport
from mailgw.store.submissions import QueuedRecipient, StoredSubmission
from mailgw.submit.errors import ContentNotAccepted, DisallowedSender, SendQuotaExhausted
from mailgw.submit.recipients import IMPORT_HOLD_SECONDS, RecipientImports

UID = "fa8896c2351f8b7e73ac3a3d209c6ac5"
MESSAGE = (b"From: Sender <sender@example.org>\r\nTo: rcpt@example.net\r\n"
           b"Subject: hello\r\nContent-Type: text/plain\r\n\r\nHello there\r\n")


class StubService:
    """Stands in for SubmissionService: records calls, answers like the real one."""

    def __init__(self, clock):
        self.clock = clock
        self.allowed_senders = {"sender@example.org"}
        self.submissions = []
        self.imported = []
        # The imports committed on their own, not with their message.
        self.imported_alone = []
        self.refuse = None
        self.suppressed = {}
        # When set, imports wait for the test to fire them (a group commit under way).
        self.held: list[defer.Deferred] | None = None

    async def check_sender(self, account, address):
        if address.lower() not in self.allowed_senders:
            raise DisallowedSender(address)
        return address.lower()

    def recipient_imports(self, account, group_name, origin, sender):
        def request(recipient):
            if recipient.email.startswith("down@"):
                raise DatabaseUnavailable("import_recipient")
            return RecipientImport(account.account_id, group_name, origin, recipient.email,
                                   sender.rpartition("@")[2], account.max_contacts,
                                   recipient.kind)

        return RecipientImports(request, self._import_alone, self.clock)

    def _import(self, request):
        self.imported.append(request.email)
        return ImportedRecipient(7, len(self.imported), self.suppressed.get(request.email))

    def _import_alone(self, request):
        if request.email.startswith("limit@"):
            return defer.fail(ContactLimitReached())
        self.imported_alone.append(request.email)
        imported = self._import(request)
        if self.held is None:
            return defer.succeed(imported)
        held = defer.Deferred()
        self.held.append(held)
        return held.addCallback(lambda _: imported)

    async def submit(self, submission):
        if self.refuse is not None:
            raise self.refuse
        held = submission.imports.take()
        if held is None:
            recipients, _ = await submission.imports.imported()
        else:
            recipients = [QueuedRecipient.imported(r, self._import(r)) for r in held]
        self.submissions.append(dataclasses.replace(submission, recipients=tuple(recipients)))
        return StoredSubmission(1166, 1, UID, len(recipients), 0)


@implementer(portal.IRealm)
class StubRealm:
    def __init__(self, networks=None, max_contacts=None):
        self.networks = networks
        self.max_contacts = max_contacts

    def requestAvatar(self, avatar_id, mind, *interfaces):
        account = SubmissionAccount(1, "acme", avatar_id.decode(), AccountSettings(), self.networks,
                                    self.max_contacts)
        return ISubmissionAccount, account, lambda: None


@implementer(checkers.ICredentialsChecker)
class SlowChecker:
    """Another checker's answers, `seconds` later (as scrypt in a thread would be)."""

    def __init__(self, checker, clock, seconds):
        self.credentialInterfaces = checker.credentialInterfaces
        self.checker, self.clock, self.seconds = checker, clock, seconds

    def requestAvatarId(self, credentials):
        return task.deferLater(self.clock, self.seconds, self.checker.requestAvatarId,
                               credentials)


class UnreachableFailureStore:
    """The store of failure counts shared by the nodes, while PostgreSQL is gone."""

    async def record(self, *args):
        raise DatabaseUnavailable("record_auth_failure")

    reset = changed_since = record


@implementer(ITLSTransport)
class StartTLSTransport(StringTransport):
    """A transport that can start TLS: it records the options it was started with."""

    tls_options = None

    def startTLS(self, contextFactory):
        self.tls_options = contextFactory

    def setTcpNoDelay(self, enabled):
        pass


class Session:
    """A session on a StringTransport; `send` returns the replies it caused. With
    `starttls`, the transport and the factory can start TLS (a listener's STARTTLS)."""

    def __init__(self, peer="127.0.0.1", secure=False, networks=None, max_size=512000,
                 max_recipients=1000, allow_plaintext_auth=False, trusted_networks=(),
                 max_contacts=None, starttls=False, check_seconds=0, shared_failures=None):
        self.clock = task.Clock()
        self.service = StubService(self.clock)
        users = checkers.InMemoryUsernamePasswordDatabaseDontUse(**{"user.plan": b"secret"})
        if check_seconds:
            users = SlowChecker(users, self.clock, check_seconds)
        self.throttle = AuthThrottle(self.clock, shared=shared_failures)
        self.factory = SubmissionFactory(
            "mx.example.org", tls_options=object() if starttls else None, clock=self.clock,
            idle_timeout=300,
            portal=portal.Portal(StubRealm(networks, max_contacts), [users]),
            service=self.service,
            throttle=self.throttle, max_message_size=max_size, max_recipients=max_recipients,
            allow_plaintext_auth=allow_plaintext_auth, trusted_networks=trusted_networks,
            trusted_account=self.trusted_account)
        self._connect(peer, secure, starttls)

    def _connect(self, peer, secure, starttls):
        peer_address = address.IPv4Address("TCP", peer, 40000)
        self.protocol = self.factory.buildProtocol(peer_address)
        transport_class = StartTLSTransport if starttls else StringTransport
        self.transport = transport_class(peerAddress=peer_address)
        self.protocol.makeConnection(self.transport)
        self.protocol.startedTLS = secure
        self.banner = self.take()

    def another(self, peer="127.0.0.1") -> "Session":
        """A second connection to the same server (its throttle, its clock), from `peer`."""
        other = copy.copy(self)
        other._connect(peer, secure=True, starttls=False)
        return other

    async def trusted_account(self, username):
        return SubmissionAccount(2, "relay", username)

    def take(self) -> list[bytes]:
        data = self.transport.value()
        self.transport.clear()
        return data.split(b"\r\n")[:-1]

    def send(self, *lines: bytes, end=b"\r\n") -> list[bytes]:
        self.protocol.dataReceived(b"".join(line + end for line in lines))
        return self.take()

    def login(self):
        self.send(b"EHLO client")
        reply = self.send(b"AUTH PLAIN " + base64.b64encode(b"\0user.plan\0secret"))
        assert reply == [b"235 2.7.0 Authentication Succeeded"], reply

    def envelope(self, *recipients: bytes):
        self.login()
        self.send(b"MAIL FROM:<sender@example.org>")
        for rcpt in recipients or (b"rcpt@example.net",):
            self.send(b"RCPT TO:<" + rcpt + b">")

    def submit(self, message: bytes) -> list[bytes]:
        """The replies to a whole transaction whose DATA is `message`."""
        self.envelope()
        self.send(b"DATA")
        return self.send(message + b".")


def b64(text: bytes) -> bytes:
    return base64.b64encode(text)


def record_failures(throttle, ip, username, times=1):
    """Failures counted straight into a throttle that shares nothing (they wait for
    nothing, so they are counted on return)."""
    for _ in range(times):
        defer.ensureDeferred(throttle.record_failure(ip, username))


class GreetingTests(unittest.TestCase):
    def test_banner(self):
        self.assertEqual(Session().banner, [b"220 mx.example.org ESMTP mailgw"])


class EHLOTests(unittest.TestCase):
    def test_capabilities_on_loopback(self):
        replies = Session().send(b"EHLO client.example")
        self.assertEqual(replies, [
            b"250-mx.example.org Hello client.example", b"250-PIPELINING", b"250-SIZE 512000",
            b"250-8BITMIME", b"250-ENHANCEDSTATUSCODES", b"250-AUTH LOGIN PLAIN",
            b"250 HELP"])

    def test_no_auth_on_plain_connection_from_elsewhere(self):
        replies = Session(peer="192.0.2.1").send(b"EHLO client")
        self.assertNotIn(b"250-AUTH LOGIN PLAIN", replies)

    def test_auth_once_tls_is_on(self):
        replies = Session(peer="192.0.2.1", secure=True).send(b"EHLO client")
        self.assertIn(b"250-AUTH LOGIN PLAIN", replies)

    def test_operator_may_allow_plaintext_auth(self):
        replies = Session(peer="192.0.2.1", allow_plaintext_auth=True).send(b"EHLO client")
        self.assertIn(b"250-AUTH LOGIN PLAIN", replies)

    def test_missing_argument(self):
        self.assertEqual(Session().send(b"EHLO"), [b"501 5.5.4 Syntax error in parameters"])

    def test_bare_lf_commands(self):
        replies = Session().send(b"EHLO client", end=b"\n")
        self.assertEqual(replies[-1], b"250 HELP")


    def test_client_name_echoed_printable(self):
        """A CR in the name would start a line of its own in the reply."""
        replies = Session().send(b"EHLO evil\r250-AUTH FAKE\x00.example")
        self.assertEqual(replies[0], b"250-mx.example.org Hello evil?250-AUTH FAKE?.example")
        self.assertEqual(replies[1], b"250-PIPELINING")


class HELOTests(unittest.TestCase):
    def test_helo(self):
        self.assertEqual(Session().send(b"HELO client"),
                         [b"250 mx.example.org Hello client"])

    def test_client_name_echoed_printable(self):
        self.assertEqual(Session().send(b"HELO a\rb\x00c\xff"),
                         [b"250 mx.example.org Hello a?b?c?"])


class STARTTLSTests(unittest.TestCase):
    def test_not_available_without_tls_transport(self):
        self.assertEqual(Session().send(b"STARTTLS"), [b"454 4.7.0 TLS not available"])

    def test_already_active(self):
        self.assertEqual(Session(secure=True).send(b"STARTTLS"),
                         [b"503 5.5.1 TLS already active"])

    def test_forgets_a_login_made_before_tls(self):
        """RFC 3207 4.2: nothing the client said before TLS counts, a loopback AUTH
        included; it logs in again over TLS."""
        session = Session(starttls=True)
        session.login()
        self.assertEqual(session.send(b"STARTTLS"), [b"220 2.0.0 Ready to start TLS"])
        self.assertIs(session.transport.tls_options, session.factory.tls_options)
        self.assertEqual(session.send(b"MAIL FROM:<sender@example.org>"),
                         [b"530 5.7.0 Authentication required"])
        self.assertIn(b"250-AUTH LOGIN PLAIN", session.send(b"EHLO client"))
        session.login()
        self.assertEqual(session.send(b"MAIL FROM:<sender@example.org>"), [b"250 2.1.0 OK"])


class AUTHTests(unittest.TestCase):
    def test_login_with_teenvio_prompts(self):
        session = Session()
        session.send(b"EHLO client")
        self.assertEqual(session.send(b"AUTH LOGIN"), [b"334 VXNlcm5hbWU6"])
        self.assertEqual(session.send(b64(b"user.plan")), [b"334 UGFzc3dvcmQ6"])
        self.assertEqual(session.send(b64(b"secret")), [b"235 2.7.0 Authentication Succeeded"])

    def test_login_initial_response(self):
        session = Session()
        self.assertEqual(session.send(b"AUTH LOGIN " + b64(b"user.plan")),
                         [b"334 UGFzc3dvcmQ6"])
        self.assertEqual(session.send(b64(b"secret")), [b"235 2.7.0 Authentication Succeeded"])

    def test_plain_with_and_without_initial_response(self):
        session = Session()
        self.assertEqual(session.send(b"AUTH PLAIN " + b64(b"\0user.plan\0secret")),
                         [b"235 2.7.0 Authentication Succeeded"])
        session = Session()
        self.assertEqual(session.send(b"AUTH PLAIN"), [b"334 "])
        self.assertEqual(session.send(b64(b"\0user.plan\0secret")),
                         [b"235 2.7.0 Authentication Succeeded"])

    def test_wrong_password(self):
        self.assertEqual(Session().send(b"AUTH PLAIN " + b64(b"\0user.plan\0wrong")),
                         [b"535 5.7.8 Authentication credentials invalid"])

    def test_encryption_required(self):
        self.assertEqual(Session(peer="192.0.2.1").send(b"AUTH LOGIN"),
                         [b"538 5.7.11 Encryption required for requested authentication"
                          b" mechanism"])

    def test_unknown_mechanism(self):
        self.assertEqual(Session().send(b"AUTH CRAM-MD5"),
                         [b"504 5.5.4 Unrecognized authentication type"])

    def test_missing_mechanism(self):
        """RFC 4954 4: AUTH needs a mechanism; without one it is a syntax error."""
        self.assertEqual(Session().send(b"AUTH"), [b"501 5.5.4 Syntax error in parameters"])

    def test_abort_and_bad_base64(self):
        session = Session()
        session.send(b"AUTH LOGIN")
        self.assertEqual(session.send(b"*"), [b"501 5.0.0 Authentication aborted"])
        session.send(b"AUTH LOGIN")
        self.assertEqual(session.send(b"!!!"), [b"501 5.5.4 Syntax error in parameters"])
        self.assertEqual(session.send(b"AUTH PLAIN " + b64(b"no-nuls")),
                         [b"501 5.5.4 Syntax error in parameters"])

    def test_already_authenticated(self):
        session = Session()
        session.login()
        self.assertEqual(session.send(b"AUTH PLAIN " + b64(b"\0user.plan\0secret")),
                         [b"503 5.5.1 Already authenticated"])

    def test_network_allow_list(self):
        """S-4; the plain 535 from outside (it said "not allowed from <ip>": a password
        oracle, issue 12 point 8)."""
        outside = Session(networks=(ipaddress.ip_network("10.0.0.0/8"),))
        self.assertEqual(outside.send(b"AUTH PLAIN " + b64(b"\0user.plan\0secret")),
                         [b"535 5.7.8 Authentication credentials invalid"])
        inside = Session(networks=(ipaddress.ip_network("127.0.0.0/8"),))
        self.assertEqual(inside.send(b"AUTH PLAIN " + b64(b"\0user.plan\0secret")),
                         [b"235 2.7.0 Authentication Succeeded"])

    def test_allow_list_is_no_password_oracle(self):
        """From outside an account's networks the right password gets the reply a wrong one
        gets and counts as a failure too; the operator finds the reason in the log."""
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        session = Session(networks=(ipaddress.ip_network("10.0.0.0/8"),))
        right = b"AUTH PLAIN " + b64(b"\0user.plan\0secret")
        wrong = b"AUTH PLAIN " + b64(b"\0user.plan\0wrong")
        for attempt in (right, wrong, right):
            self.assertEqual(session.send(attempt),
                             [b"535 5.7.8 Authentication credentials invalid"])
        self.assertEqual(session.send(right), [])  # the 4th failure waits 1 s
        session.clock.advance(1)
        self.assertEqual(session.take(), [b"535 5.7.8 Authentication credentials invalid"])
        reasons = [formatEvent(event) for event in logged if "AUTH" in formatEvent(event)]
        self.assertEqual(reasons, ["AUTH as user.plan from 127.0.0.1 refused: the right"
                                   " password, from outside account acme's networks"] * 3)

    def test_failures_are_slowed_then_refused(self):
        session = Session()
        bad = b"AUTH PLAIN " + b64(b"\0user.plan\0wrong")
        for _ in range(3):  # free tries: answered at once
            self.assertEqual(session.send(bad)[0][:3], b"535")
        self.assertEqual(session.send(bad), [])  # the 4th failure waits 1 s
        session.clock.advance(1)
        self.assertEqual(session.take()[0][:3], b"535")
        for seconds in (2, 4, 8, 16, 30, 30):
            session.send(bad)
            session.clock.advance(seconds)
            self.assertEqual(session.take()[0][:3], b"535")
        # Ten failures: this user is refused even with the right password.
        self.assertEqual(session.send(b"AUTH PLAIN " + b64(b"\0user.plan\0secret")),
                         [b"454 4.7.0 Too many authentication failures, try again later"])

    def assert_right_password(self, session, refused_at, accepted_at):
        """The right password is refused (454) from `refused_at`, accepted from
        `accepted_at`."""
        right = b"AUTH PLAIN " + b64(b"\0user.plan\0secret")
        self.assertEqual(session.another(refused_at).send(right),
                         [b"454 4.7.0 Too many authentication failures, try again later"])
        self.assertEqual(session.another(accepted_at).send(right),
                         [b"235 2.7.0 Authentication Succeeded"])

    def test_guesses_cannot_lock_the_owner_out(self):
        """R-6: ten wrong passwords for a username from one address refuse it there (454),
        not at an address without failures for it, where the owner logs in."""
        session = Session()
        record_failures(session.throttle, "192.0.2.66", "user.plan", 10)
        self.assert_right_password(session, refused_at="192.0.2.66",
                                   accepted_at="198.51.100.7")

    def test_guesses_from_many_addresses(self):
        """Once a username has ten failures from all addresses together, an address that
        failed three times for it is refused it; one with fewer failures is not."""
        session = Session()
        for n in range(7):
            record_failures(session.throttle, f"192.0.2.{n}", "User.Plan")
        record_failures(session.throttle, "192.0.2.66", "user.plan", 3)
        self.assert_right_password(session, refused_at="192.0.2.66", accepted_at="192.0.2.0")

    def test_client_address_cut_off(self):
        session = Session()
        for attempt in range(30):
            record_failures(session.throttle, "127.0.0.1", f"guess{attempt}")
        self.assertEqual(session.send(b"AUTH LOGIN"),
                         [b"421 4.7.0 Too many failed attempts, closing connection"])
        self.assertTrue(session.transport.disconnecting)

    def test_own_login_does_not_reset_the_address_count(self):
        """R-6: 29 wrong AUTHs in parallel for different usernames, then a login with the
        attacker's own account: the next failure is the address's 30th, and then the
        address is cut off."""
        session = Session()
        guesses = [session.another() for _ in range(29)]
        replies = [guess.send(b"AUTH PLAIN " + b64(b"\0victim%d\0guess" % n))
                   for n, guess in enumerate(guesses)]
        session.clock.advance(30)  # the longest delay
        replies = [early + guess.take() for early, guess in zip(replies, guesses, strict=True)]
        self.assertEqual(replies, [[b"535 5.7.8 Authentication credentials invalid"]] * 29)
        session.another().login()
        thirtieth = session.another()
        early = thirtieth.send(b"AUTH PLAIN " + b64(b"\0victim\0guess"))
        session.clock.advance(30)
        self.assertEqual(early + thirtieth.take(),
                         [b"535 5.7.8 Authentication credentials invalid"])
        self.assertEqual(session.another().send(b"AUTH LOGIN"),
                         [b"421 4.7.0 Too many failed attempts, closing connection"])

    def test_attempts_being_checked_count_against_the_address(self):
        """Attempts sent all at once cannot pass the address's cap of 30 before their
        failures are counted: an attempt being checked counts until it is answered."""
        session = Session(check_seconds=0.1)
        clients = [session.another() for _ in range(40)]
        for client in clients:
            self.assertEqual(client.send(b"AUTH LOGIN", b64(b"victim")),
                             [b"334 VXNlcm5hbWU6", b"334 UGFzc3dvcmQ6"])
        refused = [client.send(b64(b"guess")) for client in clients]
        self.assertEqual(refused, [[]] * 30 + [
            [b"421 4.7.0 Too many failed attempts, closing connection"]] * 10)
        session.clock.advance(0.1)
        session.clock.advance(30)
        self.assertEqual([client.take()[0][:3] for client in clients[:30]], [b"535"] * 30)

    def test_counts_stay_local_while_the_shared_counts_are_unreachable(self):
        session = Session(shared_failures=UnreachableFailureStore())
        for _ in range(3):
            self.assertEqual(session.send(b"AUTH PLAIN " + b64(b"\0user.plan\0wrong")),
                             [b"535 5.7.8 Authentication credentials invalid"])
        self.assertEqual(session.throttle.user_failures("user.plan"), 3)
        session.login()

    def test_failures_forgotten_after_a_quiet_while(self):
        session = Session()
        clock = task.Clock()  # the throttle's own clock: the session must not time out
        session.factory.throttle = AuthThrottle(clock)
        record_failures(session.factory.throttle, "127.0.0.1", "user.plan", 30)
        clock.advance(901)
        self.assertEqual(session.send(b"AUTH PLAIN " + b64(b"\0user.plan\0secret")),
                         [b"235 2.7.0 Authentication Succeeded"])


class MAILTests(unittest.TestCase):
    def test_requires_auth(self):
        self.assertEqual(Session().send(b"MAIL FROM:<sender@example.org>"),
                         [b"530 5.7.0 Authentication required"])

    def test_trusted_network_needs_no_auth(self):
        session = Session(peer="10.1.2.3", trusted_networks=("10.0.0.0/8",))
        self.assertEqual(session.send(b"MAIL FROM:<sender@example.org>"), [b"250 2.1.0 OK"])
        self.assertEqual(session.protocol.account.username, "trusted:10.1.2.3")
        self.assertEqual(session.send(b"RCPT TO:<a@example.net>"), [b"250 2.1.5 Accepted"])
        other = Session(peer="192.0.2.1", trusted_networks=("10.0.0.0/8",))
        self.assertEqual(other.send(b"MAIL FROM:<sender@example.org>"),
                         [b"530 5.7.0 Authentication required"])

    def test_accepted_with_size(self):
        session = Session()
        session.login()
        self.assertEqual(session.send(b"MAIL FROM: <sender@example.org> SIZE=1307"),
                         [b"250 2.1.0 OK"])

    def test_size_above_limit(self):
        session = Session()
        session.login()
        self.assertEqual(session.send(b"MAIL FROM:<sender@example.org> SIZE=512001"),
                         [b"552 5.3.4 message size exceeds fixed maximum message size"
                          b" (512000) bytes"])

    def test_unsupported_parameter(self):
        session = Session()
        session.login()
        self.assertEqual(session.send(b"MAIL FROM:<sender@example.org> SMTPUTF8"),
                         [b"504 5.5.4 A command parameter is not implemented"])

    def test_auth_parameter_accepted_and_ignored(self):
        """RFC 4954 5: a server that offers AUTH takes MAIL's AUTH= parameter."""
        replies = {b"AUTH=<>": b"250 2.1.0 OK", b"AUTH=sender+40example.org": b"250 2.1.0 OK",
                   b"AUTH=": b"501 5.5.4 Syntax error in parameters"}
        for parameter, reply in replies.items():
            session = Session()
            session.login()
            self.assertEqual(session.send(b"MAIL FROM:<sender@example.org> " + parameter),
                             [reply])

    def test_bad_syntax(self):
        session = Session()
        session.login()
        self.assertEqual(session.send(b"MAIL sender@example.org"),
                         [b"501 5.5.4 Syntax error in parameters"])
        self.assertEqual(session.send(b"MAIL FROM:<sender@example.org> SIZE=big"),
                         [b"501 5.5.4 Syntax error in parameters"])

    def test_sender_not_verified(self):
        session = Session()
        session.login()
        self.assertEqual(session.send(b"MAIL FROM:<other@example.org>"),
                         [b"553 5.7.1 Disallowed source address: other@example.org"])

    def test_second_sender(self):
        session = Session()
        session.login()
        session.send(b"MAIL FROM:<sender@example.org>")
        self.assertEqual(session.send(b"MAIL FROM:<sender@example.org>"),
                         [b"503 5.5.1 Sender already specified"])


class RCPTTests(unittest.TestCase):
    def test_requires_auth_and_mail(self):
        session = Session()
        self.assertEqual(session.send(b"RCPT TO:<a@example.net>"),
                         [b"530 5.7.0 Authentication required"])
        session.login()
        self.assertEqual(session.send(b"RCPT TO:<a@example.net>"),
                         [b"503 5.5.1 valid MAIL command must precede RCPT"])

    def test_accepted_and_imported(self):
        session = Session()
        session.envelope(b"A@Example.net", b"b@example.net")
        self.assertEqual(len(session.protocol._imports), 2)
        self.assertEqual(session.service.imported, [])
        session.clock.advance(IMPORT_HOLD_SECONDS)
        self.assertEqual(session.service.imported_alone, ["a@example.net", "b@example.net"])

    def test_imports_committed_with_the_message(self):
        """S-7 imports that the DATA follows at once go in the message's transaction."""
        session = Session()
        session.envelope(b"a@example.net", b"b@example.net")
        session.send(b"DATA")
        self.assertEqual(session.send(MESSAGE + b"."), [b"250 OK id=1166 " + UID.encode()])
        self.assertEqual(session.service.imported, ["a@example.net", "b@example.net"])
        self.assertEqual(session.service.imported_alone, [])
        (submission,) = session.service.submissions
        self.assertEqual([r.contact_id for r in submission.recipients], [1, 2])
        session.clock.advance(IMPORT_HOLD_SECONDS)
        self.assertEqual(session.service.imported_alone, [])

    def test_reply_does_not_wait_for_the_import(self):
        """An import that its hold sent on its own is waited for at the end of DATA."""
        session = Session()
        session.service.held = []
        session.envelope()
        session.clock.advance(IMPORT_HOLD_SECONDS)
        self.assertEqual(session.send(b"RCPT TO:<b@example.net>"), [b"250 2.1.5 Accepted"])
        self.assertEqual(session.send(b"DATA"),
                         [b'354 Enter message, ending with "." on a line by itself'])
        self.assertEqual(session.send(MESSAGE + b"."), [])
        self.assertEqual(session.service.imported_alone, ["rcpt@example.net", "b@example.net"])
        session.service.held.pop(0).callback(None)
        self.assertEqual(session.take(), [])
        session.service.held.pop(0).callback(None)
        self.assertEqual(session.take(), [b"250 OK id=1166 " + UID.encode()])
        (submission,) = session.service.submissions
        self.assertEqual([r.contact_id for r in submission.recipients], [1, 2])

    def test_quit_commits_and_waits_for_the_imports(self):
        session = Session()
        session.service.held = []
        session.envelope()
        self.assertEqual(session.send(b"QUIT"), [])
        self.assertEqual(session.service.imported_alone, ["rcpt@example.net"])
        session.service.held.pop().callback(None)
        self.assertEqual(session.take(), [b"221 2.0.0 Closing connection."])
        self.assertTrue(session.transport.disconnecting)

    def test_rset_and_ehlo_commit_the_imports(self):
        session = Session()
        session.envelope(b"a@example.net")
        session.send(b"RSET")
        self.assertEqual(session.service.imported_alone, ["a@example.net"])
        session.send(b"MAIL FROM:<sender@example.org>", b"RCPT TO:<b@example.net>")
        session.send(b"EHLO again")
        self.assertEqual(session.service.imported_alone, ["a@example.net", "b@example.net"])

    def test_imports_outlive_a_lost_connection(self):
        session = Session()
        session.service.held = []
        session.envelope(b"a@example.net", b"b@example.net")
        session.protocol.connectionLost()
        self.assertEqual(session.service.imported_alone, ["a@example.net", "b@example.net"])
        # Still committed (or, here, failing) after the client is gone, and a failure is
        # logged, not left unhandled.
        session.service.held[0].callback(None)
        session.service.held[1].errback(DatabaseUnavailable("import_recipients"))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_refused_message_keeps_its_imports(self):
        session = Session()
        session.service.refuse = ContentNotAccepted("Not allowed attachment type exe")
        session.envelope(b"a@example.net")
        session.send(b"DATA")
        session.send(MESSAGE + b".")
        self.assertEqual(session.service.imported_alone, ["a@example.net"])

    def test_failed_import_fails_the_message(self):
        session = Session()
        session.service.held = []
        session.envelope(b"a@example.net", b"b@example.net")
        session.clock.advance(IMPORT_HOLD_SECONDS)
        session.send(b"DATA")
        session.send(MESSAGE + b".")
        session.service.held[0].errback(DatabaseUnavailable("import_recipients"))
        session.service.held[1].callback(None)
        self.assertEqual(session.take(), [b"451 4.3.0 Temporary failure, try again later"])
        self.assertEqual(session.service.submissions, [])

    def test_database_known_down(self):
        session = Session()
        session.envelope()
        self.assertEqual(session.send(b"RCPT TO:<down@example.net>"),
                         [b"451 4.3.0 Temporary failure, try again later"])

    def test_invalid_recipient(self):
        session = Session()
        session.envelope()
        self.assertEqual(session.send(b"RCPT TO:<gmail>"),
                         [b"553 5.1.3 Invalid recipient address: gmail"])

    def test_local_part_longer_than_64_octets(self):
        session = Session()
        session.envelope()
        local = b"a" * 65
        self.assertEqual(session.send(b"RCPT TO:<" + local + b"@example.net>"),
                         [b"553 5.1.3 Invalid recipient address: " + local + b"@example.net"])

    def test_too_many_recipients(self):
        session = Session(max_recipients=1)
        session.envelope(b"a@example.net")
        self.assertEqual(session.send(b"RCPT TO:<b@example.net>"),
                         [b"452 4.5.3 Too many recipients"])

    def test_parameter_not_implemented(self):
        session = Session()
        session.envelope()
        self.assertEqual(session.send(b"RCPT TO:<a@example.net> NOTIFY=NEVER"),
                         [b"504 5.5.4 A command parameter is not implemented"])

    def test_database_known_down_with_a_contact_cap(self):
        """The import is committed before the reply here, and cannot be: 451 as well."""
        session = Session(max_contacts=10)
        session.envelope()
        self.assertEqual(session.send(b"RCPT TO:<down@example.net>"),
                         [b"451 4.3.0 Temporary failure, try again later"])
        self.assertEqual(session.send(b"RCPT TO:<b@example.net>"), [b"250 2.1.5 Accepted"])

    def test_contact_limit(self):
        session = Session(max_contacts=10)
        session.envelope()
        self.assertEqual(session.send(b"RCPT TO:<limit@example.net>"),
                         [b"554 5.6.0 Transaction failed: contact limit reached"])


class DATATests(unittest.TestCase):
    def test_requires_auth(self):
        self.assertEqual(Session().send(b"DATA"), [b"530 5.7.0 Authentication required"])

    def test_requires_mail_and_rcpt(self):
        session = Session()
        session.login()
        self.assertEqual(session.send(b"DATA"),
                         [b"503 5.5.1 valid RCPT and MAIL command must precede DATA"])

    def test_message_accepted_with_send_id(self):
        session = Session()
        session.envelope()
        self.assertEqual(session.send(b"DATA"),
                         [b'354 Enter message, ending with "." on a line by itself'])
        replies = session.send(MESSAGE + b"..leading dot\r\n.", end=b"\r\n")
        self.assertEqual(replies, [b"250 OK id=1166 " + UID.encode()])
        (submission,) = session.service.submissions
        self.assertEqual(submission.sender, "sender@example.org")
        self.assertEqual([r.email for r in submission.recipients], ["rcpt@example.net"])
        self.assertEqual(submission.origin, "smtp")
        self.assertTrue(submission.raw.endswith(b"Hello there\r\n.leading dot\r\n"))
        self.assertEqual(submission.content.subject, "hello")

    def test_empty_data_imports_only(self):
        session = Session()
        session.envelope(b"a@example.net", b"b@example.net")
        session.send(b"DATA")
        self.assertEqual(session.send(b"."), [b"250 OK imported 2"])
        self.assertEqual(session.service.submissions, [])

    def test_too_big_refused_and_not_kept(self):
        session = Session(max_size=1000)
        session.envelope()
        session.send(b"DATA")
        for _ in range(100):
            session.protocol.dataReceived(b"x" * 99 + b"\r\n")
        self.assertLess(sum(map(len, session.protocol._collector._chunks)), 1100)
        self.assertEqual(session.send(b"."),
                         [b"552 5.3.4 message size exceeds fixed maximum message size (1000)"
                          b" bytes"])
        self.assertEqual(session.service.submissions, [])

    def test_content_refused(self):
        session = Session()
        session.service.refuse = ContentNotAccepted("Not allowed attachment type exe")
        self.assertEqual(session.submit(MESSAGE),
                         [b"554 5.6.0 Transaction failed: Not allowed attachment type exe"])

    def test_quota(self):
        session = Session()
        session.service.refuse = SendQuotaExhausted()
        self.assertEqual(session.submit(MESSAGE),
                         [b"554 5.6.0 Transaction failed: no sends left"])

    def test_template_tag_and_variables(self):
        session = Session()
        message = (b"Subject: *|tid:42eqy7oaigql|* Hola {nombre}\r\n"
                   b"Content-Type: text/plain\r\n\r\n{\"nombre\": \"Ana\"}\r\n")
        self.assertEqual(session.submit(message)[0][:3], b"250")
        (submission,) = session.service.submissions
        self.assertEqual(submission.template_id, "42eqy7oaigql")
        self.assertEqual(submission.variables, {"nombre": "Ana"})
        self.assertEqual(submission.content.subject, "Hola {nombre}")

    def test_template_variables_in_an_html_only_body(self):
        """Aldeamo's "Body HTML": the variables are the text of the HTML body."""
        bodies = {
            b"<html><head><title>Pedido</title></head><body>\r\n<p>{&quot;nombre&quot;:"
            b"<br>\r\n \"Ana&nbsp;Mar&iacute;a\"}</p></body></html>":
                {"nombre": "Ana María"},
            b"<html><head><title>Pedido</title></head>\r\n<pre>{\"a\": 1}</pre></html>": {"a": "1"},
            b"<div>null</div>": {},
        }
        for body, variables in bodies.items():
            session = Session()
            message = (b"Subject: *|tid:42eqy7oaigql|* x\r\n"
                       b"Content-Type: text/html; charset=utf-8\r\n\r\n" + body + b"\r\n")
            self.assertEqual(session.submit(message)[0][:3], b"250")
            (submission,) = session.service.submissions
            self.assertEqual(submission.variables, variables)

    def test_bad_variables_in_an_html_only_body(self):
        message = (b"Subject: *|tid:42eqy7oaigql|* x\r\nContent-Type: text/html\r\n\r\n"
                   b"<p>{nombre: Ana}</p>\r\n")
        (reply,) = Session().submit(message)
        self.assertTrue(reply.startswith(b"554 5.6.0 Transaction failed: template variables"
                                         b" are not a valid JSON object"), reply)

    def test_pipelined_transaction(self):
        session = Session()
        session.login()
        replies = session.send(b"MAIL FROM:<sender@example.org>", b"RCPT TO:<a@example.net>",
                               b"DATA", MESSAGE + b".", b"QUIT")
        self.assertEqual([r[:3] for r in replies], [b"250", b"250", b"354", b"250", b"221"])

    def test_bare_lf_message(self):
        session = Session()
        session.envelope()
        session.send(b"DATA", end=b"\n")
        reply = session.send(MESSAGE.replace(b"\r\n", b"\n") + b".", end=b"\n")
        self.assertEqual(reply[0][:3], b"250")

    def test_no_smuggling_through_a_bare_lf_dot(self):
        """A CRLF client's message ends only at CRLF.CRLF: a relay in front of mailgw that
        passes a bare "\\n.\\n" on must not make the rest a second message of its own
        session (SMTP smuggling)."""
        session = Session()
        session.envelope()
        session.send(b"DATA")
        smuggled = (b"Subject: s\r\n\r\nhello\n.\nMAIL FROM:<boss@example.org>\n"
                    b"RCPT TO:<victim@example.net>\nDATA\nSubject: forged\n\nx\n.\n")
        replies = session.send(smuggled + b"end\r\n.")
        self.assertEqual([reply[:3] for reply in replies], [b"250"])
        (submission,) = session.service.submissions
        self.assertIn("MAIL FROM:<boss@example.org>", submission.content.text)

    def test_transaction_reset_after_data(self):
        session = Session()
        session.envelope()
        session.send(b"DATA")
        session.send(MESSAGE + b".")
        self.assertEqual(session.send(b"DATA"),
                         [b"503 5.5.1 valid RCPT and MAIL command must precede DATA"])


class RSETTests(unittest.TestCase):
    def test_forgets_the_transaction_not_the_login(self):
        session = Session()
        session.envelope()
        self.assertEqual(session.send(b"RSET"), [b"250 2.0.0 OK"])
        self.assertEqual(session.send(b"DATA"),
                         [b"503 5.5.1 valid RCPT and MAIL command must precede DATA"])
        self.assertEqual(session.send(b"MAIL FROM:<sender@example.org>"), [b"250 2.1.0 OK"])


class NOOPTests(unittest.TestCase):
    def test_noop(self):
        self.assertEqual(Session().send(b"NOOP"), [b"250 2.0.0 OK"])


class HELPTests(unittest.TestCase):
    def test_help(self):
        self.assertEqual(Session().send(b"HELP")[0][:4], b"214 ")


class VRFYTests(unittest.TestCase):
    def test_vrfy(self):
        self.assertEqual(Session().send(b"VRFY someone")[0][:4], b"252 ")


class QUITTests(unittest.TestCase):
    def test_quit_closes(self):
        session = Session()
        self.assertEqual(session.send(b"QUIT"), [b"221 2.0.0 Closing connection."])
        self.assertTrue(session.transport.disconnecting)


class BadInputTests(unittest.TestCase):
    def test_unknown_command(self):
        self.assertEqual(Session().send(b"FROB"), [b"500 5.5.1 Invalid command"])

    def test_empty_line(self):
        self.assertEqual(Session().send(b""), [b"500 5.5.2 Syntax error"])

    def test_binary_garbage(self):
        replies = Session().send(bytes(range(256)).replace(b"\n", b""))
        self.assertEqual(replies, [b"500 5.5.1 Invalid command"])

    def test_endless_line_then_too_many_errors(self):
        session = Session()
        for _ in range(30):
            session.protocol.dataReceived(b"x" * 5000)
        replies = session.take()
        self.assertIn(b"500 5.5.2 Syntax error: line too long", replies)
        self.assertEqual(replies[-1], b"421 4.7.0 Too many errors, closing connection")
        self.assertTrue(session.transport.disconnecting)


class IdleTimeoutTests(unittest.TestCase):
    def test_idle_session_is_closed_after_the_configured_time(self):
        session = Session()
        session.clock.advance(299)
        session.send(b"NOOP")  # activity restarts the count
        session.clock.advance(299)
        self.assertFalse(session.transport.disconnecting)
        session.clock.advance(1)
        self.assertEqual(session.take(), [b"421 4.4.2 Idle timeout, closing connection"])
        self.assertTrue(session.transport.disconnecting)

    def test_close_that_does_not_finish_ends_in_an_abort(self):
        """R-6: a client that takes no replies, or leaves TLS's close_notify unanswered,
        does not keep the socket of a session mailgw closed."""
        session = Session()
        session.clock.advance(300)
        session.clock.advance(CLOSE_GRACE_SECONDS - 1)
        self.assertFalse(session.transport.disconnected)
        session.clock.advance(1)
        self.assertTrue(session.transport.disconnected)

    def test_no_abort_once_closed(self):
        session = Session()
        session.transport.loseConnection = session.protocol.connectionLost
        session.send(b"QUIT")
        self.assertEqual(session.clock.getDelayedCalls(), [])


class ProgressTests(unittest.TestCase):
    """R-6: a session that sends no message ends, however steadily it talks (the idle
    timeout restarts with every command and every byte of DATA)."""

    TOO_MANY = [b"421 4.7.0 Too many commands without a message, closing connection"]

    def test_message_sent_a_byte_a_minute(self):
        session = Session()
        session.envelope()
        session.send(b"DATA")
        for _ in range(9):
            session.clock.advance(60)
            session.protocol.dataReceived(b"x")
        session.clock.advance(59)
        self.assertFalse(session.transport.disconnecting)
        session.clock.advance(1)
        self.assertEqual(session.take(),
                         [b"421 4.4.2 Message took too long to send, closing connection"])
        self.assertTrue(session.transport.disconnecting)
        self.assertEqual(session.service.imported_alone, ["rcpt@example.net"])

    def test_message_in_time_stops_the_data_clock(self):
        session = Session()
        session.submit(MESSAGE)
        for _ in range(4):
            session.clock.advance(200)
            self.assertEqual(session.send(b"NOOP"), [b"250 2.0.0 OK"])

    def test_noop_every_minute(self):
        session = Session()
        for _ in range(100):
            session.clock.advance(60)
            self.assertEqual(session.send(b"NOOP"), [b"250 2.0.0 OK"])
        self.assertEqual(session.send(b"NOOP"), self.TOO_MANY)
        self.assertTrue(session.transport.disconnecting)

    def test_count_restarts_with_each_message(self):
        session = Session()
        self.assertEqual(session.submit(MESSAGE), [b"250 OK id=1166 " + UID.encode()])
        self.assertEqual(session.send(*[b"NOOP"] * 100), [b"250 2.0.0 OK"] * 100)
        self.assertEqual(session.send(b"NOOP"), self.TOO_MANY)

    def test_recipients_added_do_not_count(self):
        session = Session()
        session.envelope(*[b"r%d@example.net" % i for i in range(150)])
        session.send(b"DATA")
        self.assertEqual(session.send(MESSAGE + b"."), [b"250 OK id=1166 " + UID.encode()])

    def test_recipients_refused_count(self):
        session = Session(max_recipients=1)
        session.envelope()  # EHLO, AUTH, MAIL: 3 commands
        self.assertEqual(session.send(*[b"RCPT TO:<b@example.net>"] * 97),
                         [b"452 4.5.3 Too many recipients"] * 97)
        self.assertEqual(session.send(b"RCPT TO:<b@example.net>"), self.TOO_MANY)


class BackpressureTests(unittest.TestCase):
    """R-6: commands are read only while the client takes its replies. The session's
    producer is paused by the transport while replies are unsent."""

    def test_reading_stops_while_replies_are_unsent(self):
        session = Session()
        session.transport.producer.pauseProducing()
        self.assertEqual(session.send(b"HELP", b"NOOP"), [])
        self.assertEqual(session.transport.producerState, "paused")
        session.transport.producer.resumeProducing()
        self.assertEqual([line[:4] for line in session.take()], [b"214 ", b"250 "])
        self.assertEqual(session.transport.producerState, "producing")

    def test_reply_sent_while_replies_are_unsent_does_not_resume(self):
        session = Session(max_contacts=10)
        session.service.held = []
        session.envelope()  # the RCPT waits for the database
        self.assertEqual(session.send(b"NOOP"), [])
        session.transport.producer.pauseProducing()
        session.service.held.pop().callback(None)
        self.assertEqual(session.take(), [b"250 2.1.5 Accepted"])  # the NOOP still waits
        session.transport.producer.resumeProducing()
        self.assertEqual(session.take(), [b"250 2.0.0 OK"])

    def test_replies_sent_while_a_command_waits_do_not_resume(self):
        session = Session(max_contacts=10)
        session.service.held = []
        session.envelope()
        session.transport.producer.pauseProducing()
        session.transport.producer.resumeProducing()
        self.assertEqual(session.send(b"NOOP"), [])
        session.service.held.pop().callback(None)
        self.assertEqual(session.take(), [b"250 2.1.5 Accepted", b"250 2.0.0 OK"])


class ShutdownTests(unittest.TestCase):
    def test_idle_session_told_and_closed(self):
        session = Session()
        session.protocol.shutdown()
        self.assertEqual(session.take(), [b"421 4.3.2 Service shutting down, closing connection"])
        self.assertTrue(session.transport.disconnecting)

    def test_idle_session_whose_close_does_not_finish_is_cut(self):
        """A client that does not let the close finish (TLS waits for its close_notify)
        is cut after CLOSE_GRACE_SECONDS, not after the whole grace."""
        session = Session()
        session.transport.abortConnection = session.protocol.connectionLost
        stopping = defer.ensureDeferred(session.factory.shutdown(30))
        session.clock.advance(CLOSE_GRACE_SECONDS)
        self.assertIsNone(self.successResultOf(stopping))
        self.assertEqual(session.factory.sessions, set())

    def test_session_still_busy_after_the_grace_is_cut(self):
        session = Session(max_contacts=10)
        session.service.held = []
        session.envelope()  # its RCPT waits for the database
        session.transport.abortConnection = session.protocol.connectionLost
        stopping = defer.ensureDeferred(session.factory.shutdown(30))
        session.clock.advance(29)
        self.assertFalse(stopping.called)
        session.clock.advance(1)
        self.assertIsNone(self.successResultOf(stopping))
        self.assertEqual(session.factory.sessions, set())

    def test_busy_session_closed_after_its_reply_reads_again(self):
        """Reading was paused for the command; the close reads on, for a TLS client's
        close_notify, but takes nothing read as a command."""
        session = Session(max_contacts=10)
        session.service.held = []
        session.envelope()
        session.protocol.shutdown()
        session.service.held.pop().callback(None)
        self.assertEqual(session.take(), [b"250 2.1.5 Accepted",
                                          b"421 4.3.2 Service shutting down, closing connection"])
        self.assertEqual(session.transport.producerState, "producing")

    def test_grace_timer_cancelled_when_all_closed(self):
        session = Session()
        session.transport.loseConnection = session.protocol.connectionLost
        stopping = defer.ensureDeferred(session.factory.shutdown(30))
        self.assertIsNone(self.successResultOf(stopping))
        self.assertEqual(session.clock.getDelayedCalls(), [])


class DataCollectorTests(unittest.TestCase):
    def feed_all(self, *chunks: bytes, limit=1000, bare_lf=False):
        collector = DataCollector(limit, bare_lf)
        for chunk in chunks:
            rest = collector.feed(chunk)
            if rest is not None:
                return collector, rest
        return collector, None

    def test_terminator_split_across_chunks(self):
        collector, rest = self.feed_all(b"line one\r\n", b".", b"\r", b"\nQUIT\r\n")
        self.assertEqual(collector.message(), b"line one\r\n")
        self.assertEqual(rest, b"QUIT\r\n")

    def test_dot_alone_is_empty(self):
        collector, rest = self.feed_all(b".\r\n")
        self.assertEqual(collector.message(), b"")
        self.assertEqual(rest, b"")

    def test_dot_unstuffing(self):
        collector, _ = self.feed_all(b"..one\r\n...\r\nx.y\r\n.\r\n")
        self.assertEqual(collector.message(), b".one\r\n..\r\nx.y\r\n")

    def test_crlf_data_ends_only_at_crlf_dot_crlf(self):
        collector, rest = self.feed_all(b"a\n.\nb\r\n.\n", b"c\r", b"\n.", b"\r\nQUIT\r\n")
        self.assertEqual(collector.message(), b"a\n\nb\r\n\nc\r\n")
        self.assertEqual(rest, b"QUIT\r\n")

    def test_bare_lf_data_ends_at_lf_dot_lf(self):
        collector, rest = self.feed_all(b"a\n", b".", b"\nQUIT\n", bare_lf=True)
        self.assertEqual((collector.message(), rest), (b"a\n", b"QUIT\n"))

    def test_dot_inside_a_line_is_not_the_end(self):
        collector, rest = self.feed_all(b"a\r\n.b\r\n", b"c.\r\n")
        self.assertIsNone(rest)
