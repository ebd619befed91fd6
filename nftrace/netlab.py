"""Hosts in network namespaces joined by veth links: the lab, and the tests' fixtures.

A topology is a client, a router and a server:

    client eth0 10.77.1.2/24, fd77:1::2/64  ── r-client 10.77.1.1, fd77:1::1
    server eth0 10.77.2.2/24, fd77:2::2/64  ── r-server 10.77.2.1, fd77:2::1

Links are created directly inside their namespaces, so no interface ever appears in the
machine's own namespace, and the names inside each namespace are the same for every lab.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import EnvironmentProblem

CLIENT_V4, ROUTER_CLIENT_V4 = "10.77.1.2", "10.77.1.1"
SERVER_V4, ROUTER_SERVER_V4 = "10.77.2.2", "10.77.2.1"
CLIENT_V6, ROUTER_CLIENT_V6 = "fd77:1::2", "fd77:1::1"
SERVER_V6, ROUTER_SERVER_V6 = "fd77:2::2", "fd77:2::1"


def run(args: Sequence[str], *, check: bool = True, input: Optional[str] = None, timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(list(args), input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise EnvironmentProblem(f"{args[0]} is not installed (apt-get install iproute2 nftables)") from None
    if check and result.returncode != 0:
        raise EnvironmentProblem(f"{' '.join(args)}: {(result.stderr or result.stdout).strip()}")
    return result


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def in_netns(name: str, args: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    return run(["ip", "netns", "exec", name, *args], **kwargs)


def python_in_netns(name: str, module_args: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m ...` with this interpreter (it sees nftrace and its dependencies)."""
    return in_netns(name, [sys.executable, "-m", *module_args], **kwargs)


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
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        for name in self.namespaces:
            if not netns_exists(name):
                run(["ip", "netns", "add", name])
            in_netns(name, ["ip", "link", "set", "lo", "up"])
        run(["ip", "link", "add", "eth0", "netns", self.client, "type", "veth", "peer", "name", "r-client", "netns", self.router])
        run(["ip", "link", "add", "eth0", "netns", self.server, "type", "veth", "peer", "name", "r-server", "netns", self.router])
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

    def down(self) -> None:
        for name in self.namespaces:
            if netns_exists(name):
                run(["ip", "netns", "del", name], check=False)
