"""Pieces shared by the benchmarks (bench/smtp_ingest.py, bench/delivery.py).

Temporary directories, subprocesses and clean-up on Ctrl-C/SIGTERM; sampling the
memory and CPU of a process tree; a private Postfix instance run from a
temporary directory (STARTTLS + SASL AUTH on a free loopback port, the rest of
its main.cf given by the caller); mailgw started as an operator starts it
(`mailgw init --demo`, `twistd -n mailgw`) from a temporary state directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
LOOPBACK = "127.0.0.1"
POSTFIX_USER = "bench"
POSTFIX_DOMAIN = "bench.localdomain"
PACKAGES = ["postfix", "sasl2-bin", "libsasl2-modules", "openssl"]


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Interrupts:
    """SIGINT/SIGTERM raise KeyboardInterrupt, except while cleaning up: then they wait."""

    shielded = 0
    pending = False

    @classmethod
    def handler(cls, signum: int, frame: object) -> None:
        if cls.shielded:
            cls.pending = True
        else:
            raise KeyboardInterrupt(f"signal {signum}")

    @classmethod
    @contextmanager
    def shield(cls) -> Iterator[None]:
        cls.shielded += 1
        try:
            yield
        finally:
            cls.shielded -= 1
            if not cls.shielded and cls.pending:
                cls.pending = False
                raise KeyboardInterrupt("signal during clean-up")


def run(argv: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a command, failing with its output when it fails.

    The command runs in its own session, so that a Ctrl-C in the terminal reaches only the
    benchmark, which decides what to stop.
    """
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                start_new_session=True, **kwargs)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} took more than {timeout:.0f} s") from None
    if result.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n"
                         f"{result.stdout}{result.stderr}")
    return result


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def make_temp_dir(prefix: str) -> Path:
    """A directory under /tmp that unprivileged daemons (postfix, mailgw) can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def wait_for_banner(port: int, timeout: float) -> None:
    """Wait until an SMTP server on loopback:`port` sends its 220 greeting."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"no SMTP banner on {LOOPBACK}:{port} after {timeout:.0f} s")
        time.sleep(0.2)


# --- process memory and CPU -------------------------------------------------------------

def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
    children, tree, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def status_kb(pid: int, key: str, name: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def cpu_seconds(pid: int, reaped_children: bool = True) -> float:
    """User + system CPU of `pid` (and of the children it has waited for), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = fields[11:15] if reaped_children else fields[11:13]
    return sum(int(f) for f in ticks) / os.sysconf("SC_CLK_TCK")


@dataclass
class MemoryPeaks:
    """Peaks seen by MemorySampler, in KiB, and the CPU the tree used meanwhile."""

    root_hwm: int = 0  # VmHWM of the root process
    children_rss: int = 0  # peak of the summed VmRSS of the root's descendants
    children_pss: int = 0  # same, proportional set size (shared memory counted once)
    tree_rss: int = 0  # peak of the summed VmRSS of the whole tree
    tree_pss: int = 0
    cpu_seconds: float = 0.0  # whole tree
    root_cpu_seconds: float = 0.0  # the root process alone (all its threads)
    cpu_start: tuple[float, float] = field(default=(0.0, 0.0), repr=False)


class MemorySampler:
    """Samples the memory of a process tree every `interval` seconds, keeping the peaks."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        self.root, self.interval = root, interval
        self.peaks = MemoryPeaks()
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        peaks = self.peaks
        tree = process_tree(self.root)
        rss = {pid: status_kb(pid, "VmRSS") for pid in tree}
        pss = {pid: status_kb(pid, "Pss", "smaps_rollup") for pid in tree}
        children = [pid for pid in tree if pid != self.root]
        peaks.root_hwm = max(peaks.root_hwm, status_kb(self.root, "VmHWM"))
        peaks.children_rss = max(peaks.children_rss, sum(rss[p] for p in children))
        peaks.children_pss = max(peaks.children_pss, sum(pss[p] for p in children))
        peaks.tree_rss = max(peaks.tree_rss, sum(rss.values()))
        peaks.tree_pss = max(peaks.tree_pss, sum(pss.values()))
        peaks.cpu_seconds = sum(cpu_seconds(pid) for pid in tree) - peaks.cpu_start[0]
        peaks.root_cpu_seconds = cpu_seconds(self.root, False) - peaks.cpu_start[1]

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.peaks.cpu_start = (sum(cpu_seconds(pid) for pid in process_tree(self.root)),
                                cpu_seconds(self.root, False))
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> MemoryPeaks:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        self.sample()
        return self.peaks


# --- the servers under test -------------------------------------------------------------

@dataclass
class Server:
    """A running server: where to send, with which credentials, and its root process."""

    name: str
    port: int
    username: str
    password: str
    sender: str
    pid: int
    home: Path | None = None  # the server's temporary directory (postfix_server)


def ensure_postfix() -> None:
    """Install Postfix and Cyrus SASL unless present, without configuring a system Postfix."""
    missing = [p for p in PACKAGES
               if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                 text=True).stdout != "install ok installed"]
    if not missing:
        return
    if os.geteuid() != 0:
        raise BenchError(f"need root to install {' '.join(missing)}")
    log(f"installing {' '.join(missing)} with apt-get")
    with Interrupts.shield():  # never leave dpkg half-way
        # "No configuration": no /etc/postfix/main.cf, so no system instance on port 25.
        run(["debconf-set-selections"],
            input="postfix postfix/main_mailer_type select No configuration\n")
        run(["apt-get", "update", "-qq"], timeout=300)
        run(["apt-get", "install", "-y", "-qq", *missing], timeout=600,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


POSTFIX_MAIN_CF = """\
# Private Postfix instance for a mailgw benchmark; everything lives under {root}.
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/maillog
maillog_file_prefixes = {root}

myhostname = {domain}
mydomain = {domain}
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# Only for anvil's exemptions from connection limits; no restriction permits mynetworks.
mynetworks = 127.0.0.0/8
mydestination =
relay_domains =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
smtpd_peername_lookup = no
message_size_limit = 512000

smtpd_tls_security_level = encrypt
smtpd_tls_auth_only = yes
smtpd_tls_cert_file = {root}/tls/cert.pem
smtpd_tls_key_file = {root}/tls/key.pem
smtpd_tls_mandatory_protocols = >=TLSv1.2
smtpd_tls_protocols = >=TLSv1.2

smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
# Debian's smtpd reads $config_directory/sasl/smtpd.conf whatever this says.
cyrus_sasl_config_path = {root}/etc/sasl
smtpd_sasl_local_domain = {domain}
smtpd_sasl_security_options = noanonymous
smtpd_sasl_tls_security_options = noanonymous

smtpd_client_restrictions =
smtpd_helo_restrictions =
smtpd_sender_restrictions = permit_sasl_authenticated, reject
smtpd_relay_restrictions = permit_sasl_authenticated, reject

# What happens to accepted mail: the benchmark's part.
{delivery}"""

POSTFIX_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{port} inet  n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

SASL_SMTPD_CONF = """\
pwcheck_method: auxprop
auxprop_plugin: sasldb
mech_list: PLAIN LOGIN
sasldb_path: {root}/etc/sasl/sasldb2
"""


def self_signed_certificate(directory: Path, common_name: str) -> None:
    """cert.pem and key.pem in `directory`: ECDSA P-256, like mailgw's own self-signed one."""
    directory.mkdir()
    run(["openssl", "req", "-x509", "-nodes", "-newkey", "ec",
         "-pkeyopt", "ec_paramgen_curve:prime256v1", "-days", "2",
         "-subj", f"/CN={common_name}", "-keyout", str(directory / "key.pem"),
         "-out", str(directory / "cert.pem")])


@contextmanager
def postfix_server(delivery_cf: str) -> Iterator[Server]:
    """A private Postfix instance on a free loopback port; removed again on exit.

    `delivery_cf` ends main.cf: the transports and the recipient restrictions (what
    happens to accepted mail). The yielded Server's `home` is the instance's directory
    (main.cf in etc/, the queue in queue/, the log in maillog).
    """
    root = make_temp_dir("mailgw-bench-postfix-")
    config = root / "etc"
    password = os.urandom(12).hex()
    try:
        port = free_port()
        config.mkdir()
        (config / "main.cf").write_text(POSTFIX_MAIN_CF.format(root=root, domain=POSTFIX_DOMAIN,
                                                               delivery=delivery_cf))
        (config / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=f"{LOOPBACK}:{port}"))
        (root / "queue").mkdir()
        (root / "data").mkdir()
        shutil.chown(root / "data", "postfix", "postfix")
        self_signed_certificate(root / "tls", POSTFIX_DOMAIN)
        sasl = config / "sasl"
        sasl.mkdir()
        (sasl / "smtpd.conf").write_text(SASL_SMTPD_CONF.format(root=root))
        run(["saslpasswd2", "-p", "-c", "-f", str(sasl / "sasldb2"), "-u", POSTFIX_DOMAIN,
             POSTFIX_USER], input=password + "\n")
        shutil.chown(sasl / "sasldb2", "root", "postfix")
        (sasl / "sasldb2").chmod(0o640)

        postfix = ["postfix", "-c", str(config)]
        run([*postfix, "check"])  # creates the queue's subdirectories with their owners
        run([*postfix, "start"])
        wait_for_banner(port, 30)
        pid = int((root / "queue" / "pid" / "master.pid").read_text().split()[0])
        log(f"postfix {postconf(config, 'mail_version')} ready on {LOOPBACK}:{port} "
            f"(pid {pid}, config {config})")
        yield Server("postfix", port, POSTFIX_USER, password, f"{POSTFIX_USER}@{POSTFIX_DOMAIN}",
                     pid, root)
    finally:
        with Interrupts.shield():
            stop_postfix(config, root / "queue" / "pid" / "master.pid")
            shutil.rmtree(root, ignore_errors=True)


def postconf(config: Path, name: str) -> str:
    return run(["postconf", "-c", str(config), "-h", name]).stdout.strip()


def stop_postfix(config: Path, pid_file: Path) -> None:
    """`postfix stop` if the instance's master runs, and wait for it to exit."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return  # never started
    result = subprocess.run(["postfix", "-c", str(config), "stop"], capture_output=True,
                            text=True, timeout=60)
    if result.returncode != 0:
        log(f"postfix stop failed: {result.stdout}{result.stderr}".strip())
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


READY = re.compile(r"mailgw ready: .*smtp\.starttls_listeners\[0\]=(\d+)")
CANNOT_START = re.compile(r"mailgw cannot start.*")


@contextmanager
def mailgw_server(delivery_toml: str, keep_log: Path | None = None, root: Path | None = None,
                  report: Callable[[Path], None] | None = None) -> Iterator[Server]:
    """mailgw started as an operator would, from `root` (a fresh temp dir when None); stopped
    on exit.

    `delivery_toml` ends the config file (the [delivery] section). `root` holds the config,
    the state directory and twistd.log; a `root` given by the caller is kept, so a later
    start reuses the database (`mailgw init --demo` runs only the first time). On exit
    `report(log_path)` (default: report_log) looks at twistd's log.
    """
    own_root = root is None
    root = make_temp_dir("mailgw-bench-mailgw-") if root is None else root
    state = root / "state"
    config = root / "mailgw.toml"
    log_path = root / "twistd.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process: subprocess.Popen[bytes] | None = None
    try:
        listener = f"tcp:0:interface={LOOPBACK}"
        config.write_text(f"""\
hostname = "localhost"
state_dir = "{state}"

[smtp]
starttls_listeners = ["{listener}"]
implicit_tls_listeners = ["{listener}"]

[http]
listener = "{listener}"

{delivery_toml}""")
        if not (state / "demo.json").exists():
            log("mailgw init --demo (creates the embedded PostgreSQL cluster)")
            with Interrupts.shield():  # it runs PostgreSQL for a while: let it stop it
                run([str(VENV_BIN / "mailgw"), "-c", str(config), "init", "--demo"],
                    timeout=180, cwd=REPO, env=env)
            log(f"embedded PostgreSQL: {durability(state / 'pg' / 'data' / 'postgresql.conf')}")
        demo = json.loads((state / "demo.json").read_text())
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "mailgw", "-c", str(config)],
                cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)  # Ctrl-C reaches the benchmark only, which stops it
        port = wait_ready(process, log_path, 120)
        wait_for_banner(port, 10)
        log(f"mailgw ready on {LOOPBACK}:{port} (twistd pid {process.pid}, state {state})")
        yield Server("mailgw", port, demo["user"], demo["password"], demo["sender"],
                     process.pid, root)
    finally:
        with Interrupts.shield():
            if process is not None:
                stop_process(process)
                (report or report_log)(log_path)
                if keep_log is not None and log_path.exists():
                    shutil.copy(log_path, keep_log)
            if own_root:
                shutil.rmtree(root, ignore_errors=True)


def embedded_dsn(server: Server) -> str:
    """libpq connection string of a running mailgw's embedded PostgreSQL (trust, Unix socket)."""
    assert server.home is not None
    return f"host={server.home / 'state' / 'pg'} port=5432 dbname=mailgw user=mailgw"


def run_sql(dsn: str, query: str, params: dict | tuple | None = None) -> list[tuple]:
    """One statement against a database (autocommit): its rows, [] for none."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(query, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


def durability(postgresql_conf: Path) -> str:
    """The durability settings the embedded cluster runs with (last assignment wins)."""
    settings = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
    try:
        text = postgresql_conf.read_text()
    except OSError as e:
        return f"cannot read {postgresql_conf} ({e.strerror})"
    for match in re.finditer(r"^\s*(fsync|synchronous_commit|full_page_writes)\s*=\s*'?(\w+)",
                             text, re.MULTILINE):
        settings[match[1]] = match[2]
    return ", ".join(f"{key}={value}" for key, value in settings.items())


def wait_ready(process: subprocess.Popen[bytes], log_path: Path, timeout: float) -> int:
    """The STARTTLS port from the 'mailgw ready:' log line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if match := READY.search(text):
            return int(match[1])
        if (failed := CANNOT_START.search(text)) or process.poll() is not None:
            reason = failed[0] if failed else f"twistd exited with status {process.returncode}"
            raise BenchError(f"{reason}\n--- twistd log ---\n{text[-3000:]}")
        time.sleep(0.2)
    raise BenchError(f"no 'mailgw ready:' line after {timeout:.0f} s")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM twistd and wait; if it hangs, SIGKILL it and the processes it started."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
        # twistd re-raises the signal that stopped it once it has shut down cleanly.
        status = process.returncode
        log("mailgw stopped" + ("" if status in (0, -signal.SIGTERM) else f" (status {status})"))
        return
    except subprocess.TimeoutExpired:
        log("mailgw did not stop within 60 s after SIGTERM; killing it and its children")
    for pid in reversed(process_tree(process.pid)):  # children first, twistd last
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


LOG_PROBLEM = re.compile(r"#(warn|error|critical)\]|Traceback|Unhandled|"
                         r"\b(ERROR|FATAL|PANIC|WARNING):")
SESSION_LINE = re.compile(r"smtp session from .* messages=(\d+) recipients=\d+ errors=(\d+)")


def report_log(log_path: Path) -> None:
    """What mailgw's own log says: its session totals, and its warnings and errors."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return
    sessions = [m for m in map(SESSION_LINE.search, lines) if m]
    log(f"mailgw's log: {len(sessions)} sessions, {sum(int(m[1]) for m in sessions)} messages, "
        f"{sum(int(m[2]) for m in sessions)} session errors")
    problems = [line for line in lines if LOG_PROBLEM.search(line)]
    if problems:
        log(f"mailgw's log: {len(problems)} warning/error lines, the first ones:")
        for line in problems[:15]:
            print("    " + line[:300])


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


# --- rounds -----------------------------------------------------------------------------

def cpu_ceiling(messages: int, server_cpu: float, client_cpu: float) -> float:
    """Messages per second this machine would reach with every core busy, at the CPU per
    message that the server (its whole process tree) and the load generator used.

    Concurrency, processes or nodes can bring a server up to its ceiling, never past
    it: the ratio of two ceilings is what the servers' CPU costs allow, whatever the
    architecture. Connection set-up (TLS handshakes, AUTH) is counted in."""
    used = server_cpu + client_cpu
    return len(os.sched_getaffinity(0)) * messages / used if used else 0.0


class Rounds:
    """The rates of the peer and of mailgw, measured alternately, round after round.

    A shared VM's speed drifts by tens of percent from one minute to the next; each
    round's ratio compares two measurements taken a minute apart, and the result is
    the median over the rounds."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.pairs: list[tuple[float, float]] = []  # (peer, mailgw) of each finished round
        self.ceilings: list[tuple[float, float]] = []  # their cpu_ceiling, same order

    def add(self, peer_rate: float, mailgw_rate: float, peer_ceiling: float,
            mailgw_ceiling: float) -> None:
        if peer_rate and mailgw_rate:
            self.pairs.append((peer_rate, mailgw_rate))
            self.ceilings.append((peer_ceiling, mailgw_ceiling))

    @property
    def mailgw(self) -> float:
        return statistics.median(m for _, m in self.pairs) if self.pairs else 0.0

    @property
    def ratio(self) -> float:
        return statistics.median(m / p for p, m in self.pairs) if self.pairs else 0.0

    def print(self, unit: str) -> None:
        print(f"\nrounds ({unit}; the result is the median):")
        for number, (peer, mailgw) in enumerate(self.pairs, 1):
            print(f"  {number}: {self.peer} {peer:.2f}, mailgw {mailgw:.2f}, "
                  f"ratio {mailgw / peer:.2f}")
        print(f"CPU ceilings ({unit} with every core busy, at the CPU per message each server "
              "and the load generator used; common.cpu_ceiling):")
        for number, (peer, mailgw) in enumerate(self.ceilings, 1):
            ratio = mailgw / peer if peer else 0.0
            print(f"  {number}: {self.peer} {peer:.0f}, mailgw {mailgw:.0f}, ratio {ratio:.2f}")
