"""The `mailgw` admin command (O-4): each command, in-process and as a real program."""

import io
import json
import os
import shutil
import sys
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from mailgw import credentials
from mailgw.accounts.settings import AccountSettings
from mailgw.admin import MAX_WEBHOOKS_PER_ACCOUNT
from mailgw.cli import CommandError, build_parser, run_command
from mailgw.config import Config, DatabaseConfig
from mailgw.errors import AlreadyExists, NotFound
from mailgw.store import Stores
from mailgw.store.database import Database
from mailgw.store.queue_admin import BadQueueRequest, QueueActionRefused
from mailgw.store.statistics import COUNTERS
from mailgw.store.submissions import QueuedRecipient, SubmissionRecord
from tests.harness import QueriesDatabase, fresh_database

MAILGW = str(Path(sys.executable).parent / "mailgw")


class CommandTestCase(QueriesDatabase, unittest.TestCase):
    """`self.command(...)` runs a command in-process, over a fresh database."""

    async def setUp(self):
        dsn = fresh_database()
        self.config = Config(state_dir=self.mktemp(), hostname="mx.gw.example",
                             database=DatabaseConfig(dsn=dsn, pool_size=1))
        self.database = database = Database(dsn, 1, reactor)
        await database.start()
        self.addCleanup(database.close)
        self.stores = Stores.on(database)

    async def command(self, *argv: str, stdin: str = "") -> str:
        out = io.StringIO()
        args = build_parser().parse_args(list(argv))
        await run_command(args, self.config, reactor, out, io.StringIO(stdin))
        return out.getvalue()


class CommandTests(CommandTestCase):
    async def test_init_creates_certificate_and_applies_migrations(self):
        output = await self.command("init")
        self.assertIn("self-signed TLS certificate", output)
        self.assertTrue(self.config.certificate_path.exists())
        self.assertIn("migrations applied", output)
        self.assertNotIn("certificate", await self.command("init"))

    async def test_init_demo_writes_demo_json_once(self):
        output = await self.command("init", "--demo")
        demo = json.loads((self.config.state_path / "demo.json").read_text())
        self.assertEqual(set(demo), {"account", "user", "password", "sender", "api_key"})
        self.assertEqual(demo["account"], "demo")
        for value in demo.values():
            self.assertIn(value, output)
        self.assertIn("swaks --server localhost:58700 --tls --auth LOGIN", output)
        self.assertIn("curl -H 'Authorization: Bearer " + demo["api_key"], output)
        account_id, stored = await self.stores.accounts.password_hash_for(demo["user"])
        self.assertTrue(credentials.verify_password(demo["password"], stored))
        found, grant = await self.stores.accounts.api_key(
            credentials.hash_api_key(demo["api_key"]))
        self.assertEqual((found.id, grant.kind), (account_id, "account"))
        senders = await self.stores.senders.list_senders(account_id)
        self.assertEqual([(s.address, s.verified_at is not None) for s in senders],
                         [(demo["sender"], True)])
        again = await self.command("init", "--demo")
        self.assertNotIn(demo["password"], again)
        self.assertIn("demo.json", again)

    async def test_migrate(self):
        self.assertIn("migrations applied", await self.command("migrate"))

    async def test_account_create_and_list(self):
        self.assertIn("account acme created", await self.command("account", "create", "acme",
                                                             "--plan", "pro"))
        await self.command("account", "create", "beta")
        lines = (await self.command("account", "list")).splitlines()
        self.assertEqual([line.split("\t")[1:3] for line in lines],
                         [["acme", "pro"], ["beta", "default"]])
        with self.assertRaises(AlreadyExists):
            await self.command("account", "create", "acme")

    async def test_account_set_policies_and_limits(self):
        await self.command("account", "create", "acme")
        output = await self.command("account", "set", "acme", "--multipart", "strict",
                                "--attachments", "links", "--archive", "yes",
                                "--sends-per-month", "1000", "--max-contacts", "50",
                                "--allowed-networks", "10.0.0.0/8,192.0.2.7", "--active", "no")
        self.assertIn("account acme updated", output)
        account = await self.stores.accounts.get_account("acme")
        self.assertFalse(account.active)
        await self.command("account", "set", "acme", "--active", "yes",
                           "--categories", "News, Offers,Events")
        profile = await self.stores.accounts.profile(account.id)
        settings, networks = profile.settings, profile.allowed_networks
        max_contacts, sends = profile.max_contacts, profile.sends_per_month
        self.assertEqual(settings, AccountSettings(multipart="strict", attachments="links",
                                                   archive=True,
                                                   categories=("News", "Offers", "Events")))
        self.assertEqual(networks, ["10.0.0.0/8", "192.0.2.7/32"])
        self.assertEqual((max_contacts, sends), (50, 1000))
        await self.command("account", "set", "acme", "--sends-per-month", "none",
                       "--allowed-networks", "any")
        profile = await self.stores.accounts.profile(account.id)
        settings, networks = profile.settings, profile.allowed_networks
        max_contacts, sends = profile.max_contacts, profile.sends_per_month
        self.assertEqual((networks, max_contacts, sends), (None, 50, None))
        self.assertEqual(settings.attachments, "links")
        self.assertEqual(settings.categories, ("News", "Offers", "Events"))
        await self.command("account", "set", "acme", "--categories", "none")
        self.assertEqual((await self.stores.accounts.profile(account.id)).settings.categories,
                         ())
        with self.assertRaises(NotFound):
            await self.command("account", "set", "nobody", "--archive", "no")

    async def test_account_set_switches(self):
        """S-9, T-5: the switches a message can also set, and the account's social links
        and default language, as the README promises."""
        await self.command("account", "create", "acme")
        await self.command("account", "set", "acme", "--track-opens", "no", "--track-clicks",
                           "no", "--show-cab", "no", "--language", "4", "--social-links",
                           "facebook=https://facebook.com/acme, x=https://x.com/acme")
        account = await self.stores.accounts.get_account("acme")
        settings = (await self.stores.accounts.profile(account.id)).settings
        self.assertEqual(settings, AccountSettings(
            show_cab=False, track_opens=False, track_clicks=False, language=4,
            social_links={"facebook": "https://facebook.com/acme", "x": "https://x.com/acme"}))
        await self.command("account", "set", "acme", "--track-opens", "yes",
                           "--social-links", "none")
        settings = (await self.stores.accounts.profile(account.id)).settings
        self.assertEqual((settings.track_opens, settings.social_links, settings.language),
                         (True, {}, 4))

    async def test_account_set_forward_feedback(self):
        """D-7, Aldeamo: feedback forwarding is off until the account asks for it."""
        account = await self.stores.accounts.create_account("acme")
        profile = await self.stores.accounts.profile(account.id)
        self.assertFalse(profile.settings.forward_feedback)
        await self.command("account", "set", "acme", "--forward-feedback", "yes")
        profile = await self.stores.accounts.profile(account.id)
        self.assertTrue(profile.settings.forward_feedback)
        await self.command("account", "set", "acme", "--forward-feedback", "no")
        profile = await self.stores.accounts.profile(account.id)
        self.assertFalse(profile.settings.forward_feedback)
        with self.assertRaises(SystemExit):
            build_parser().parse_args(["account", "set", "acme", "--forward-feedback", "on"])

    def test_account_set_refuses_bad_values(self):
        for argv in (["--sends-per-month", "-3"], ["--allowed-networks", "10.0.0.0/33"],
                     ["--attachments", "drop"], ["--track-opens", "off"], ["--language", "9"],
                     ["--language", "es"], ["--social-links", "facebook"],
                     ["--social-links", "facebook=ftp://x"], ["--show-cab", "YES"],
                     ["--categories", "News,,Offers"], ["--categories", "News,News"],
                     ["--categories", "x" * 65]):
            with self.assertRaises(SystemExit):
                build_parser().parse_args(["account", "set", "acme", *argv])

    async def test_template_set_and_list(self):
        await self.command("account", "create", "acme")
        html = Path(self.mktemp())
        html.write_text("<p>Hola {nombre}</p>")
        output = await self.command("template", "set", "acme", "welcome1", "--name", "Welcome",
                                "--subject", "Hi", "--html-file", str(html))
        self.assertIn("template welcome1 saved", output)
        self.assertEqual(await self.command("template", "list", "acme"), "welcome1\tWelcome\tHi\n")
        account = await self.stores.accounts.get_account("acme")
        template = await self.stores.templates.get(account.id, "welcome1")
        self.assertEqual((template.html, template.text), ("<p>Hola {nombre}</p>", None))
        with self.assertRaises(CommandError):
            await self.command("template", "set", "acme", "empty")

    async def test_user_create_generates_a_password(self):
        await self.command("account", "create", "acme")
        output = await self.command("user", "create", "acme", "acme.pro")
        password = output.split("password: ")[1].strip()
        _, stored = await self.stores.accounts.password_hash_for("acme.pro")
        self.assertTrue(stored.startswith("scrypt$"))
        self.assertTrue(credentials.verify_password(password, stored))

    async def test_user_create_password_from_stdin(self):
        await self.command("account", "create", "acme")
        output = await self.command("user", "create", "acme", "u", "--password-stdin",
                                stdin="chosen secret\n")
        self.assertNotIn("chosen secret", output)
        _, stored = await self.stores.accounts.password_hash_for("u")
        self.assertTrue(credentials.verify_password("chosen secret", stored))
        with self.assertRaises(CommandError):
            await self.command("user", "create", "acme", "v", "--password-stdin", stdin="\n")

    async def test_user_for_unknown_account(self):
        with self.assertRaises(NotFound):
            await self.command("user", "create", "nobody", "u")

    async def test_apikey_shown_once_stored_hashed(self):
        await self.command("account", "create", "acme")
        key = (await self.command("apikey", "create", "acme", "--name", "ci")).splitlines()[-1]
        self.assertTrue(key.startswith(credentials.API_KEY_PREFIX))
        account, grant = await self.stores.accounts.api_key(credentials.hash_api_key(key))
        self.assertEqual((account.name, grant.kind), ("acme", "account"))

    async def test_apikey_kinds_list_and_revoke(self):
        """H-3: the same key kinds as the management API, through the same functions."""
        await self.command("account", "create", "acme")
        account = await self.stores.accounts.get_account("acme")
        await self.sql("INSERT INTO campaigns (account_id, type, numid) VALUES (%s, 'api', 5)",
                       account.id)
        for args, kind, operator in ((["--kind", "admin"], "admin", False),
                                     (["--kind", "campaign", "--campaign", "5"], "campaign",
                                      False),
                                     (["--operator"], "admin", True)):
            key = (await self.command("apikey", "create", "acme", *args)).splitlines()[-1]
            _, grant = await self.stores.accounts.api_key(credentials.hash_api_key(key))
            self.assertEqual((grant.kind, grant.operator), (kind, operator))
        for wrong in (["--kind", "campaign"], ["--kind", "admin", "--campaign", "5"],
                      ["--kind", "campaign", "--campaign", "6"],
                      ["--kind", "campaign", "--campaign", "5", "--operator"]):
            with self.assertRaises((CommandError, NotFound)):
                await self.command("apikey", "create", "acme", *wrong)
        listing = await self.command("apikey", "list", "acme")
        self.assertIn("campaign 5", listing)
        self.assertIn("operator", listing)
        key_id = listing.split()[0]
        await self.command("apikey", "revoke", "acme", key_id)
        self.assertIn("revoked", (await self.command("apikey", "list", "acme")).splitlines()[0])

    async def test_webhooks_and_suppressions(self):
        await self.command("account", "create", "acme")
        output = await self.command("webhook", "add", "acme", "https://hooks.example/in",
                                    "--events", "sent,open")
        secret = output.splitlines()[-1]
        self.assertEqual(len(secret), 43)
        [(endpoint_id, stored)] = await self.sql("SELECT id, secret FROM webhook_endpoints")
        self.assertEqual(secret, stored)  # the one the posts are signed with
        self.assertIn(f"{endpoint_id}\thttps://hooks.example/in\tsent,open\tdropped 0",
                      await self.command("webhook", "list", "acme"))
        self.assertIn("removed", await self.command("webhook", "remove", "acme",
                                                    str(endpoint_id)))
        self.assertEqual(await self.command("webhook", "list", "acme"), "")
        for _ in range(MAX_WEBHOOKS_PER_ACCOUNT):
            await self.command("webhook", "add", "acme", "https://hooks.example/in")
        with self.assertRaises(CommandError):
            await self.command("webhook", "add", "acme", "https://hooks.example/in")
        for refused in ("http://hooks.example/in", "http://127.0.0.1:9000/in"):
            with self.assertRaises(CommandError):  # http only to allow_http_hosts: none
                await self.command("webhook", "add", "acme", refused)
        await self.command("suppression", "add", "acme", "Ana@Example.net")
        self.assertIn("ana@example.net\t*\t*\tmanual",
                      await self.command("suppression", "list", "acme", "--domain",
                                         "example.net"))
        self.assertIn("1 suppressions removed", await self.command(
            "suppression", "remove", "acme", "--address", "ana@example.net"))
        with self.assertRaises(CommandError):
            await self.command("suppression", "remove", "acme")

    async def test_domain_add_prints_dns_records(self):
        await self.command("account", "create", "acme")
        output = await self.command("domain", "add", "acme", "Example.org", "--selector", "s1")
        self.assertIn('s1._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=', output)
        self.assertIn("include:_spf.mx.gw.example", output)
        self.assertIn("bounces.example.org. IN MX 10 mx.gw.example.", output)
        output = await self.command("domain", "add", "acme", "ed.example.org", "--algorithm",
                                "ed25519", "--return-path-domain", "rp.example.org")
        self.assertIn("k=ed25519", output)
        self.assertIn("rp.example.org. IN MX", output)
        self.assertIn("verified", await self.command("domain", "verify", "acme", "example.org"))
        with self.assertRaises(NotFound):
            await self.command("domain", "verify", "acme", "nowhere.example")

    async def test_sender_add_and_verify(self):
        await self.command("account", "create", "acme")
        self.assertIn("(verified)", await self.command("sender", "add", "acme", "a@example.org",
                                                   "--verified"))
        await self.command("sender", "add", "acme", "b@example.org")
        await self.command("sender", "verify", "acme", "b@example.org")
        account = await self.stores.accounts.get_account("acme")
        senders = await self.stores.senders.list_senders(account.id)
        self.assertTrue(all(s.verified_at for s in senders))
        with self.assertRaises(CommandError):
            await self.command("sender", "add", "acme", "not-an-address")


class QueueCommandTests(CommandTestCase):
    """O-7: `mailgw queue`, over the queue a submission filled."""

    async def setUp(self):
        await super().setUp()
        account = await self.stores.accounts.create_account("acme")
        stored = await self.stores.submissions.store(SubmissionRecord(
            account_id=account.id, origin="smtp", message_uid="a" * 32,
            sender="news@example.org", subject="Ofertas", html=None, body={"text": "x"},
            recipients=(QueuedRecipient("Ana@example.net", None),
                        QueuedRecipient("bea@example.net", None),
                        QueuedRecipient("cris@other.example", None))))
        self.ids = [row[0] for row in await self.sql(
            "SELECT id FROM deliveries WHERE message_id = %s ORDER BY id",
            stored.message_id)]

    async def test_list_counts_and_deliveries(self):
        output = await self.command("queue", "list", "--deliveries", "5")
        lines = output.splitlines()
        self.assertEqual(lines[0], "state\taccount\tdomain\tdeliveries\theld\toldest")
        self.assertEqual([line.split("\t")[:5] for line in lines[1:3]],
                         [["queued", "acme", "example.net", "2", "0"],
                          ["queued", "acme", "other.example", "1", "0"]])
        self.assertEqual(lines[3], "total\t3")
        self.assertIn(f"{self.ids[0]}\tacme\tAna@example.net\tqueued\t0\t", output)
        self.assertEqual(await self.command("queue", "list", "--state", "sent"),
                         "no deliveries match\n")
        self.assertIn("total\t1", await self.command("queue", "list", "--domain",
                                                     "other.example"))

    async def test_show_retry_and_cancel(self):
        first = self.ids[0]
        await self.sql("UPDATE deliveries SET state = 'deferred',"
                      " attempts = 1, last_reply = '451 later',"
                      " next_attempt_at = now() + interval '1 hour' WHERE id = %s", first)
        self.assertIn(f"delivery {first} to Ana@example.net is due now",
                      await self.command("queue", "retry", str(first)))
        shown = await self.command("queue", "show", str(first))
        self.assertIn(f"{first}\tacme\tAna@example.net\tdeferred\t1\t", shown)
        self.assertIn("from news@example.org: Ofertas", shown)
        self.assertIn("\tqueued", shown)
        await self.sql("UPDATE deliveries SET state = 'deferred',"
                      " next_attempt_at = now() + interval '1 hour'")
        self.assertEqual(await self.command("queue", "retry", "--domain", "example.net"),
                         "2 deferred deliveries to example.net are due now\n")
        output = await self.command("queue", "cancel", str(first), "--reason", "bounced by hand")
        self.assertIn("cancelled: not_sent (cancelled by the operator: bounced by hand)",
                      output)
        self.assertIn("\tnot_sent\tcancelled by the operator: bounced by hand",
                      await self.command("queue", "show", str(first)))

    async def test_suspend_resume(self):
        self.assertIn("example.net suspended: 2 deliveries held",
                      await self.command("queue", "suspend", "Example.NET", "--reason", "MX down"))
        self.assertRegex(await self.command("queue", "suspended"),
                         r"^example\.net\t\S+ \S+ UTC\t2 held\tMX down\n$")
        listed = await self.command("queue", "list", "--domain", "example.net", "--deliveries",
                                    "2")
        self.assertIn("queued\tacme\texample.net\t2\t2\t", listed)
        self.assertIn("held (domain suspended)", listed)
        self.assertIn("example.net resumed: 2 held deliveries are due now",
                      await self.command("queue", "resume", "example.net"))

    async def test_bad_input_changes_nothing(self):
        """Issue 16, point 6: each a clear message; the queue is as it was."""
        before = await self.sql("SELECT * FROM deliveries ORDER BY id")
        await self.command("queue", "suspend", "other.example")
        for argv, error, message in (
                (["retry", str(self.ids[2])], QueueActionRefused, "other.example is suspended"),
                (["suspend", "other.example"], QueueActionRefused, "already suspended"),
                (["resume", "example.net"], QueueActionRefused, "example.net is not suspended"),
                (["retry", "--domain", "example.net"], QueueActionRefused,
                 "no deferred deliveries to example.net"),
                (["retry", "999999"], NotFound, "no delivery 999999"),
                (["cancel", "999999"], NotFound, "no delivery 999999"),
                (["list", "--state", "lost"], BadQueueRequest, "state must be one of"),
                (["list", "--account", "nobody"], NotFound, "no account named 'nobody'"),
                (["list", "--domain", "*.example"], BadQueueRequest, "not a domain name"),
                (["list", "--deliveries", "100000"], BadQueueRequest, "1 to 1000"),
                (["suspend", "localhost"], BadQueueRequest, "not a domain name"),
                (["retry"], CommandError, "a delivery id or --domain"),
                (["retry", "1", "--domain", "example.net"], CommandError, "one of them")):
            with self.assertRaises(error, msg=argv) as caught:
                await self.command("queue", *argv)
            self.assertIn(message, str(caught.exception))
        await self.sql("UPDATE deliveries SET state = 'sent'"
                      " WHERE id = %s", self.ids[0])
        with self.assertRaises(QueueActionRefused) as caught:
            await self.command("queue", "retry", str(self.ids[0]))
        self.assertIn("is sent: it is not in the queue, nothing to retry", str(caught.exception))
        await self.command("queue", "resume", "other.example")
        await self.sql("UPDATE deliveries SET state = 'queued'"
                      " WHERE id = %s", self.ids[0])
        self.assertEqual(
            [row[:8] + row[9:14] for row in await self.sql(
                "SELECT * FROM deliveries ORDER BY id")],
            [row[:8] + row[9:14] for row in before])
        for value in ("abc", "-1", "0"):
            with self.assertRaises(SystemExit):
                build_parser().parse_args(["queue", "show", value])


class ProgramTests(unittest.TestCase):
    """The installed `mailgw` program, as an operator runs it."""

    async def mailgw(self, *argv: str, env=None):
        out, err, code = await getProcessOutputAndValue(
            MAILGW, list(argv), env=env or dict(os.environ))
        return out.decode(), err.decode(), code

    async def test_help(self):
        out, _, code = await self.mailgw("--help")
        self.assertEqual(code, 0)
        for command in ("init", "migrate", "account", "user", "apikey", "domain", "sender",
                        "queue"):
            self.assertIn(command, out)

    async def test_bad_config_names_the_key(self):
        path = Path(self.mktemp())
        path.write_text("[smtp]\nmax_size = 3\n")
        _, err, code = await self.mailgw("-c", str(path), "account", "list")
        self.assertEqual(code, 1)
        self.assertIn("smtp.max_size: unknown key", err)
        self.assertNotIn("Traceback", err)

    async def test_queue_refusal_is_one_line(self):
        path = Path(self.mktemp())
        path.write_text(f'[database]\ndsn = "{fresh_database()}"\n')
        for argv, message in ((["suspend", "*"], "mailgw: not a domain name: '*'\n"),
                              (["resume", "example.net"],
                               "mailgw: example.net is not suspended\n")):
            _, err, code = await self.mailgw("-c", str(path), "queue", *argv)
            self.assertEqual((code, err), (1, message))

    async def test_unreachable_database_is_one_line(self):
        path = Path(self.mktemp())
        path.write_text('[database]\ndsn = "host=/nonexistent dbname=x"\n')
        _, err, code = await self.mailgw("-c", str(path), "account", "list")
        self.assertEqual(code, 1)
        self.assertIn("cannot connect to the database", err)
        self.assertNotIn("Traceback", err)

    async def test_embedded_database_started_for_the_command(self):
        state = tempfile.mkdtemp(prefix="mailgw-test-cli-")
        os.chmod(state, 0o755)
        self.addCleanup(shutil.rmtree, state, True)
        path = Path(self.mktemp())
        path.write_text(f'state_dir = "{state}"\n')
        out, err, code = await self.mailgw("-c", str(path), "init", "--demo")
        self.assertEqual(code, 0, err)
        self.assertTrue(Path(state, "demo.json").exists())
        out, err, code = await self.mailgw("-c", str(path), "account", "list")
        self.assertEqual(code, 0, err)
        self.assertIn("\tdemo\t", out)
        self.assertFalse(Path(state, "pg", "data", "postmaster.pid").exists(),
                         "the command stops the cluster it started")


class StatsCommandTests(unittest.TestCase):
    setUp = CommandTests.setUp
    command = CommandTests.command

    async def test_stats_send_and_account(self):
        await self.command("account", "create", "acme")
        account = await self.stores.accounts.get_account("acme")
        stored = await self.stores.submissions.store(SubmissionRecord(
            account_id=account.id, origin="smtp", message_uid=uuid.uuid4().hex,
            sender="news@example.org", subject="Spring", html=None, body={"subject": "s"},
            recipients=(QueuedRecipient("ana@example.net", None),)))
        output = await self.command("stats", "send", str(stored.send_id))
        self.assertIn(f"send {stored.send_id} (Spring)", output)
        lines = output.splitlines()
        self.assertEqual(lines[1].split(), ["counter", "value"])
        self.assertEqual([line.split()[0] for line in lines[2:]], list(COUNTERS))
        self.assertEqual(lines[2].split(), ["recipients", "1"])
        today = datetime.now(ZoneInfo("America/Bogota")).date().isoformat()
        output = await self.command("stats", "account", "acme", "--from", today, "--to", today)
        lines = output.splitlines()
        self.assertIn("account acme, America/Bogota", lines[0])
        self.assertEqual(lines[1].split(), ["date", *COUNTERS])
        self.assertEqual(lines[2].split()[:2], [today, "1"])
        self.assertEqual(lines[3].split()[:2], ["total", "1"])
        with self.assertRaises(CommandError):
            await self.command("stats", "send", str(stored.send_id + 1))
        with self.assertRaises(CommandError):
            await self.command("stats", "account", "acme", "--from", "soon")
        with self.assertRaises(NotFound):
            await self.command("stats", "account", "nobody")
