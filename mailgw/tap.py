"""`twistd mailgw`: options and makeService (O-1)."""

from __future__ import annotations

import atexit
import os
import resource
import sys

from twisted.logger import Logger
from twisted.python import usage

from mailgw.config import ConfigError, load_config
from mailgw.errors import StartupError
from mailgw.gateway import Gateway

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Run the mailgw mail gateway: SMTP submission, HTTP API, tracking and "
                "delivery. Without --config, every setting has its default "
                "(see etc/mailgw.toml).")
    optParameters = [
        ["config", "c", None, "Path to the TOML configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            self["config_object"] = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> Gateway:
    from twisted.internet import reactor

    raised = raise_open_file_limit()
    if raised is not None:
        log.info("open file limit raised from {soft} to {hard}", soft=raised[0],
                 hard=raised[1])
    gateway = Gateway(options["config_object"], reactor)
    gateway.ready.addErrback(_stop_on_startup_failure, reactor)
    # Its cause is logged where it happens (the embedded PostgreSQL's supervisor).
    gateway.failed.addCallback(lambda _: _stop_with_exit_status_1(reactor))
    return gateway


def raise_open_file_limit() -> tuple[int, int] | None:
    """Every SMTP session, outbound connection and database connection is an open file:
    the soft limit goes up to the hard one (a shell's 1024 is about smtp.max_connections
    alone; the systemd unit sets both). Returns (old soft limit, new) when it rose."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return None
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def _stop_on_startup_failure(failure, reactor) -> None:
    """One clear line, then exit 1 so that systemd sees the failure (O-1)."""
    if failure.check(StartupError):
        log.critical("mailgw cannot start: {reason}", reason=failure.value)
    else:
        log.failure("mailgw cannot start", failure)
    _stop_with_exit_status_1(reactor)


def _stop_with_exit_status_1(reactor) -> None:
    """A clean stop, then exit 1: systemd sees the failure, and Restart=on-failure
    restarts mailgw."""
    # twistd always exits 0 once the reactor has run; exit 1 after it has cleaned up.
    atexit.register(_exit_failed)
    reactor.callWhenRunning(reactor.stop)


def _exit_failed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
