"""The embedded default database (O-2): a cluster under the state dir, run by the Gateway."""

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import psycopg2
from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailgw.embedded_pg import Cluster, EmbeddedPostgresService, RunAs
from mailgw.errors import StartupError
from mailgw.gateway import embedded_cluster
from tests.harness import gateway_config, start_gateway


def _parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _uid_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}").st_uid


class EmbeddedGatewayTests(unittest.TestCase):
    def setUp(self):
        state = tempfile.mkdtemp(prefix="mailgw-test-state-")
        os.chmod(state, 0o755)
        self.addCleanup(shutil.rmtree, state, True)
        self.config = gateway_config(self, dsn="").replace(state_dir=state)
        self.cluster = embedded_cluster(self.config)

    async def start(self):
        gateway = await start_gateway(self, self.config)
        pid = self.cluster.running_pid()
        self.assertIsNotNone(pid)
        return gateway, pid

    async def test_postgres_runs_as_a_child_and_stops_with_the_gateway(self):
        gateway, pid = await self.start()
        self.assertEqual(_parent_pid(pid), os.getpid())
        if os.geteuid() == 0:
            self.assertEqual(_uid_of(pid), pwd.getpwnam("mailgw").pw_uid)
        account = await gateway.stores.accounts.create_account("acme")
        self.assertEqual(account.name, "acme")
        await gateway.stopService()
        self.assertIsNone(self.cluster.running_pid())
        self.assertFalse(Path(f"/proc/{pid}").exists())

    async def test_second_start_keeps_the_data(self):
        gateway, _ = await self.start()
        await gateway.stores.accounts.create_account("acme")
        await gateway.stopService()
        gateway, _ = await self.start()
        names = [a.name for a in await gateway.stores.accounts.list_accounts()]
        self.assertEqual(names, ["acme"])

    async def test_stale_pid_file_after_a_crash(self):
        self.cluster.initialize()
        # A pid that is not a postgres (this test process), as after a crash and pid reuse.
        (self.cluster.data_dir / "postmaster.pid").write_text(
            f"{os.getpid()}\n{self.cluster.data_dir}\n")
        gateway, pid = await self.start()
        self.assertNotEqual(pid, os.getpid())
        self.assertTrue(await gateway.database.is_reachable())

    async def test_postmaster_left_running_is_replaced(self):
        """After a kill -9 of mailgw its postgres lives on; the next start takes over."""
        self.cluster.initialize()
        self.cluster.start()
        orphan = self.cluster.running_pid()
        gateway, pid = await self.start()
        self.assertNotEqual(pid, orphan)
        self.assertEqual(_parent_pid(pid), os.getpid())
        self.assertTrue(await gateway.database.is_reachable())


class ShutdownTests(unittest.TestCase):
    """The postmaster lets the sessions of a closed pool end, and ends any left over."""

    async def start(self, smart_shutdown_seconds):
        state = tempfile.mkdtemp(prefix="mailgw-test-state-")
        os.chmod(state, 0o755)
        self.addCleanup(shutil.rmtree, state, True)
        config = gateway_config(self, dsn="").replace(state_dir=state)
        service = EmbeddedPostgresService(embedded_cluster(config), reactor,
                                          smart_shutdown_seconds=smart_shutdown_seconds)
        self.addCleanup(service.stop)
        await service.start()
        self.lines = []

        def observe(event):
            if event.get("log_source") is service._protocol:  # the postmaster's output
                self.lines.append(event["line"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return service

    async def test_closed_sessions_end_by_themselves(self):
        service = await self.start(smart_shutdown_seconds=30)
        connections = [psycopg2.connect(service.cluster.dsn) for _ in range(10)]
        for connection in connections:
            connection.close()
        await service.stop()
        self.assertTrue(service._protocol.ended.called)
        output = " ".join(self.lines)
        # Asked as a smart shutdown, deterministically: a fast one ends the sessions, and
        # whether one of them is still there to log it is a race.
        self.assertIn("received smart shutdown request", output)
        self.assertIn("database system is shut down", output)
        self.assertEqual([line for line in self.lines if "FATAL" in line], [])

    async def test_session_left_open_is_ended(self):
        service = await self.start(smart_shutdown_seconds=0.2)
        connection = psycopg2.connect(service.cluster.dsn)
        self.addCleanup(connection.close)
        await service.stop()
        with self.assertRaises(psycopg2.Error):
            connection.cursor().execute("SELECT 1")
        self.assertIn("received fast shutdown request", " ".join(self.lines))
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class ClusterTests(unittest.TestCase):
    def test_state_dir_closed_to_the_cluster_user(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("only root runs the cluster as another user")
        closed = Path(tempfile.mkdtemp(prefix="mailgw-test-closed-"))  # mode 0700, root's
        self.addCleanup(shutil.rmtree, closed, True)
        cluster = Cluster(closed / "state" / "pg", RunAs.for_cluster("mailgw"))
        with self.assertRaises(StartupError) as caught:
            cluster.initialize()
        self.assertIn("cannot reach", str(caught.exception))

    def test_socket_path_too_long(self):
        cluster = Cluster(Path("/tmp/" + "x" * 120), RunAs.current())
        with self.assertRaises(StartupError) as caught:
            cluster.initialize()
        self.assertIn("too long", str(caught.exception))

    def test_dsn_points_at_the_socket_dir(self):
        cluster = Cluster(Path("/srv/mailgw/pg"), RunAs.current())
        self.assertEqual(cluster.dsn,
                         "host=/srv/mailgw/pg port=5432 dbname=mailgw user=mailgw")
