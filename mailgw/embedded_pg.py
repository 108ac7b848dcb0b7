"""The embedded default database (O-2): a PostgreSQL cluster under the state dir.

With no DSN configured, mailgw creates a cluster in `<state_dir>/pg` the first
time, and runs it listening only on a Unix socket in that directory.  initdb
and postgres refuse to run as root, so when mailgw runs as root the cluster
belongs to an unprivileged system user (`database.embedded_user`), created on
first use.  That user cannot enter a state dir under a closed directory (root's
mode-700 home, where `git clone` puts a first try): the cluster then lives under
/var/lib/mailgw, and `<state_dir>/pg` is a symbolic link to it (`cluster_root`).

Two ways to run it: `EmbeddedPostgresService` runs `postgres` as a child of
the twistd process (stopped with it, and restarted by a `Supervisor` when it
ends on its own); `Cluster.start()`/`stop()` use pg_ctl for the admin CLI and
the test harness, which need it only for a while.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer, error, protocol, task
from twisted.logger import Logger

from mailgw.errors import StartupError

DATABASE_NAME = "mailgw"
ROLE_NAME = "mailgw"
PG_PORT = 5432
# Unix socket paths are limited to 107 bytes; ".s.PGSQL.5432" takes 14 of them.
MAX_SOCKET_DIR_LENGTH = 107 - 14
INSTALL_HINT = "install PostgreSQL with: apt-get install -y postgresql"
# Where clusters live whose state dir their user cannot reach: one directory each,
# named after the state dir (`cluster_root`).
SHARED_CLUSTERS_DIR = Path("/var/lib/mailgw")


def find_pg_bin() -> Path:
    """The newest installed PostgreSQL server's bin directory."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    on_path = shutil.which("postgres") or shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise StartupError(f"PostgreSQL server binaries not found; {INSTALL_HINT}")


@dataclass(frozen=True)
class RunAs:
    """The OS user the cluster's processes run as."""

    name: str
    uid: int
    gid: int

    @classmethod
    def current(cls) -> RunAs:
        entry = pwd.getpwuid(os.geteuid())
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    @classmethod
    def for_cluster(cls, system_user: str) -> RunAs:
        """Ourselves, or `system_user` (created if missing) when we are root."""
        if os.geteuid() != 0:
            return cls.current()
        try:
            entry = pwd.getpwnam(system_user)
        except KeyError:
            _create_system_user(system_user)
            entry = pwd.getpwnam(system_user)
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _create_system_user(name: str) -> None:
    result = subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home",
         "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise StartupError(f"cannot create system user {name!r} for the embedded database: "
                           f"{result.stderr.strip()}")


def cluster_root(state_dir: Path, run_as: RunAs, shared: Path = SHARED_CLUSTERS_DIR) -> Path:
    """Where the cluster of `state_dir` lives: `<state_dir>/pg` when `run_as` can reach
    it; else a directory under `shared` named after the state dir, which
    `<state_dir>/pg` then links to, so that the next start (and the operator) finds it
    there. Root running mailgw from its mode-700 home is the usual case."""
    in_state = state_dir / "pg"
    if in_state.is_symlink():  # placed by an earlier start
        return in_state.resolve()
    if run_as.uid == os.geteuid() or _user_can(run_as, "-x", _nearest_existing(state_dir)):
        return in_state
    root = shared / _cluster_name(state_dir)
    try:
        shared.mkdir(parents=True, exist_ok=True)
        shared.chmod(0o755)  # whatever the umask: the cluster's user goes through it
        state_dir.mkdir(parents=True, exist_ok=True)
        in_state.symlink_to(root, target_is_directory=True)
    except OSError as e:
        raise StartupError(f"cannot place the database directory in {shared} for "
                           f"{state_dir}: {e.strerror}") from None
    return root


def _nearest_existing(path: Path) -> Path:
    """`path`, or the closest of its parents that exists: the missing ones will be made
    with root's usual umask (022), which lets everyone through."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _cluster_name(state_dir: Path) -> str:
    """The last two parts of the state dir's path, for the operator to recognise, and a
    digest of all of it, so that two state dirs never share a cluster."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(state_dir.parts[-2:]))[:40]
    digest = hashlib.sha256(str(state_dir).encode("utf-8", "surrogateescape")).hexdigest()
    return f"{readable}-{digest[:10]}"


def _user_can(run_as: RunAs, test_flag: str, path: Path) -> bool:
    """test(1) `test_flag` on `path`, as `run_as` (its own groups only)."""
    result = subprocess.run(["test", test_flag, str(path)], user=run_as.uid,
                            group=run_as.gid, extra_groups=[])
    return result.returncode == 0


class Cluster:
    """A PostgreSQL cluster in `root`: data in root/data, socket in root."""

    def __init__(self, root: Path, run_as: RunAs, pg_bin: Path | None = None,
                 settings: dict[str, str] | None = None) -> None:
        self.root = root.resolve()
        self.data_dir = self.root / "data"
        self.log_file = self.root / "postgres.log"
        self.run_as = run_as
        self.pg_bin = pg_bin or find_pg_bin()
        self.settings = settings or {}

    @property
    def dsn(self) -> str:
        return self.dsn_for(DATABASE_NAME)

    def dsn_for(self, database: str) -> str:
        return f"host={self.root} port={PG_PORT} dbname={database} user={ROLE_NAME}"

    def initialize(self) -> None:
        """Create the cluster on first use; later calls only check it."""
        if len(str(self.root)) > MAX_SOCKET_DIR_LENGTH:
            raise StartupError(f"state directory path too long for a Unix socket: {self.root}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            os.chown(self.root, self.run_as.uid, self.run_as.gid)
            self.root.chmod(0o700)
        except OSError as e:
            raise StartupError(f"cannot create the database directory {self.root}: "
                               f"{e.strerror}") from None
        self._check_reachable()
        if (self.data_dir / "PG_VERSION").exists():
            return
        self._run([str(self.pg_bin / "initdb"), "-D", str(self.data_dir), "-U", ROLE_NAME,
                   "-A", "trust", "-E", "UTF8", "--no-locale"], "initdb")
        conf = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.root}'",
            "port": str(PG_PORT),
            **self.settings,
        }
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write("\n# mailgw embedded cluster\n")
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")

    def _check_reachable(self) -> None:
        """postgres runs as another user: every parent directory must let it through."""
        if self.run_as.uid == os.geteuid():
            return
        if not _user_can(self.run_as, "-w", self.root):
            raise StartupError(
                f"user {self.run_as.name} cannot reach {self.root} (a parent directory is "
                f"closed to it); choose a state_dir it can reach, e.g. under /var/lib")

    def _run(self, argv: list[str], what: str) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, cwd=self.root,
                                **self._user_kwargs())
        if result.returncode != 0:
            raise StartupError(f"{what} failed: {(result.stderr or result.stdout).strip()}")

    def _user_kwargs(self) -> dict:
        if self.run_as.uid == os.geteuid():
            return {}
        return {"user": self.run_as.uid, "group": self.run_as.gid, "extra_groups": []}

    def running_pid(self) -> int | None:
        """The pid of a live postmaster for this data dir, removing a stale pid file."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        if _is_postgres(pid):
            return pid
        # Left by a crash (or the pid was reused by another program): postgres
        # would refuse to start while it exists.
        pid_file.unlink(missing_ok=True)
        (self.root / f".s.PGSQL.{PG_PORT}.lock").unlink(missing_ok=True)
        return None

    def is_ready(self) -> bool:
        """postmaster.pid says "ready" once connections are accepted (PG 10+)."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def postgres_argv(self) -> list[str]:
        """postgres in a session of its own: a Ctrl-C meant for mailgw must not reach it
        before mailgw has closed its connections; mailgw stops it last."""
        return ["setsid", str(self.pg_bin / "postgres"), "-D", str(self.data_dir)]

    def start(self, timeout: int = 60) -> None:
        """Start with pg_ctl and wait until it accepts connections (CLI, tests)."""
        if self.running_pid() is not None:
            return
        self._run([str(self.pg_bin / "pg_ctl"), "-D", str(self.data_dir), "-l",
                   str(self.log_file), "-w", "-t", str(timeout), "start"], "starting PostgreSQL")
        self.ensure_database()

    def stop(self) -> None:
        if self.running_pid() is None:
            return
        self._run([str(self.pg_bin / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w",
                   "stop"], "stopping PostgreSQL")

    def ensure_database(self) -> None:
        """Create the mailgw database once; the role exists from initdb -U."""
        import psycopg2

        conn = psycopg2.connect(self.dsn_for("postgres"))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE DATABASE {DATABASE_NAME}")
        finally:
            conn.close()


def _is_postgres(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0]
    except OSError:
        return False
    return os.path.basename(argv0).startswith((b"postgres", b"postmaster"))


class _PostgresProcess(protocol.ProcessProtocol):
    log = Logger(namespace="mailgw.postgres")

    def __init__(self) -> None:
        # Fires with how the process ended ("exit status 1", "killed by SIGKILL").
        self.ended: defer.Deferred[str] = defer.Deferred()
        self.how_it_ended: str | None = None

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            self.log.info("{line}", line=line)

    outReceived = errReceived

    def processEnded(self, reason) -> None:
        self.how_it_ended = describe_exit(reason.value)
        self.ended.callback(self.how_it_ended)


def describe_exit(ended: error.ProcessDone | error.ProcessTerminated) -> str:
    """"exit status N" or "killed by SIGNAME", as an operator reads it in the log."""
    if ended.signal is not None:
        try:
            return f"killed by {signal.Signals(ended.signal).name}"
        except ValueError:
            return f"killed by signal {ended.signal}"
    return f"exit status {ended.exitCode}"


@dataclass(frozen=True)
class RestartPolicy:
    """When a postmaster that ended on its own is started again, and when mailgw gives up.

    The delays double from `first_delay` up to `max_delay`; once a postmaster has
    stayed up `stable_seconds`, its next exit starts over from `first_delay`.  If
    it has not stayed up that long within `give_up_seconds` of the first exit,
    mailgw gives up and exits non-zero, for systemd to restart the whole service.
    """

    first_delay: float = 1.0
    max_delay: float = 30.0
    stable_seconds: float = 60.0
    give_up_seconds: float = 300.0


class Supervisor:
    """Decides, on `clock`, when to call `restart` after `down()`, and when `give_up`.

    The service reports `up()` when a postmaster accepts connections and
    `down(how)` when one exits or fails to start; each is logged.  `stop()`
    (mailgw stopping) cancels a pending restart and ignores later reports.
    """

    log = Logger()

    def __init__(self, clock, policy: RestartPolicy, restart: Callable[[], None],
                 give_up: Callable[[], None]) -> None:
        self.clock = clock
        self.policy = policy
        self.restart = restart
        self.give_up = give_up
        self._delay = policy.first_delay
        self._up_since: float | None = None
        self._down_since: float | None = None
        self._pending = None  # IDelayedCall of the next restart
        self._stopped = False

    def up(self) -> None:
        if self._down_since is not None:
            self.log.info("embedded PostgreSQL restarted")
        self._up_since = self.clock.seconds()

    def down(self, how: str) -> None:
        if self._stopped:
            return
        now = self.clock.seconds()
        if self._up_since is not None and now - self._up_since >= self.policy.stable_seconds:
            self._delay, self._down_since = self.policy.first_delay, None
        self._up_since = None
        if self._down_since is None:
            self._down_since = now
        if now - self._down_since >= self.policy.give_up_seconds:
            self._stopped = True
            self.log.critical(
                "embedded PostgreSQL {how}; giving up after {elapsed:g} s of restarts "
                "(database.embedded_restart_seconds = {limit:g}): mailgw stops with exit "
                "status 1", how=how, elapsed=now - self._down_since,
                limit=self.policy.give_up_seconds)
            self.give_up()
            return
        self.log.error("embedded PostgreSQL {how}; restarting it in {delay:g} s",
                       how=how, delay=self._delay)
        self._pending = self.clock.callLater(self._delay, self._restart)
        self._delay = min(self._delay * 2, self.policy.max_delay)

    def _restart(self) -> None:
        self._pending = None
        self.restart()

    def stop(self) -> None:
        self._stopped = True
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


class EmbeddedPostgresService:
    """Runs the cluster's postmaster as a child process of mailgw.

    `start()` fires once the cluster accepts connections; `stop()` asks for a
    smart shutdown, which lets the sessions of the pool just closed end by
    themselves (a fast one ends them, and each logs "FATAL: terminating
    connection due to administrator command"), then after
    `smart_shutdown_seconds` for a fast one (open transactions roll back,
    nothing committed is lost); it fires when the postmaster has exited.

    In between, a postmaster that exits (killed, crashed) is started again
    after a back-off on `clock` (`restart_policy`): the pool reconnects by
    itself.  When restarting does not work, `on_give_up` is called: mailgw
    exits non-zero and systemd restarts all of it.
    """

    log = Logger()

    def __init__(self, cluster: Cluster, reactor, on_give_up: Callable[[], None],
                 clock=None, restart_policy: RestartPolicy = RestartPolicy(),
                 poll_interval: float = 0.05, start_timeout: float = 60.0,
                 smart_shutdown_seconds: float = 5.0) -> None:
        self.cluster = cluster
        self.reactor = reactor
        self.poll_interval = poll_interval
        self.start_timeout = start_timeout
        self.smart_shutdown_seconds = smart_shutdown_seconds
        self.supervisor = Supervisor(clock or reactor, restart_policy, self._restart,
                                     on_give_up)
        self._process = None
        self._protocol: _PostgresProcess | None = None

    async def start(self) -> None:
        self.cluster.initialize()
        await self._launch()
        self.cluster.ensure_database()
        self.log.info("embedded PostgreSQL ready in {dir}", dir=self.cluster.root)

    async def _launch(self) -> None:
        """Start a postmaster, wait until it accepts connections, then supervise it."""
        orphan = self.cluster.running_pid()  # also removes a stale postmaster.pid
        if orphan is not None:
            # A postmaster left behind by a mailgw that was killed: stop it so
            # that the cluster is ours again.
            self.log.warn("stopping a PostgreSQL left running (pid {pid})", pid=orphan)
            self.cluster.stop()
        self._protocol = _PostgresProcess()
        kwargs = {}
        if self.cluster.run_as.uid != os.geteuid():
            kwargs = {"uid": self.cluster.run_as.uid, "gid": self.cluster.run_as.gid}
        argv = self.cluster.postgres_argv()
        self._process = self.reactor.spawnProcess(
            self._protocol, shutil.which(argv[0]) or argv[0], argv,
            env={"LANG": "C.UTF-8", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            path=str(self.cluster.root), **kwargs)
        waited = 0.0
        while not self.cluster.is_ready():
            if self._protocol.ended.called:
                raise StartupError(f"PostgreSQL exited during start-up "
                                   f"({self._protocol.how_it_ended}); see the log lines "
                                   f"above and {self.cluster.data_dir}")
            if waited >= self.start_timeout:
                await self._stop_postmaster()  # a restart must not leave it behind
                raise StartupError("PostgreSQL did not become ready in time")
            await _sleep(self.reactor, self.poll_interval)
            waited += self.poll_interval
        self.supervisor.up()
        self._protocol.ended.addCallback(lambda how: self.supervisor.down(f"exited ({how})"))

    def _restart(self) -> None:
        d = defer.ensureDeferred(self._launch())
        d.addErrback(lambda failure: self.supervisor.down(
            f"did not restart ({failure.getErrorMessage()})"))

    async def stop(self) -> None:
        self.supervisor.stop()
        await self._stop_postmaster()

    async def _stop_postmaster(self) -> None:
        if self._protocol is None or self._protocol.ended.called:
            return
        try:
            self._process.signalProcess(signal.SIGTERM)  # smart shutdown
        except error.ProcessExitedAlready:
            return
        fast = self.reactor.callLater(self.smart_shutdown_seconds, self._fast_shutdown)
        await self._protocol.ended
        if fast.active():
            fast.cancel()

    def _fast_shutdown(self) -> None:
        self.log.warn("PostgreSQL still has sessions after {seconds} s: fast shutdown",
                      seconds=self.smart_shutdown_seconds)
        with suppress(error.ProcessExitedAlready):
            self._process.signalProcess(signal.SIGINT)


def _sleep(reactor, seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)
