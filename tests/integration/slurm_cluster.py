"""A one-node Slurm cluster with accounting, brought up from nothing in a temporary directory.

Used by the launcher tests (``sbatch slurm/credit_8b.sh``, NeMo-Run's SlurmExecutor). The
daemons are Debian's slurm-wlm 22.05 (``slurmctld``, ``slurmd``, ``slurmdbd``) and a private
MariaDB for ``slurmdbd`` (NeMo-Run polls job states with ``sacct``, which needs accounting).
Everything lives under one directory: configs, state, spool, logs, the database. Every port is
picked free at start-up, so several such clusters (other test runs, other users) can run on one
machine at once; nothing under /etc/slurm or on the default ports 6817-6819 / 3306 is touched.
Clients find the cluster through ``SLURM_CONF`` (see :attr:`LocalSlurmCluster.env`).

Each daemon runs in the foreground (``-D``) as a child of this process, so teardown stops
exactly the processes this helper started, by PID: first every job of the cluster is cancelled,
then slurmd, slurmctld, slurmdbd and MariaDB get SIGTERM (SIGKILL after a grace period).

Missing packages are installed with apt when running as root (as the Makefile's
``system-deps`` does); :func:`unavailable_reason` says why a cluster cannot be started otherwise.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence

from megacredit.utils.spawn import find_free_port

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server")
"""Debian packages that provide the cluster."""
REQUIRED_PROGRAMS = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "sacctmgr", "scontrol",
                     "mariadbd", "mariadb-install-db", "mariadb")
"""Programs the cluster needs on PATH (or in /usr/sbin)."""
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def _which(program: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN_DIRS)
    return shutil.which(program, path=path)


def _missing_programs() -> list[str]:
    return [program for program in REQUIRED_PROGRAMS if _which(program) is None]


def _apt_install() -> str | None:
    """Install :data:`APT_PACKAGES` with apt (root only); None on success, else why not."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (["apt-get", "update", "-qq"],
             ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES])
    for command in steps:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            return f"`{' '.join(command)}` failed: {result.stderr.strip()[-300:]}"
    return None


def unavailable_reason() -> str | None:
    """None when a local cluster can be started (installing packages if needed), else why not."""
    if os.geteuid() != 0:
        return "the local Slurm cluster runs slurmd as root (it starts jobs as their users); not root"
    missing = _missing_programs()
    if not missing:
        return None
    failure = _apt_install()
    missing = _missing_programs()
    if not missing:
        return None
    return (f"Slurm/MariaDB programs missing ({', '.join(missing)}): install the Debian packages "
            f"{' '.join(APT_PACKAGES)} ({failure or 'apt did not provide them'})")


def _wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    state = "exited" if process is not None and process.poll() is not None else "timed out"
    raise RuntimeError(f"local Slurm cluster: {what} ({state}); log tail:\n{tail}")


def _distinct_free_ports(names: Sequence[str]) -> dict[str, int]:
    ports: set[int] = set()
    while len(ports) < len(names):
        ports.add(find_free_port())
    return dict(zip(names, sorted(ports)))


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class LocalSlurmCluster:
    """slurmctld + slurmd + slurmdbd + MariaDB on free ports under ``root``; a context manager."""

    def __init__(self, root: str | os.PathLike, cpus: int | None = None, kill_wait: int = 30,
                 cred_expire: int = 10, accounting: bool = True) -> None:
        self.root = Path(root)
        self.accounting = accounting  # slurmdbd + MariaDB (sacct); without them scontrol shows jobs
        self.cpus = cpus or os.cpu_count() or 1
        self.kill_wait = kill_wait
        # Slurm holds a requeued job for cred_expire seconds (default 120) before it may start.
        self.cred_expire = cred_expire
        self.hostname = socket.gethostname().split(".")[0]
        self.cluster_name = "mc" + secrets.token_hex(4)
        self.ports = _distinct_free_ports(("slurmctld", "slurmd", "slurmdbd", "mysql"))
        self.controller_addr = "127.0.0.1"  # where slurmd and clients reach slurmctld
        self.processes: dict[str, subprocess.Popen] = {}
        self._db_password = secrets.token_hex(8)

    # -- public ------------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm clients (and jobs) of this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, args: Sequence[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client command (sbatch, squeue, sacct, ...) against this cluster."""
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def job_ids(self) -> list[str]:
        """Ids of the jobs the controller still knows as pending, running or completing."""
        out = self.run(["squeue", "-h", "-o", "%A"], check=False).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def job_field(self, job_id: str, field: str) -> str:
        """One field of ``scontrol show job`` (JobState, Restarts, NodeList, ...); "" when absent."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False).stdout
        values = [word.split("=", 1)[1] for word in out.split() if word.startswith(field + "=")]
        return values[0] if values else ""

    def accounting_states(self, job_id: str) -> list[str]:
        """States of the job's allocation in accounting, one per run (requeues add rows)."""
        out = self.run(["sacct", "-n", "-X", "-P", "-D", "-j", str(job_id), "-o", "State"]).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def start(self) -> "LocalSlurmCluster":
        for sub in ("etc", "state", "spool", "log", "run", "mysql"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        try:
            if self.accounting:
                self._start_mariadb()
                self._start_slurmdbd()
            else:
                self._write_configs()
            self._start_slurmctld()
            self._start_slurmd()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel every job, then stop the daemons this object started (by PID)."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            jobs = self.job_ids()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                deadline = time.monotonic() + self.kill_wait + 30
                while self.job_ids() and time.monotonic() < deadline:
                    time.sleep(0.5)
        slurmds = [name for name in self.processes if name.startswith("slurmd:")]
        for name in (*slurmds, "slurmd", "slurmctld", "slurmdbd", "mysql"):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- daemons -----------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "ab")
        try:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env or self.env, start_new_session=True)
        finally:
            log.close()
        self.processes[name] = process
        return process

    def _start_mariadb(self) -> None:
        datadir, sock = self.root / "mysql" / "data", self.root / "run" / "mysql.sock"
        init = subprocess.run(
            [_which("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}", "--user=root",
             "--skip-test-db", "--auth-root-authentication-method=socket"],
            capture_output=True, text=True, timeout=300)
        if init.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {init.stderr[-1500:]}")
        log = self.root / "log" / "mariadb.err"
        process = self._spawn("mysql", [
            _which("mariadbd"), "--no-defaults", f"--datadir={datadir}", f"--socket={sock}",
            f"--port={self.ports['mysql']}", "--bind-address=127.0.0.1", "--user=root",
            f"--pid-file={self.root / 'run' / 'mysql.pid'}", f"--log-error={log}",
            "--skip-name-resolve", "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=16M",
            "--performance-schema=OFF"])
        _wait_for(lambda: sock.exists() and _port_open(self.ports["mysql"]), 120, "MariaDB did not start",
                  process, log)
        sql = (f"CREATE USER 'slurm'@'%' IDENTIFIED BY '{self._db_password}'; "
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'%'; FLUSH PRIVILEGES;")
        grant = subprocess.run([_which("mariadb"), "--no-defaults", f"--socket={sock}", "-uroot", "-e", sql],
                               capture_output=True, text=True, timeout=60)
        if grant.returncode != 0:
            raise RuntimeError(f"creating the slurm database user failed: {grant.stderr}")

    def _start_slurmdbd(self) -> None:
        self._write_configs()
        log = self.root / "log" / "slurmdbd.log"
        process = self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])
        _wait_for(lambda: _port_open(self.ports["slurmdbd"]), 120, "slurmdbd did not start", process, log)
        self.run(["sacctmgr", "-i", "add", "cluster", self.cluster_name], timeout=60)

    def _start_slurmctld(self) -> None:
        log = self.root / "log" / "slurmctld.log"
        process = self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c"])
        _wait_for(lambda: _port_open(self.ports["slurmctld"]), 60, "slurmctld did not start", process, log)

    def _start_slurmd(self) -> None:
        log = self.root / "log" / "slurmd.log"
        process = self._spawn("slurmd", [_which("slurmd"), "-D", "-N", "localhost"])
        self._wait_idle(1, process, log)

    def _wait_idle(self, nodes: int, process: subprocess.Popen, log: Path) -> None:
        def idle() -> bool:
            out = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False).stdout.split()
            return out == ["idle"] * nodes

        _wait_for(idle, 60, f"{nodes} node(s) did not become idle", process, log)

    def _node_config(self) -> str:
        """The NodeName and PartitionName lines of slurm.conf, and where slurmd keeps its files."""
        r = self.root
        return f"""\
SlurmdSpoolDir={r / 'spool'}
SlurmdPidFile={r / 'run' / 'slurmd.pid'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
NodeName=localhost NodeHostname={self.hostname} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""

    def _write_configs(self) -> None:
        r = self.root
        accounting = (f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
                      f"AccountingStoragePort={self.ports['slurmdbd']}\n") if self.accounting else ""
        slurm_conf = f"""\
ClusterName={self.cluster_name}
SlurmctldHost={self.hostname}({self.controller_addr})
SlurmctldPort={self.ports['slurmctld']}
SlurmdPort={self.ports['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
AuthInfo=cred_expire={self.cred_expire}
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
{accounting}StateSaveLocation={r / 'state'}
SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
ReturnToService=2
KillWait={self.kill_wait}
MinJobAge=600
InactiveLimit=0
{self._node_config()}"""
        dbd_conf = f"""\
AuthType=auth/none
DbdHost={self.hostname}
DbdAddr=127.0.0.1
DbdPort={self.ports['slurmdbd']}
SlurmUser=root
PidFile={r / 'run' / 'slurmdbd.pid'}
LogFile={r / 'log' / 'slurmdbd.log'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.ports['mysql']}
StorageUser=slurm
StoragePass={self._db_password}
StorageLoc=slurm_acct_db
"""
        self.conf.write_text(slurm_conf)
        if not self.accounting:
            return
        dbd = self.conf.with_name("slurmdbd.conf")
        dbd.write_text(dbd_conf)
        dbd.chmod(0o600)
