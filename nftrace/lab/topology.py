"""Hosts in network namespaces joined by veth links: the lab, and the tests' fixtures.

A topology is a client, a router and a server:

    client eth0 10.77.1.2/24, fd77:1::2/64  ── r-client 10.77.1.1, fd77:1::1
    server eth0 10.77.2.2/24, fd77:2::2/64  ── r-server 10.77.2.1, fd77:2::1

Links are created directly inside their namespaces, so no interface ever appears in the
machine's own namespace, and the names inside each namespace are the same for every lab.

The server can run listeners (`python -m nftrace.lab.traffic listen-tcp|listen-udp`, bound to
`::`, which takes IPv4 too), so that accepted connections complete. They are bounded in time
and `down()` ends them first: a process inside a namespace would keep it alive, unnamed,
after `ip netns del`.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import EnvironmentProblem
from ..kernel import runner
from ..kernel.runner import run
from ..kernel.system import netns_exists
from ..signals import SignalsHeld, undo_after

CLIENT_V4, ROUTER_CLIENT_V4 = "10.77.1.2", "10.77.1.1"
SERVER_V4, ROUTER_SERVER_V4 = "10.77.2.2", "10.77.2.1"
CLIENT_V6, ROUTER_CLIENT_V6 = "fd77:1::2", "fd77:1::1"
SERVER_V6, ROUTER_SERVER_V6 = "fd77:2::2", "fd77:2::1"
LISTENER_MODULE = "nftrace.lab.traffic"
LISTENER_READY_SECONDS = 10.0


def in_netns(name: str, args: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command inside the namespace (kernel.runner.run's keywords)."""
    return run(runner.netns_exec_argv(name, args), **kwargs)


def python_in_netns(name: str, module_args: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m ...` with this interpreter (it sees nftrace and its dependencies)."""
    return in_netns(name, [sys.executable, "-m", *module_args], **kwargs)


def python_env() -> dict:
    """The environment for a child Python: it imports this very nftrace, wherever it lives."""
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [package_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != package_root]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def netns_pids(name: str) -> list[int]:
    """Processes that live in the namespace (`ip netns pids`)."""
    if not netns_exists(name):
        return []
    result = run(["ip", "netns", "pids", name], check=False)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def is_listener(pid: int) -> bool:
    """Whether the process is one of the lab's listeners (and not anything else with that pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            args = cmdline.read().split(b"\0")
    except OSError:
        return False
    return LISTENER_MODULE.encode() in args and any(arg.startswith(b"listen-") for arg in args)


def _wait_gone(pids: Sequence[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if is_listener(pid)]
    return alive


@dataclass
class Topology:
    """client — router — server, each a namespace named PREFIX-client, -router, -server."""

    prefix: str

    @property
    def client(self) -> str:
        return f"{self.prefix}-client"

    @property
    def router(self) -> str:
        return f"{self.prefix}-router"

    @property
    def server(self) -> str:
        return f"{self.prefix}-server"

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.client, self.router, self.server)

    def exists(self) -> bool:
        return all(netns_exists(name) for name in self.namespaces)

    def up(self) -> None:
        """Create everything; on failure remove what was made."""
        if self.exists():
            return
        try:
            self._build()
        except BaseException as err:
            undo_after(err, self.down)
            raise

    def _build(self) -> None:
        for name in self.namespaces:
            if not netns_exists(name):
                run(["ip", "netns", "add", name])
            in_netns(name, ["ip", "link", "set", "lo", "up"])
        # Each pair is made from inside the router: some kernels (Debian 12's 6.1, in the lab VMs)
        # look a new link's name up in the caller's namespace too, so `ip link add eth0 netns X`
        # fails with "File exists" on a machine that has an eth0 of its own.
        in_netns(self.router, ["ip", "link", "add", "r-client", "type", "veth", "peer", "name", "eth0", "netns", self.client])
        in_netns(self.router, ["ip", "link", "add", "r-server", "type", "veth", "peer", "name", "eth0", "netns", self.server])
        for ns in (self.client, self.server, self.router):
            # No DAD delay: IPv6 addresses are usable at once.
            in_netns(ns, ["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])
        addresses = [
            (self.client, "eth0", f"{CLIENT_V4}/24", f"{CLIENT_V6}/64"),
            (self.server, "eth0", f"{SERVER_V4}/24", f"{SERVER_V6}/64"),
            (self.router, "r-client", f"{ROUTER_CLIENT_V4}/24", f"{ROUTER_CLIENT_V6}/64"),
            (self.router, "r-server", f"{ROUTER_SERVER_V4}/24", f"{ROUTER_SERVER_V6}/64"),
        ]
        for ns, dev, v4, v6 in addresses:
            in_netns(ns, ["ip", "addr", "add", v4, "dev", dev])
            in_netns(ns, ["ip", "-6", "addr", "add", v6, "dev", dev, "nodad"])
            in_netns(ns, ["ip", "link", "set", dev, "up"])
        for ns, v4, v6 in ((self.client, ROUTER_CLIENT_V4, ROUTER_CLIENT_V6), (self.server, ROUTER_SERVER_V4, ROUTER_SERVER_V6)):
            in_netns(ns, ["ip", "route", "add", "default", "via", v4])
            in_netns(ns, ["ip", "-6", "route", "add", "default", "via", v6])
        in_netns(self.router, ["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
        self._wait_until_ready()

    def _wait_until_ready(self, seconds: float = 5.0) -> None:
        """Links have carrier and no address is still tentative: a first packet sent right after
        `up` must not be lost to a link that is still coming up (seen on a loaded machine)."""
        deadline = time.monotonic() + seconds
        for ns in self.namespaces:
            while time.monotonic() < deadline:
                links = in_netns(ns, ["ip", "-o", "link", "show", "type", "veth"]).stdout
                addresses = in_netns(ns, ["ip", "-o", "addr", "show"]).stdout
                if "LOWER_UP" in links and all("LOWER_UP" in line for line in links.splitlines()) \
                        and "tentative" not in addresses:
                    break
                time.sleep(0.02)

    def start_listeners(self, tcp_ports: Sequence[int], udp_ports: Sequence[int], seconds: float) -> list[int]:
        """TCP and UDP listeners on the server for `seconds`; returns their pids once they listen.

        They run in a session of their own, so that they outlive the command that started
        them (`nftrace lab up`) and a Ctrl-C meant for a later command does not reach them.
        """
        pids = []
        for kind, ports in (("listen-tcp", tcp_ports), ("listen-udp", udp_ports)):
            if not ports:
                continue
            args = runner.netns_exec_argv(self.server, [sys.executable, "-m", LISTENER_MODULE, kind, "::",
                                                 *[str(port) for port in sorted(set(ports))], "--seconds", str(seconds)])
            process = runner.start(args, env=python_env(), new_session=True)
            pids.append(process.pid)
            try:
                self._await_ready(process, kind)
            except BaseException as err:
                undo_after(err, self.stop_listeners)
                raise
        return pids

    @staticmethod
    def _await_ready(process: subprocess.Popen, kind: str) -> None:
        ready, _, _ = select.select([process.stdout], [], [], LISTENER_READY_SECONDS)
        line = process.stdout.readline() if ready else b""
        process.stdout.close()
        if line.strip() != b"ready":
            lines = []
            if process.poll() is not None:
                lines = process.stderr.read().decode(errors="replace").strip().splitlines()
            process.stderr.close()
            reason = lines[-1] if lines else f"no answer in {LISTENER_READY_SECONDS:g} s"
            raise EnvironmentProblem(f"the server's {kind} listener did not start: {reason}")
        process.stderr.close()

    def listener_pids(self) -> list[int]:
        return [pid for pid in netns_pids(self.server) if is_listener(pid)]

    def stop_listeners(self) -> None:
        """End the server's listeners: SIGTERM, then SIGKILL for any that linger."""
        pids = self.listener_pids()
        for signum in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            pids = _wait_gone(pids, 2.0)
            if not pids:
                return

    def down(self) -> None:
        with SignalsHeld():
            self.stop_listeners()
            for name in self.namespaces:
                if netns_exists(name):
                    run(["ip", "netns", "del", name], check=False)
