"""The embedded default database (O-2): a cluster under the state dir, run by the Gateway."""

import dataclasses
import inspect
import os
import pwd
import shutil
import signal
import tempfile
from pathlib import Path

import psycopg2
from twisted.internet import reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailgw.embedded_pg import (
    Cluster,
    EmbeddedPostgresService,
    RestartPolicy,
    RunAs,
    Supervisor,
    cluster_root,
)
from mailgw.errors import StartupError
from mailgw.gateway import embedded_cluster
from tests.harness import gateway_config, start_gateway


def _parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _uid_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}").st_uid


def _embedded_config(test: unittest.TestCase):
    """A gateway config with the embedded cluster, in a state dir its user can reach."""
    state = tempfile.mkdtemp(prefix="mailgw-test-state-")
    os.chmod(state, 0o755)
    test.addCleanup(shutil.rmtree, state, True)
    return gateway_config(test, dsn="").replace(state_dir=state)


def _embedded_service(test: unittest.TestCase, clock=None,
                      **kwargs) -> EmbeddedPostgresService:
    """An EmbeddedPostgresService to start, stopped when the test ends."""
    service = EmbeddedPostgresService(embedded_cluster(_embedded_config(test)), reactor,
                                      lambda: None, clock=clock, **kwargs)
    test.addCleanup(service.stop)
    return service


def _supervisor_events(test: unittest.TestCase) -> list[dict]:
    """The supervisor's log events from now to the end of the test."""
    events = []

    def observe(event):
        if event.get("log_namespace") == Supervisor.log.namespace:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


async def _until(condition, clock=None, announced=(), timeout=30.0):
    """Poll `condition()` (awaited if it must be) on the real reactor, the processes being
    real, until it holds; meanwhile move `clock` through each restart delay announced."""
    deadline = reactor.seconds() + timeout
    advanced = 0
    while not await _holds(condition):
        delays = [event["delay"] for event in announced if "delay" in event]
        for delay in delays[advanced:]:
            clock.advance(delay)
        advanced = len(delays)
        if reactor.seconds() > deadline:
            raise AssertionError(f"still not true after {timeout} s")
        await task.deferLater(reactor, 0.05, lambda: None)


def _lines(events: list[dict]) -> list[str]:
    return [formatEvent(event) for event in events]


async def _holds(condition) -> bool:
    result = condition()
    return await result if inspect.isawaitable(result) else result


class EmbeddedGatewayTests(unittest.TestCase):
    def setUp(self):
        self.config = _embedded_config(self)
        self.cluster = embedded_cluster(self.config)

    async def start(self, clock=None):
        gateway = await start_gateway(self, self.config, clock)
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

    async def test_killed_postmaster_is_restarted_and_the_gateway_recovers(self):
        """Point 6 of issue 12: the same twistd serves again, nothing restarted by hand."""
        clock = task.Clock()
        announced = _supervisor_events(self)
        gateway, pid = await self.start(clock)
        os.kill(pid, signal.SIGKILL)
        # Not the database alone: the killed postmaster's backends may still answer.
        await _until(lambda: "embedded PostgreSQL restarted" in _lines(announced), clock,
                     announced)
        await _until(gateway.database.is_reachable)
        self.assertEqual(_lines(announced)[0],
                         "embedded PostgreSQL exited (killed by SIGKILL); restarting it in 1 s")
        restarted = self.cluster.running_pid()
        self.assertNotEqual(restarted, pid)
        self.assertEqual(_parent_pid(restarted), os.getpid())
        account = await gateway.stores.accounts.create_account("acme")
        self.assertEqual(account.name, "acme")

    async def test_giving_up_while_stopping_leaves_the_stop_alone(self):
        """The stop under way ends mailgw: `failed` (twistd's exit 1) is for a running one."""
        self.config = self.config.replace(database=dataclasses.replace(
            self.config.database, embedded_restart_seconds=0))
        gateway, _ = await self.start()
        stopping = gateway.stopService()  # closing its listeners: not at the postmaster yet
        gateway.embedded.supervisor.down("exited (killed by SIGKILL)")
        await stopping
        self.assertFalse(gateway.failed.called)


class SupervisedServiceTests(unittest.TestCase):
    """The real postmaster killed under an EmbeddedPostgresService; back-off on a Clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.announced = _supervisor_events(self)

    async def kill_postmaster(self, service) -> None:
        os.kill(service.cluster.running_pid(), signal.SIGKILL)
        await _until(lambda: self.announced)

    async def test_a_restart_that_fails_is_tried_again(self):
        service = _embedded_service(self, self.clock)
        await service.start()
        conf = service.cluster.data_dir / "postgresql.conf"
        good = conf.read_text()
        conf.write_text(good + "no_such_setting = 1\n")  # postgres refuses to start
        await self.kill_postmaster(service)
        self.clock.advance(self.announced[0]["delay"])
        await _until(lambda: len(self.announced) == 2)
        self.assertRegex(_lines(self.announced)[1],
                         r"^embedded PostgreSQL did not restart \(PostgreSQL exited during "
                         r"start-up \(exit status 1\); see .*\); restarting it in 2 s$")
        conf.write_text(good)
        self.clock.advance(self.announced[1]["delay"])
        await _until(lambda: len(self.announced) == 3)
        self.assertEqual(_lines(self.announced)[2], "embedded PostgreSQL restarted")
        connection = psycopg2.connect(service.cluster.dsn)
        connection.close()

    async def test_not_ready_in_time_is_stopped(self):
        """A start (or restart) that times out leaves no postmaster behind to retry over."""
        service = _embedded_service(self, start_timeout=0, smart_shutdown_seconds=0.2)
        with self.assertRaises(StartupError) as caught:
            await service.start()
        self.assertIn("did not become ready in time", str(caught.exception))
        self.assertTrue(service._protocol.ended.called)

    async def test_stop_during_the_back_off_cancels_the_restart(self):
        service = _embedded_service(self, self.clock)
        await service.start()
        await self.kill_postmaster(service)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        await service.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(service.cluster.running_pid())


class SupervisorTests(unittest.TestCase):
    """The restart policy on a task.Clock, with restarts that fail or work at once."""

    def setUp(self):
        self.clock = task.Clock()
        self.restarts: list[float] = []
        self.gave_up: list[float] = []
        self.restart_works = False
        self.announced = _supervisor_events(self)

    def start_supervisor(self, **policy) -> Supervisor:
        self.supervisor = Supervisor(self.clock, RestartPolicy(**policy), self.restart,
                                     lambda: self.gave_up.append(self.clock.seconds()))
        self.supervisor.up()
        return self.supervisor

    def restart(self) -> None:
        self.restarts.append(self.clock.seconds())
        if self.restart_works:
            self.supervisor.up()
        else:
            self.supervisor.down("did not restart (exit status 1)")

    def run_for(self, seconds: int) -> None:
        for _ in range(seconds):
            self.clock.advance(1)

    def test_delays_double_up_to_the_maximum(self):
        self.start_supervisor().down("exited (killed by SIGKILL)")
        self.run_for(121)
        self.assertEqual(self.restarts, [1, 3, 7, 15, 31, 61, 91, 121])
        self.assertEqual(_lines(self.announced)[:2], [
            "embedded PostgreSQL exited (killed by SIGKILL); restarting it in 1 s",
            "embedded PostgreSQL did not restart (exit status 1); restarting it in 2 s"])
        self.assertEqual(self.gave_up, [])

    def test_delays_start_over_once_it_stayed_up(self):
        self.restart_works = True
        supervisor = self.start_supervisor()
        supervisor.down("exited (exit status 1)")
        self.run_for(20)  # up 19 s since the restart at 1
        supervisor.down("exited (exit status 1)")
        self.run_for(61)  # restarted at 22, up 59 s
        supervisor.down("exited (exit status 1)")
        self.run_for(64)  # restarted at 85, up 60 s
        supervisor.down("exited (exit status 1)")
        self.run_for(1)
        self.assertEqual(self.restarts, [1, 22, 85, 146])
        self.assertEqual(_lines(self.announced)[:2], [
            "embedded PostgreSQL exited (exit status 1); restarting it in 1 s",
            "embedded PostgreSQL restarted"])

    def test_gives_up_after_the_bound(self):
        self.start_supervisor(give_up_seconds=300).down("exited (killed by SIGKILL)")
        self.run_for(400)
        self.assertEqual(self.restarts[-2:], [271, 301])
        self.assertEqual(self.gave_up, [301])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(
            _lines(self.announced)[-1],
            "embedded PostgreSQL did not restart (exit status 1); giving up after 301 s of "
            "restarts (database.embedded_restart_seconds = 300): mailgw stops with exit "
            "status 1")

    def test_a_postmaster_that_keeps_exiting_soon_is_given_up_too(self):
        self.restart_works = True
        supervisor = self.start_supervisor(give_up_seconds=300)
        supervisor.down("exited (exit status 1)")
        for _ in range(6):
            self.run_for(50)  # up 49 s at most: never the 60 that start the delays over
            supervisor.down("exited (exit status 1)")
        self.assertEqual(self.gave_up, [300])

    def test_zero_gives_up_at_the_first_exit(self):
        self.start_supervisor(give_up_seconds=0).down("exited (killed by SIGKILL)")
        self.assertEqual(self.gave_up, [0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_a_pending_restart(self):
        supervisor = self.start_supervisor()
        supervisor.down("exited (killed by SIGKILL)")
        supervisor.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        supervisor.down("exited (exit status 0)")  # the postmaster stopping with mailgw
        self.run_for(400)
        self.assertEqual((self.restarts, self.gave_up), ([], []))


class ShutdownTests(unittest.TestCase):
    """The postmaster lets the sessions of a closed pool end, and ends any left over."""

    async def start(self, smart_shutdown_seconds):
        service = _embedded_service(self, smart_shutdown_seconds=smart_shutdown_seconds)
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

    def test_state_dir_under_a_closed_home_gets_a_cluster_its_user_reaches(self):
        """Issue 16: root runs `make run` from a clone in its mode-700 home. The cluster
        goes to a shared directory, `<state_dir>/pg` links to it, and the next start
        finds the same cluster, its data kept."""
        if os.geteuid() != 0:
            raise unittest.SkipTest("only root runs the cluster as another user")
        home = Path(tempfile.mkdtemp(prefix="mailgw-test-home-"))  # mode 0700, root's
        shared = Path(tempfile.mkdtemp(prefix="mailgw-test-shared-")) / "lib"
        shared.parent.chmod(0o755)  # as /var/lib
        self.addCleanup(shutil.rmtree, home, True)
        self.addCleanup(shutil.rmtree, shared.parent, True)
        state = home / "mailgw" / "var"
        run_as = RunAs.for_cluster("mailgw")

        root = cluster_root(state, run_as, shared)
        self.assertEqual(root.parent, shared)
        self.assertEqual((state / "pg").resolve(), root)
        self.assertEqual(shared.stat().st_mode & 0o777, 0o755)
        cluster = Cluster(root, run_as)
        self.addCleanup(cluster.stop)
        cluster.initialize()
        cluster.start()
        with psycopg2.connect(cluster.dsn) as connection, connection.cursor() as cursor:
            cursor.execute("CREATE TABLE kept (n integer)")
        connection.close()
        cluster.stop()

        again = Cluster(cluster_root(state, run_as, shared), run_as)
        self.assertEqual(again.root, root)
        again.initialize()
        again.start()
        with psycopg2.connect(again.dsn) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM kept")
            self.assertEqual(cursor.fetchone(), (0,))
        connection.close()
        again.stop()

    def test_state_dir_its_user_reaches_keeps_the_cluster(self):
        state = Path(tempfile.mkdtemp(prefix="mailgw-test-open-"))
        state.chmod(0o755)
        self.addCleanup(shutil.rmtree, state, True)
        shared = Path(self.mktemp())
        self.assertEqual(cluster_root(state, RunAs.for_cluster("mailgw"), shared),
                         state / "pg")
        self.assertFalse(shared.exists())

    def test_socket_path_too_long(self):
        cluster = Cluster(Path("/tmp/" + "x" * 120), RunAs.current())
        with self.assertRaises(StartupError) as caught:
            cluster.initialize()
        self.assertIn("too long", str(caught.exception))

    def test_dsn_points_at_the_socket_dir(self):
        cluster = Cluster(Path("/srv/mailgw/pg"), RunAs.current())
        self.assertEqual(cluster.dsn,
                         "host=/srv/mailgw/pg port=5432 dbname=mailgw user=mailgw")
