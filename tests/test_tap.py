"""`twistd mailgw` (O-1): options, the plugin, and real runs of the daemon."""

import os
import re
import resource
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.protocol import Factory
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial import unittest

from mailgw.config import Config
from mailgw.embedded_pg import Cluster, RunAs
from mailgw.tap import Options, raise_open_file_limit
from tests.harness import LOOPBACK_PORT

TWISTD = str(Path(sys.executable).parent / "twistd")
REPO = str(Path(__file__).parent.parent)


class OpenFileLimitTests(unittest.TestCase):
    def test_soft_limit_raised_to_the_hard_one(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        raised = raise_open_file_limit()
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (hard, hard))
        self.assertEqual(raised, (min(1024, hard), hard) if hard > 1024 else None)
        self.assertIsNone(raise_open_file_limit())


class OptionsTests(unittest.TestCase):
    def test_config_is_loaded(self):
        path = Path(self.mktemp())
        path.write_text('hostname = "mx.example.org"\n')
        options = Options()
        options.parseOptions(["--config", str(path)])
        self.assertEqual(options["config_object"].hostname, "mx.example.org")

    def test_bad_config_is_a_usage_error(self):
        path = Path(self.mktemp())
        path.write_text("bogus = 1\n")
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--config", str(path)])
        self.assertIn("bogus: unknown key", str(caught.exception))

    def test_plugin_is_found(self):
        from twisted.application.service import IServiceMaker

        from twisted.plugins import mailgw_plugin  # noqa: F401 (found on sys.path)

        names = [maker.tapname for maker in getPlugins(IServiceMaker)]
        self.assertIn("mailgw", names)


class _Daemon(protocol.ProcessProtocol):
    """A twistd child: collects its output; `wait_ready()` fires at the ready line."""

    def __init__(self):
        self.output = b""
        self._ready_waiters = []
        self.ended = defer.Deferred()

    def wait_ready(self) -> defer.Deferred:
        d = defer.Deferred()
        self._ready_waiters.append(d)
        self._check_ready()
        return d

    def _check_ready(self, ended=False):
        if b"mailgw ready:" in self.output or ended:
            waiters, self._ready_waiters = self._ready_waiters, []
            for d in waiters:
                if ended:
                    d.errback(RuntimeError(self.output.decode()))
                else:
                    d.callback(self.output.decode())

    def outReceived(self, data):
        self.output += data
        self._check_ready()

    errReceived = outReceived

    def processEnded(self, reason):
        self._check_ready(ended=True)
        self.signal = reason.value.signal
        self.ended.callback(reason.value.exitCode)


class DaemonTests(unittest.TestCase):
    def write_config(self, state: str, database: str = "", **listeners: str) -> Path:
        listen = {"starttls": LOOPBACK_PORT, "implicit": LOOPBACK_PORT, "http": LOOPBACK_PORT,
                  **listeners}
        path = Path(self.mktemp()).resolve()
        path.write_text(
            f'state_dir = "{state}"\n'
            f'[smtp]\nstarttls_listeners = ["{listen["starttls"]}"]\n'
            f'implicit_tls_listeners = ["{listen["implicit"]}"]\n'
            f'[http]\nlistener = "{listen["http"]}"\n'
            "[delivery]\nenabled = false\n"
            f"[database]\n{database}")
        return path

    def state_dir(self) -> str:
        state = tempfile.mkdtemp(prefix="mailgw-test-twistd-")
        os.chmod(state, 0o755)
        self.addCleanup(shutil.rmtree, state, True)
        return state

    def spawn(self, config: Path) -> _Daemon:
        daemon = _Daemon()
        env = {**os.environ, "PYTHONPATH": REPO}
        process = reactor.spawnProcess(
            daemon, TWISTD, [TWISTD, "-n", "--pidfile=", "mailgw", "--config", str(config)],
            env=env, path=REPO)

        def kill_leftover():
            if not daemon.ended.called:
                process.signalProcess("KILL")
                return daemon.ended
        self.addCleanup(kill_leftover)
        daemon.process = process
        return daemon

    async def test_runs_in_foreground_with_embedded_database_and_stops_on_term(self):
        state = self.state_dir()
        daemon = self.spawn(self.write_config(state))
        ready_line = await daemon.wait_ready()
        port = int(re.search(r"http\.listener=(\d+)", ready_line)[1])
        response = await treq.get(f"http://127.0.0.1:{port}/healthz", persistent=False)
        self.assertEqual(response.code, 200)
        await response.content()
        daemon.process.signalProcess(signal.SIGTERM)
        await daemon.ended
        # twistd ends a clean SIGTERM stop by re-raising it, as systemd expects.
        self.assertEqual(daemon.signal, signal.SIGTERM)
        self.assertIn("Server Shut Down", daemon.output.decode())
        self.assertFalse(Path(state, "pg", "data", "postmaster.pid").exists(),
                         "the embedded PostgreSQL stops with mailgw")

    async def test_port_in_use_is_one_clear_line_and_exit_1(self):
        taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        busy = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        daemon = self.spawn(self.write_config(self.state_dir(), http=busy))
        code = await daemon.ended
        output = daemon.output.decode()
        self.assertEqual(code, 1, output)
        self.assertIn("mailgw cannot start: http.listener: cannot listen", output)
        self.assertNotIn("Traceback", output)

    async def test_embedded_postgres_given_up_is_exit_1_for_systemd(self):
        """Point 6 of issue 12: past database.embedded_restart_seconds (here 0: the first
        exit) of a postmaster that does not come back, twistd stops and exits 1, so that
        Restart=on-failure starts everything again."""
        state = self.state_dir()
        daemon = self.spawn(self.write_config(state, "embedded_restart_seconds = 0\n"))
        await daemon.wait_ready()
        postmaster = Cluster(Path(state, "pg"), RunAs.for_cluster("mailgw")).running_pid()
        os.kill(postmaster, signal.SIGKILL)
        code = await daemon.ended
        output = daemon.output.decode()
        self.assertEqual(code, 1, output)
        self.assertIn("embedded PostgreSQL exited (killed by SIGKILL); giving up after 0 s of "
                      "restarts (database.embedded_restart_seconds = 0): mailgw stops with "
                      "exit status 1", output)
        self.assertIn("Server Shut Down", output)
        self.assertNotIn("Traceback", output)

    async def test_bad_config_stops_start_up(self):
        path = Path(self.mktemp()).resolve()
        path.write_text("[smtp]\nmax_message_size = \"big\"\n")
        daemon = self.spawn(path)
        code = await daemon.ended
        self.assertNotEqual(code, 0)
        self.assertIn("smtp.max_message_size: expected an integer", daemon.output.decode())

    async def test_help_lists_the_options(self):
        daemon = _Daemon()
        reactor.spawnProcess(daemon, TWISTD, [TWISTD, "mailgw", "--help"],
                             env={**os.environ, "PYTHONPATH": REPO}, path=REPO)
        self.assertEqual(await daemon.ended, 0)
        self.assertIn("--config", daemon.output.decode())


class SystemdUnitTests(unittest.TestCase):
    """etc/mailgw.service (O-6): its own user, twistd in the foreground, restarts."""

    def test_unit(self):
        unit = (Path(REPO) / "etc" / "mailgw.service").read_text()
        lines = {line.split("=", 1)[0]: line.split("=", 1)[1]
                 for line in unit.splitlines() if "=" in line and not line.startswith("#")}
        self.assertEqual(lines["User"], "mailgw")
        self.assertIn("twistd -n", lines["ExecStart"])
        self.assertIn("mailgw --config", lines["ExecStart"])
        self.assertEqual(lines["Restart"], "on-failure")
        # Open files for every SMTP session and outbound connection the defaults allow,
        # and then some: systemd's default soft limit is 1024.
        defaults = Config()
        self.assertGreaterEqual(int(lines["LimitNOFILE"]), 10 * (
            defaults.smtp.max_connections + defaults.delivery.max_connections))
