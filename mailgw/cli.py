"""The `mailgw` admin command (O-4): set up, migrate and manage accounts.

Non-interactive: every value comes from arguments (or standard input for a
password), so it can run from scripts and configuration management.  Each
command is an `async` function over the same Stores the server uses.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TextIO

from twisted.internet import defer, task

from mailgw import admin, credentials
from mailgw.accounts.settings import (
    ATTACHMENT_MODES,
    MAX_CATEGORIES,
    MULTIPART_MODES,
    AccountSettings,
    category_name,
)
from mailgw.config import Config, ConfigError, load_config
from mailgw.content.dkim import DKIM_ALGORITHMS
from mailgw.content.footer_texts import LANGUAGES
from mailgw.errors import AlreadyExists, DatabaseUnavailable, NotFound, StartupError
from mailgw.gateway import embedded_cluster, open_database
from mailgw.store import Stores
from mailgw.store.accounts import KEY_KINDS
from mailgw.store.queue_admin import (
    DELIVERY_STATES,
    MAX_LISTED,
    MAX_REASON_LENGTH,
    BadQueueRequest,
    DeliverySummary,
    QueueActionRefused,
    QueueFilter,
)
from mailgw.store.statistics import COUNTERS, account_zone, time_range
from mailgw.store.suppressions import SuppressionFilter
from mailgw.store.templates import Template
from mailgw.store.webhooks import WEBHOOK_NAMES
from mailgw.tlscert import ensure_self_signed

DEMO_ACCOUNT = "demo"
DEMO_USER = "demo.free"
DEMO_DOMAIN = "example.com"
DEMO_SENDER = "demo@example.com"


class CommandError(Exception):
    """A command cannot do what was asked; the message says why."""


# An option not given (as opposed to one given as "none", which clears the value).
_UNSET = object()


def _limit(value: str) -> int | None:
    if value == "none":
        return None
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number or 'none', not {value!r}")
    return int(value)


def _networks(value: str) -> list[str] | None:
    if value == "any":
        return None
    try:
        return [str(ipaddress.ip_network(n.strip(), strict=False)) for n in value.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _categories(value: str) -> tuple[str, ...]:
    if value == "none":
        return ()
    names = tuple(name.strip() for name in value.split(","))
    bad = [name for name in names if not category_name(name)]
    if bad:
        raise argparse.ArgumentTypeError(f"not a category name: {bad[0]!r} (1 to 64 "
                                         "printable characters)")
    if len(set(names)) != len(names) or len(names) > MAX_CATEGORIES:
        raise argparse.ArgumentTypeError(f"at most {MAX_CATEGORIES} categories, each once")
    return names


def _yes_no(value: str) -> bool:
    if value not in ("yes", "no"):
        raise argparse.ArgumentTypeError(f"yes or no, not {value!r}")
    return value == "yes"


def _social_links(value: str) -> dict[str, str]:
    """`network=url,...` (S-9), each URL http(s), as the footer shows only those; `none`
    removes them all."""
    if value == "none":
        return {}
    links = {}
    for item in value.split(","):
        network, equals, url = (part.strip() for part in item.partition("="))
        if not (network and equals and url.lower().startswith(("http://", "https://"))
                and url.isprintable() and " " not in url):
            raise argparse.ArgumentTypeError(
                f"network=https://... (comma-separated) or 'none', not {item.strip()!r}")
        links[network] = url
    return links


def _language(value: str) -> int:
    if not (value.isascii() and value.isdigit() and int(value) in LANGUAGES):
        known = ", ".join(map(str, sorted(LANGUAGES)))
        raise argparse.ArgumentTypeError(f"one of {known} (S-9 language ids), not {value!r}")
    return int(value)


def _delivery_id(value: str) -> int:
    if not (value.isascii() and value.isdigit() and 0 < int(value) < 2**63):
        raise argparse.ArgumentTypeError(f"a delivery id (a whole number), not {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailgw", description="mailgw administration")
    parser.add_argument("-c", "--config", help="TOML configuration file (default: built-in "
                        "defaults, embedded database under ./var)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser("init", help="create the state dir, TLS certificate and "
                               "database, apply migrations")
    init.add_argument("--demo", action="store_true", help="also create a demo account and "
                      "write its credentials to <state_dir>/demo.json")
    commands.add_parser("migrate", help="apply pending schema migrations")

    account = commands.add_parser("account", help="accounts").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    create = account.add_parser("create", help="create an account")
    create.add_argument("name")
    create.add_argument("--plan", default="default")
    create.add_argument("--timezone", default="America/Bogota",
                        help="time zone of the account's webhook timestamps (default GMT-5)")
    account.add_parser("list", help="list accounts")
    update = account.add_parser("set", help="change an account's policies and limits")
    update.add_argument("name")
    update.add_argument("--multipart", choices=MULTIPART_MODES,
                        help="a message without text or HTML: generate the missing part "
                        "(default) or refuse it (strict, as Teenvio)")
    update.add_argument("--attachments", choices=ATTACHMENT_MODES,
                        help="keep (default), links (stored, replaced by download links) or "
                        "reject (Devino)")
    update.add_argument("--archive", choices=("yes", "no"), help="keep raw messages")
    update.add_argument("--sends-per-month", type=_limit, metavar="N|none", default=_UNSET,
                        help="recipients that may be queued per calendar month")
    update.add_argument("--max-contacts", type=_limit, metavar="N|none", default=_UNSET)
    update.add_argument("--allowed-networks", type=_networks, metavar="CIDR,...|any",
                        default=_UNSET,
                        help="client networks allowed to AUTH (Devino); any = everywhere")
    update.add_argument("--active", choices=("yes", "no"))
    update.add_argument("--timezone")
    update.add_argument("--track-opens", type=_yes_no, metavar="yes|no",
                        help="the open pixel (T-5; a message can still turn it off)")
    update.add_argument("--track-clicks", type=_yes_no, metavar="yes|no",
                        help="tracked links (T-5; a message can still turn them off)")
    update.add_argument("--show-cab", type=_yes_no, metavar="yes|no",
                        help="the \"view it in your browser\" line on top (S-9)")
    update.add_argument("--social-links", type=_social_links, metavar="NETWORK=URL,...|none",
                        help="profile links shown in the footer of messages that ask for "
                        "them (X-Teenvio-SocialLinks: yes)")
    update.add_argument("--language", type=_language, metavar="N",
                        help="language of the inserted texts when a message names none "
                        "(X-Teenvio-Language ids; default 3, Spanish)")
    update.add_argument("--forward-feedback", type=_yes_no, metavar="yes|no",
                        help="send a notice of each bounce and complaint to the envelope "
                        "sender of the message (Aldeamo's feedback forwarding)")
    update.add_argument("--categories", type=_categories, metavar="NAME,...|none",
                        help="campaign categories recipients may unsubscribe from one by "
                        "one on the unsubscribe page (none: the sender's domain only)")

    user = commands.add_parser("user", help="SMTP users").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    create = user.add_parser("create", help="create a user (prints a generated password "
                             "unless --password-stdin)")
    create.add_argument("account")
    create.add_argument("username", help="e.g. user.plan (Teenvio style)")
    create.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")

    apikey = commands.add_parser("apikey", help="API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    create = apikey.add_parser("create", help="create an API key (shown once)")
    create.add_argument("account")
    create.add_argument("--name", default="")
    create.add_argument("--kind", choices=KEY_KINDS, default="account",
                        help="account: sends and reads (default); admin: also manages the "
                        "account under /v1/admin/; campaign: sends for one campaign only")
    create.add_argument("--campaign", type=int, metavar="NUMID",
                        help="the campaign of a campaign key")
    create.add_argument("--operator", action="store_true",
                        help="an admin key that manages every account (the installation's "
                        "operator)")
    listing = apikey.add_parser("list", help="list an account's API keys")
    listing.add_argument("account")
    revoke = apikey.add_parser("revoke", help="revoke an API key")
    revoke.add_argument("account")
    revoke.add_argument("key_id", type=int)

    webhook = commands.add_parser("webhook", help="webhook endpoints").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    add = webhook.add_parser("add", help="add an endpoint (its signing secret shown once)")
    add.add_argument("account")
    add.add_argument("url")
    add.add_argument("--events", default=",".join(WEBHOOK_NAMES),
                     help="comma-separated event types (default: every W-1 type)")
    listing = webhook.add_parser("list", help="list an account's endpoints: id, URL, event "
                                 "types, posts dropped past the queue cap")
    listing.add_argument("account")
    remove = webhook.add_parser("remove", help="remove an endpoint and its queued posts")
    remove.add_argument("account")
    remove.add_argument("endpoint_id", type=int)

    suppression = commands.add_parser("suppression", help="the suppression list"
                                      ).add_subparsers(dest="action", required=True,
                                                       metavar="ACTION")
    add = suppression.add_parser("add", help="never send to an address")
    add.add_argument("account")
    add.add_argument("address")
    add.add_argument("--sender-domain", help="only for mail from this sender domain")
    add.add_argument("--category", help="only for this campaign category")
    for action, text in (("list", "list suppressions"),
                         ("remove", "remove suppressions (by address or domain)")):
        which = suppression.add_parser(action, help=text)
        which.add_argument("account")
        which.add_argument("--address")
        which.add_argument("--domain", help="every address at this recipient domain")

    domain = commands.add_parser("domain", help="sender domains").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    add = domain.add_parser("add", help="register a domain, generate its DKIM key and print "
                            "the DNS records to publish")
    add.add_argument("account")
    add.add_argument("domain")
    add.add_argument("--algorithm", choices=DKIM_ALGORITHMS, default="rsa")
    add.add_argument("--selector", default="mailgw")
    add.add_argument("--return-path-domain", help="bounce domain (default bounces.<domain>)")
    add.add_argument("--verified", action="store_true", help="mark verified at once")
    verify = domain.add_parser("verify", help="mark a domain verified")
    verify.add_argument("account")
    verify.add_argument("domain")

    template = commands.add_parser("template", help="stored templates (Aldeamo template_id)"
                                   ).add_subparsers(dest="action", required=True,
                                                    metavar="ACTION")
    put = template.add_parser("set", help="create or replace a template")
    put.add_argument("account")
    put.add_argument("template_id")
    put.add_argument("--name", default="")
    put.add_argument("--subject", default="")
    put.add_argument("--html-file", type=argparse.FileType("r", encoding="utf-8"))
    put.add_argument("--text-file", type=argparse.FileType("r", encoding="utf-8"))
    listing = template.add_parser("list", help="list an account's templates")
    listing.add_argument("account")

    sender = commands.add_parser("sender", help="sender addresses").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    add = sender.add_parser("add", help="register a sender address")
    add.add_argument("account")
    add.add_argument("address")
    add.add_argument("--verified", action="store_true", help="mark verified at once")
    verify = sender.add_parser("verify", help="mark a sender address verified")
    verify.add_argument("account")
    verify.add_argument("address")

    queue = commands.add_parser("queue", help="the delivery queue (O-7)").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    listing = queue.add_parser("list", help="deliveries counted by state, account and "
                               "recipient domain (by default those waiting: queued and "
                               "deferred)")
    listing.add_argument("--state", help=f"one of {', '.join(DELIVERY_STATES)}")
    listing.add_argument("--account", help="an account name")
    listing.add_argument("--domain", help="a recipient domain")
    listing.add_argument("--deliveries", type=int, metavar="N", default=0,
                         help=f"also list the first N of them, the next due first "
                         f"(at most {MAX_LISTED})")
    show = queue.add_parser("show", help="one delivery, with its attempts and the remote "
                            "replies")
    show.add_argument("delivery_id", type=_delivery_id)
    retry = queue.add_parser("retry", help="try a waiting delivery now, or every deferred "
                             "delivery to a domain")
    retry.add_argument("delivery_id", type=_delivery_id, nargs="?")
    retry.add_argument("--domain", help="every deferred delivery to this recipient domain")
    cancel = queue.add_parser("cancel", help="never send a waiting delivery (recorded as "
                              "not_sent with the reason)")
    cancel.add_argument("delivery_id", type=_delivery_id)
    cancel.add_argument("--reason", default="", help=f"at most {MAX_REASON_LENGTH} "
                        "characters")
    suspend = queue.add_parser("suspend", help="hold every delivery to a recipient domain, "
                               "on every node, until resumed")
    suspend.add_argument("domain")
    suspend.add_argument("--reason", default="")
    resume = queue.add_parser("resume", help="end a suspension: the held deliveries are due "
                              "now")
    resume.add_argument("domain")
    queue.add_parser("suspended", help="the suspended recipient domains")

    stats = commands.add_parser("stats", help="statistics (as GET /v1/stats)").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    send = stats.add_parser("send", help="a send's counters")
    send.add_argument("send_id", type=int)
    per_day = stats.add_parser("account", help="an account's counters per day, in its time "
                               "zone, and in total")
    per_day.add_argument("name")
    per_day.add_argument("--from", dest="start", metavar="ISO",
                         help="a date (that day in the account's time zone) or a time; "
                         "default: 30 days before --to")
    per_day.add_argument("--to", dest="end", metavar="ISO",
                         help="a date (included) or a time; default: now")
    return parser


@asynccontextmanager
async def cli_stores(config: Config, reactor) -> AsyncIterator[Stores]:
    """Stores over the configured database; starts the embedded one for a while if needed."""
    cluster = None
    if not config.database.dsn:
        cluster = embedded_cluster(config)
        cluster.initialize()
        if cluster.running_pid() is None:
            cluster.start()
        else:
            cluster.ensure_database()
            cluster = None  # a running mailgw owns it: leave it running
    try:
        database = await open_database(config, reactor)
        try:
            yield Stores.on(database)
        finally:
            database.close()
    finally:
        if cluster is not None:
            cluster.stop()


async def run_command(args: argparse.Namespace, config: Config, reactor, out: TextIO,
                      stdin: TextIO = sys.stdin) -> None:
    """Carry out one parsed command, printing to `out`."""
    if args.command == "init":
        config.state_path.mkdir(parents=True, exist_ok=True)
        if not config.tls.certificate and ensure_self_signed(
                config.certificate_path, config.private_key_path, config.hostname):
            print(f"created a self-signed TLS certificate: {config.certificate_path}", file=out)
    async with cli_stores(config, reactor) as stores:
        if args.command == "init":
            print("database ready, migrations applied", file=out)
            if args.demo:
                await _create_demo(stores, config, out)
        elif args.command == "migrate":
            print("migrations applied", file=out)
        else:
            try:
                await COMMANDS[args.command, args.action](stores, args, config, out, stdin)
            except admin.AdminRefused as refusal:
                raise CommandError(str(refusal)) from None


async def _account_create(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.create_account(args.name, args.plan, args.timezone)
    print(f"account {account.name} created (id {account.id})", file=out)


async def _account_list(stores, args, config, out, stdin) -> None:
    for account in await stores.accounts.list_accounts():
        state = "active" if account.active else "inactive"
        print(f"{account.id}\t{account.name}\t{account.plan}\t{account.timezone}\t{state}",
              file=out)


async def _account_set(stores, args, config, out, stdin) -> None:
    settings = AccountSettings.changes(
        multipart=args.multipart, attachments=args.attachments,
        archive=None if args.archive is None else args.archive == "yes",
        track_opens=args.track_opens, track_clicks=args.track_clicks,
        show_cab=args.show_cab, social_links=args.social_links, language=args.language,
        categories=args.categories, forward_feedback=args.forward_feedback)
    columns = {column: getattr(args, column)
               for column in ("sends_per_month", "max_contacts", "allowed_networks")
               if getattr(args, column) is not _UNSET}
    if args.timezone is not None:
        columns["timezone"] = args.timezone
    if args.active is not None:
        columns["active"] = args.active == "yes"
    await stores.accounts.update_account(args.name, settings, columns)
    print(f"account {args.name} updated", file=out)


async def _template_set(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    html = args.html_file.read() if args.html_file else None
    text = args.text_file.read() if args.text_file else None
    if html is None and text is None:
        raise CommandError("a template needs --html-file or --text-file")
    await stores.templates.put(account.id, Template(args.template_id, args.name, args.subject,
                                                    html, text))
    print(f"template {args.template_id} saved for account {account.name}", file=out)


async def _template_list(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    for template in await stores.templates.list(account.id):
        print(f"{template.template_id}\t{template.name}\t{template.subject}", file=out)


async def _user_create(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    given = None
    if args.password_stdin:
        given = stdin.readline().rstrip("\r\n")
        if not given:
            raise CommandError("no password on standard input")
    password = await admin.create_user(stores, account.id, args.username, given)
    print(f"user {args.username} created for account {account.name}", file=out)
    if given is None:
        print(f"password: {password}", file=out)


async def _apikey_create(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    kind = "admin" if args.operator else args.kind
    if args.operator and args.kind not in ("account", "admin"):
        raise CommandError("an operator key is an admin key")
    info, key = await admin.create_api_key(stores, account.id, args.name, kind, args.campaign,
                                           args.operator)
    what = "operator key" if info.operator else f"{info.kind} key"
    print(f"API {what} {info.id} for account {account.name} (shown only now, stored "
          "hashed):", file=out)
    print(key, file=out)


async def _apikey_list(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    for key in await stores.accounts.list_api_keys(account.id, limit=None):
        state = "revoked" if key.revoked_at else "active"
        kind = "operator" if key.operator else key.kind
        campaign = "" if key.campaign_numid is None else f" campaign {key.campaign_numid}"
        print(f"{key.id}\t{key.prefix}...\t{kind}{campaign}\t{key.name}\t{state}", file=out)


async def _apikey_revoke(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    await stores.accounts.revoke_api_key(account.id, args.key_id)
    print(f"API key {args.key_id} revoked", file=out)


async def _webhook_add(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    events = [event.strip() for event in args.events.split(",") if event.strip()]
    endpoint, secret = await admin.add_webhook(stores, account.id, args.url, events,
                                               config.webhooks.allow_http_hosts)
    print(f"webhook endpoint {endpoint.id} added; its signing secret (shown only now):",
          file=out)
    print(secret, file=out)


async def _webhook_list(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    for endpoint in await stores.webhooks.list(account.id, limit=None):
        print(f"{endpoint.id}\t{endpoint.url}\t{','.join(endpoint.event_types)}"
              f"\tdropped {endpoint.dropped_count}", file=out)


async def _webhook_remove(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    await stores.webhooks.delete(account.id, args.endpoint_id)
    print(f"webhook endpoint {args.endpoint_id} removed", file=out)


async def _suppression_add(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    added = await admin.add_suppression(stores, account.id, args.address,
                                        args.sender_domain, args.category)
    print(f"{added.address} suppressed", file=out)


def _suppression_filter(args) -> SuppressionFilter:
    if not (args.address or args.domain):
        raise CommandError("give --address or --domain")
    return SuppressionFilter(args.address and args.address.lower(),
                             args.domain and args.domain.lower())


async def _suppression_list(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    for row in await stores.suppressions.list(account.id, _suppression_filter(args),
                                              limit=None):
        print(f"{row.id}\t{row.address}\t{row.scope_domain or '*'}\t{row.category or '*'}"
              f"\t{row.reason}", file=out)


async def _suppression_remove(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    removed = await stores.suppressions.remove(account.id, _suppression_filter(args))
    print(f"{removed} suppressions removed", file=out)


async def _domain_add(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    domain = await admin.add_domain(stores, account.id, args.domain, args.algorithm,
                                    args.selector, args.return_path_domain, args.verified)
    print(f"domain {domain.domain} added to account {account.name}"
          f"{' (verified)' if args.verified else ''}; publish these DNS records:", file=out)
    for record in admin.domain_records(domain, config.hostname):
        print(record.zone_line(), file=out)


async def _domain_verify(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    domain = await stores.senders.verify_domain(account.id, args.domain)
    print(f"domain {domain.domain} verified", file=out)


async def _sender_add(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    sender = await admin.add_sender(stores, account.id, args.address, args.verified)
    print(f"sender {sender.address} added to account {account.name}"
          f"{' (verified)' if args.verified else ''}", file=out)


async def _sender_verify(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.account)
    sender = await stores.senders.verify_sender(account.id, args.address)
    print(f"sender {sender.address} verified", file=out)


async def _stats_send(stores, args, config, out, stdin) -> None:
    stats = await stores.statistics.send(args.send_id)
    if stats is None:
        raise CommandError(f"no send {args.send_id}")
    print(f"send {stats.send_id} ({stats.subject or 'no subject'}), created "
          f"{stats.created_at.isoformat(timespec='seconds')}", file=out)
    print(_table(["counter", "value"], [[name, value] for name, value
                                        in stats.counters.as_dict().items()]), file=out)


async def _stats_account(stores, args, config, out, stdin) -> None:
    account = await stores.accounts.get_account(args.name)
    zone = account_zone(account.timezone)
    try:
        start, end = time_range(args.start, args.end, zone, datetime.now(UTC))
    except ValueError as e:
        raise CommandError(str(e)) from None
    stats = await stores.statistics.account(account.id, start, end, zone.key)
    print(f"account {account.name}, {zone.key}, from {start.isoformat(timespec='seconds')} "
          f"to {end.isoformat(timespec='seconds')}", file=out)
    rows = [[day.isoformat(), *counters.as_dict().values()] for day, counters in stats.days]
    rows.append(["total", *stats.totals.as_dict().values()])
    print(_table(["date", *COUNTERS], rows), file=out)


def _table(header: list[str], rows: list[list]) -> str:
    """Columns as wide as their widest cell; text to the left, numbers to the right."""
    cells = [header, *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths, strict=True)))
                     .rstrip() for row in cells)


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def _delivery_line(delivery: DeliverySummary) -> str:
    if delivery.held:
        next_attempt = "held (domain suspended)"
    elif delivery.sending:
        next_attempt = "being attempted now"
    else:
        next_attempt = _when(delivery.next_attempt_at)
    return "\t".join([str(delivery.id), delivery.account, delivery.recipient, delivery.state,
                      str(delivery.attempts), next_attempt, delivery.last_reply or "-"])


async def _queue_list(stores, args, config, out, stdin) -> None:
    which = QueueFilter(args.state, args.account, args.domain)
    counts = await stores.queue_admin.counts(which)
    if args.deliveries:
        deliveries = await stores.queue_admin.deliveries(which, args.deliveries)
    if not counts:
        print("no deliveries match", file=out)
        return
    print("state\taccount\tdomain\tdeliveries\theld\toldest", file=out)
    for count in counts:
        print(f"{count.state}\t{count.account}\t{count.domain}\t{count.deliveries}\t"
              f"{count.held}\t{_when(count.oldest)}", file=out)
    print(f"total\t{sum(count.deliveries for count in counts)}", file=out)
    if args.deliveries:
        print("\nid\taccount\trecipient\tstate\tattempts\tnext attempt\tlast reply",
              file=out)
        for delivery in deliveries:
            print(_delivery_line(delivery), file=out)


async def _queue_show(stores, args, config, out, stdin) -> None:
    shown = await stores.queue_admin.show(args.delivery_id)
    delivery = shown.delivery
    print("id\taccount\trecipient\tstate\tattempts\tnext attempt\tlast reply", file=out)
    print(_delivery_line(delivery), file=out)
    sender = shown.sender + (f" (From {shown.from_address})" if shown.from_address else "")
    print(f"message {shown.message_id} of send {shown.send_id} from {sender}: "
          f"{shown.subject or ''}", file=out)
    print(f"queued {_when(delivery.created_at)}, first attempt "
          f"{_when(shown.first_attempt_at)}, last attempt {_when(shown.last_attempt_at)}",
          file=out)
    for event in shown.events:
        said = event.details.get("reply") or event.details.get("reason") or ""
        print(f"{_when(event.occurred_at)}\t{event.type}\t{said}".rstrip("\t"), file=out)


async def _queue_retry(stores, args, config, out, stdin) -> None:
    if (args.delivery_id is None) == (args.domain is None):
        raise CommandError("queue retry takes a delivery id or --domain DOMAIN (one of them)")
    if args.domain is not None:
        count = await stores.queue_admin.retry_domain(args.domain)
        print(f"{count} deferred deliveries to {args.domain.lower()} are due now", file=out)
        return
    delivery = await stores.queue_admin.retry(args.delivery_id)
    print(f"delivery {delivery.id} to {delivery.recipient} is due now", file=out)


async def _queue_cancel(stores, args, config, out, stdin) -> None:
    delivery = await stores.queue_admin.cancel(args.delivery_id, args.reason)
    print(f"delivery {delivery.id} to {delivery.recipient} cancelled: {delivery.state} "
          f"({delivery.last_reply})", file=out)


async def _queue_suspend(stores, args, config, out, stdin) -> None:
    suspended = await stores.queue_admin.suspend(args.domain, args.reason)
    print(f"{suspended.domain} suspended: {suspended.held} deliveries held (attempts under "
          "way end as they will; a deferral is held too)", file=out)


async def _queue_resume(stores, args, config, out, stdin) -> None:
    released = await stores.queue_admin.resume(args.domain)
    print(f"{args.domain.lower()} resumed: {released} held deliveries are due now", file=out)


async def _queue_suspended(stores, args, config, out, stdin) -> None:
    for suspended in await stores.queue_admin.suspended():
        print(f"{suspended.domain}\t{_when(suspended.suspended_at)}\t{suspended.held} held"
              f"\t{suspended.reason}".rstrip("\t"), file=out)


COMMANDS = {
    ("account", "create"): _account_create,
    ("account", "list"): _account_list,
    ("account", "set"): _account_set,
    ("template", "set"): _template_set,
    ("template", "list"): _template_list,
    ("user", "create"): _user_create,
    ("apikey", "create"): _apikey_create,
    ("apikey", "list"): _apikey_list,
    ("apikey", "revoke"): _apikey_revoke,
    ("webhook", "add"): _webhook_add,
    ("webhook", "list"): _webhook_list,
    ("webhook", "remove"): _webhook_remove,
    ("suppression", "add"): _suppression_add,
    ("suppression", "list"): _suppression_list,
    ("suppression", "remove"): _suppression_remove,
    ("domain", "add"): _domain_add,
    ("domain", "verify"): _domain_verify,
    ("sender", "add"): _sender_add,
    ("sender", "verify"): _sender_verify,
    ("queue", "list"): _queue_list,
    ("queue", "show"): _queue_show,
    ("queue", "retry"): _queue_retry,
    ("queue", "cancel"): _queue_cancel,
    ("queue", "suspend"): _queue_suspend,
    ("queue", "resume"): _queue_resume,
    ("queue", "suspended"): _queue_suspended,
    ("stats", "send"): _stats_send,
    ("stats", "account"): _stats_account,
}


async def _create_demo(stores: Stores, config: Config, out: TextIO) -> None:
    """A ready-to-use account for trying mailgw; its secrets go to demo.json once."""
    demo_file = config.state_path / "demo.json"
    if demo_file.exists():
        print(f"demo account ready; its credentials are in {demo_file}", file=out)
        return
    try:
        account = await stores.accounts.create_account(DEMO_ACCOUNT)
    except AlreadyExists:
        account = await stores.accounts.get_account(DEMO_ACCOUNT)
    password = credentials.new_password()
    await stores.accounts.set_password(account.id, DEMO_USER,
                                       credentials.hash_password(password))
    with contextlib.suppress(AlreadyExists):
        await admin.add_domain(stores, account.id, DEMO_DOMAIN)
    await stores.senders.verify_domain(account.id, DEMO_DOMAIN)
    try:
        await stores.senders.add_sender(account.id, DEMO_SENDER, verified=True)
    except AlreadyExists:
        await stores.senders.verify_sender(account.id, DEMO_SENDER)
    _, api_key = await admin.create_api_key(stores, account.id, "demo")
    demo = {"account": DEMO_ACCOUNT, "user": DEMO_USER, "password": password, "sender": DEMO_SENDER,
            "api_key": api_key}
    demo_file.write_text(json.dumps(demo, indent=2) + "\n")
    demo_file.chmod(0o600)
    smtp_port = _port_of(config.smtp.starttls_listeners[-1:], 58700)
    http_port = _port_of([config.http.listener], 8080)
    print(f"""
demo account created; credentials saved in {demo_file} (shown only now):
  SMTP user     {DEMO_USER}
  SMTP password {password}
  sender        {DEMO_SENDER}
  API key       {api_key}

send a test message over SMTP (STARTTLS, AUTH LOGIN):
  swaks --server localhost:{smtp_port} --tls --auth LOGIN --auth-user {DEMO_USER} \\
    --auth-password '{password}' --from {DEMO_SENDER} --to someone@example.net

send one over HTTP (Aldeamo dialect):
  curl -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' \\
    -d '{{"from":{{"email":"{DEMO_SENDER}","name":"Demo"}},'\\
'"to":[{{"email":"someone@example.net"}}],"subject":"Hello","body":"<p>Hello</p>"}}' \\
    http://localhost:{http_port}/v1/email
""", file=out)


def _port_of(descriptions: list[str], default: int) -> int:
    for description in descriptions:
        match = re.match(r"^(?:tcp|ssl)?:?(\d+)", description)
        if match:
            return int(match[1])
    return default


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        sys.exit(f"mailgw: {e}")

    async def run(reactor) -> None:
        try:
            await run_command(args, config, reactor, sys.stdout)
        except (CommandError, StartupError, AlreadyExists, NotFound, DatabaseUnavailable,
                BadQueueRequest, QueueActionRefused) as e:
            print(f"mailgw: {_describe(e)}", file=sys.stderr)
            raise SystemExit(1) from None

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


def _describe(error: Exception) -> str:
    if isinstance(error, DatabaseUnavailable):
        return f"the database is unavailable ({error})"
    return str(error)
