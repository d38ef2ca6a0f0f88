"""A two-node Slurm cluster on one machine: each slurmd in its own network namespace.

The test makes a private Linux bridge and two network namespaces; each namespace gets one end
of a veth pair (the other end on the bridge), its own address on a /24 picked free among the
10.x.y.0 subnets this machine has no route for, and a loopback. The bridge holds the first
address of the subnet; slurmctld listens there (in the machine's own namespace), so both nodes
and the test's clients reach it. Traffic stays between the bridge and the test's namespaces:
nothing else is addressed and nothing is forwarded or routed.

Each node's slurmd runs under ``nsenter --net=/run/netns/NS unshare --uts --mount`` (one exec
chain, no fork, so the PID this helper holds is slurmd's): its own hostname (``node1``/``node2``, the
NodeName/NodeHostname of slurm.conf, NodeAddr its address) and its own view of two paths,
bind-mounted in its private mount namespace: ``/etc/hosts`` (the nodes' and the controller's
names, so the launcher's MASTER_ADDR=node1 and gloo's own-address lookup resolve to the
bridge addresses) and a node directory (slurmd's spool, pid file and log, so the two slurmd do
not share them). Jobs are children of slurmd and inherit all of it.

Teardown, after the jobs are cancelled and the daemons stopped by PID (LocalSlurmCluster.stop):
any process still in a namespace (``ip netns pids NS``) is killed by PID, then the namespaces
and the bridge are deleted by the names this object made (the veth pairs go with them).
No accounting (slurmdbd) here: jobs are followed with ``scontrol show job`` (MinJobAge=600).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from make_deps import missing
from slurm_cluster import LocalSlurmCluster, _which
from slurm_cluster import unavailable_reason as slurm_unavailable_reason

NODES = ("node1", "node2")
PROGRAMS = ("ip", "nsenter", "unshare", "mount", "hostname")


def unavailable_reason() -> str | None:
    """None when the two-node cluster can be made (root, iproute2, util-linux, Slurm), else why not."""
    missing = [program for program in PROGRAMS if _which(program) is None]
    if missing:
        return f"programs missing for network namespaces: {', '.join(missing)} (Debian packages iproute2 util-linux)"
    return slurm_unavailable_reason()


@contextmanager
def two_node_cluster(root: Path, cpus: int = 2) -> Iterator["TwoNodeSlurmCluster"]:
    """A started two-node cluster under ``root`` for a test module (the two-node tests of the main
    suite and of tests/sglang_cpu); skips the test where it cannot be made (not root, programs
    missing), or fails it with MEGACREDIT_REQUIRE_ALL=1."""
    reason = unavailable_reason()
    if reason is not None:
        missing("netns", reason)
    with TwoNodeSlurmCluster(root, cpus=cpus) as cluster:
        yield cluster


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([_which("ip"), *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def _free_subnet() -> str:
    """A 10.x.y prefix that no route of this machine covers (checked against `ip -4 route`)."""
    routes = _ip("-4", "route", "show", "table", "all").stdout
    for _ in range(100):
        prefix = f"10.{secrets.randbelow(200) + 50}.{secrets.randbelow(250) + 1}"
        if f"{prefix}." not in routes and "10.0.0.0/8" not in routes:
            return prefix
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test bridge")


class TwoNodeSlurmCluster(LocalSlurmCluster):
    """slurmctld on a private bridge, slurmd ``node1`` and ``node2`` in network namespaces."""

    def __init__(self, root: str | os.PathLike, cpus: int | None = None, **kwargs) -> None:
        super().__init__(root, cpus, accounting=False, **kwargs)
        tag = secrets.token_hex(3)
        self.bridge = f"mcbr{tag}"  # interface names: at most 15 characters
        self.namespaces = {node: f"mc{tag}-{node}" for node in NODES}
        self._host_veths = {node: f"mcv{tag}{i}" for i, node in enumerate(NODES, 1)}
        prefix = _free_subnet()
        self.controller_addr = f"{prefix}.1"
        self.addresses = {node: f"{prefix}.{i}" for i, node in enumerate(NODES, 2)}
        self._made: list[tuple[str, str]] = []  # ("netns" | "link", name), in creation order

    def node_dir(self, node: str) -> Path:
        """slurmd's spool, pid file and log of ``node`` (seen by that slurmd as root/node)."""
        return self.root / f"{node}.d"

    def start(self) -> "TwoNodeSlurmCluster":
        try:
            self._make_network()
        except BaseException:
            self._remove_network()
            raise
        super().start()  # stops everything (self.stop) if a daemon fails to start
        return self

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self._remove_network()

    # -- network -----------------------------------------------------------------------
    def _make_network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("addr", "add", f"{self.controller_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for node, namespace in self.namespaces.items():
            _ip("netns", "add", namespace)
            self._made.append(("netns", namespace))
            veth = self._host_veths[node]
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", namespace, "addr", "add", f"{self.addresses[node]}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")

    def _remove_network(self) -> None:
        """Kill what is left in our namespaces (by PID), then delete them and the bridge by name."""
        for kind, name in reversed(self._made):
            if kind == "netns":
                for pid in _ip("netns", "pids", name, check=False).stdout.split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                _ip("netns", "del", name, check=False)
            else:
                _ip("link", "del", name, check=False)
        self._made.clear()

    # -- daemons -----------------------------------------------------------------------
    def _hosts_file(self) -> Path:
        hosts = self.root / "etc" / "hosts"
        lines = ["127.0.0.1 localhost", f"{self.controller_addr} {self.hostname}",
                 *(f"{address} {node}" for node, address in self.addresses.items())]
        hosts.write_text("\n".join(lines) + "\n")
        return hosts

    def _start_slurmd(self) -> None:
        hosts = self._hosts_file()
        mounted = self.root / "node"  # each slurmd sees its own node_dir here
        mounted.mkdir(exist_ok=True)
        script = ('mount --bind "$1" /etc/hosts && mount --bind "$2" "$3" && hostname "$4" '
                  '&& exec "$5" -D -N "$4"')
        for node, namespace in self.namespaces.items():
            (self.node_dir(node) / "spool").mkdir(parents=True, exist_ok=True)
            # nsenter, not `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup, which slurmd needs.
            command = [_which("nsenter"), f"--net=/run/netns/{namespace}", _which("unshare"), "--uts", "--mount",
                       "--propagation", "private", "--", "/bin/sh", "-c", script, "sh", str(hosts),
                       str(self.node_dir(node)), str(mounted), node, _which("slurmd")]
            self._spawn(f"slurmd:{node}", command)
        self._wait_idle(len(NODES), self.processes[f"slurmd:{NODES[-1]}"], self.node_dir(NODES[-1]) / "slurmd.log")

    def _node_config(self) -> str:
        mounted = self.root / "node"
        nodes = "\n".join(f"NodeName={node} NodeHostname={node} NodeAddr={address} CPUs={self.cpus} "
                          "RealMemory=1000 State=UNKNOWN" for node, address in self.addresses.items())
        return f"""\
SlurmdSpoolDir={mounted / 'spool'}
SlurmdPidFile={mounted / 'slurmd.pid'}
SlurmdLogFile={mounted / 'slurmd.log'}
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
