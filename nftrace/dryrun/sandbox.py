"""A sandbox: a fresh network namespace that holds a copy of another one's network state.

The dry run traces its crafted packet here, so that the kernel itself decides, with the
target's interfaces, routes, sysctls and ruleset, while the target is never touched.

- Every interface of the target becomes a veth with the same name, MAC address, MTU and
  state, so that `iifname`, `oifname`, `iif` and `oif` match as they do in the target. The
  other end of each veth lives in a helper namespace (`<sandbox>-h`), from which a packet
  can arrive on any interface, as from the wire. A bridge is copied as a bridge (its
  VLAN filtering, its ports' VLANs, the addresses it has learnt as static entries, spanning
  tree off so that its ports forward at once), and its ports as veths in it.
- Addresses, nexthops, routes and policy rules are replayed with `ip -batch`, then the
  sandbox's routes and rules are made equal to the target's (routes the kernel added on its
  own and the target lacks are deleted).
- The sysctls of netstate are written, the ruleset is loaded (the copy, or a candidate
  file), and the listening TCP/UDP ports get small listeners of nftrace's own.

Names are `nftrace-sbx-<pid>-<hex>`: `close()` removes them on every exit path, and
`remove_leftover_sandboxes` (run by `nftrace cleanup`) removes those whose pid is gone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..errors import EnvironmentProblem, InputError, KernelError
from .netstate import (NetworkState, parse_route_lines, parse_rule_lines, sandbox_table_text,
                       split_tables)
from ..kernel.nft import NftContext
from ..kernel.nsexec import call_in_namespace
from ..kernel.tracetable import is_trace_table
from ..trace.ruleset import parse_ruleset_listing
from ..kernel import runner
from ..kernel.runner import CommandFailed
from ..kernel.system import NETNS_RUN_DIR, netns_exists, pid_alive
from ..protocols import iptables_command
from ..signals import SignalsHeld, undo_after
from .inject import random_mac

SANDBOX_PREFIX = "nftrace-sbx-"
_NAME_RE = re.compile(rf"^{SANDBOX_PREFIX}(\d+)-[0-9a-f]+(?:-[a-z0-9-]+)?$")
IPTABLES_SAVE_RE = re.compile(r"^\*(filter|nat|mangle|raw|security)\s*$", re.MULTILINE)
_IPV6_HINT_RE = re.compile(r"(\s-[sd]\s+!?\s*[0-9a-fA-F]*:[0-9a-fA-F:]*|icmpv6|ipv6-icmp|--icmpv6-type)")
RULESET_KINDS = ("nft", "iptables-legacy", "iptables-nft")
LISTEN_BACKLOG = 16
LINK_SETTLE_SECONDS = 2.0
ROUTE_SYNC_ROUNDS = 6
PEER_INDEX_BASE = 1 << 20
ROUTE_SYNC_PAUSE = 0.02
IP_FREEBIND = 15  # linux/in.h; Python's socket module does not name it
BATCH_TIMEOUT = 300.0  # thousands of routes, on a loaded machine
RESTORE_TIMEOUT = 120.0


def sandbox_name() -> str:
    return f"{SANDBOX_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class CandidateRuleset:
    """`--ruleset FILE`: what to load in the sandbox instead of the target's ruleset."""

    path: Path
    kind: str  # nft | iptables-legacy | iptables-nft

    @property
    def family(self) -> int:
        """For iptables-save files: IPv6 when the rules speak of IPv6 addresses or ICMPv6."""
        return 6 if _IPV6_HINT_RE.search(self.path.read_text()) else 4


def read_candidate(path: Path, kind: Optional[str] = None) -> CandidateRuleset:
    """Check that FILE can be read, and say what kind of ruleset it is."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(f"--ruleset: cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"--ruleset: {path} is not a text file") from None
    if kind is not None and kind not in RULESET_KINDS:
        raise InputError(f"--ruleset-kind: '{kind}' is not one of {', '.join(RULESET_KINDS)}")
    if kind is None:
        kind = default_iptables_kind() if IPTABLES_SAVE_RE.search(text) and "COMMIT" in text else "nft"
    return CandidateRuleset(path.resolve(), kind)


def default_iptables_kind() -> str:
    """The flavour that `iptables` means on this machine (Debian's alternatives)."""
    try:
        version = runner.run(["iptables", "-V"], check=False).stdout
    except CommandFailed:
        return "iptables-nft"
    return "iptables-legacy" if "legacy" in version else "iptables-nft"


def load_ruleset_file(netns: str, candidate: CandidateRuleset) -> None:
    """Load a ruleset file into a namespace; a bad file is one line naming file and line."""
    if candidate.kind == "nft":
        try:
            call_in_namespace(netns, lambda: NftContext().run_file(str(candidate.path)))
        except KernelError as err:
            raise InputError(f"--ruleset: {err}") from None
        return
    flavour = candidate.kind.split("-", 1)[1]
    tool = f"{iptables_command(candidate.family)}-{flavour}-restore"
    with open(candidate.path) as rules:
        result = runner.run(runner.netns_exec_argv(netns, [tool]), input=rules, check=False, timeout=RESTORE_TIMEOUT)
    if result.returncode != 0:
        raise InputError(f"--ruleset: {candidate.path}: {tool}: {runner.first_line(result)}")


@dataclass
class PeerLink:
    """The helper-side end of a sandbox interface: where packets for that interface come from."""

    interface: str
    peer: str
    mac: str  # the sandbox end's MAC (the target interface's, or a made-up one)


@dataclass
class BatchResult:
    failed: list = field(default_factory=list)  # (line, message)


def _run_batch(netns: str, lines: Sequence[str], family: Optional[int] = None, tool: str = "ip") -> BatchResult:
    """`ip -n NETNS -force -batch -` (or `bridge ...`): every line is tried; failures come back
    with the tool's message."""
    result = BatchResult()
    if not lines:
        return result
    argv = [tool, *(["-6"] if family == 6 else ["-4"] if family == 4 else []), "-n", netns, "-force", "-batch", "-"]
    done = runner.run(argv, input="\n".join(lines) + "\n", check=False, timeout=BATCH_TIMEOUT)
    message: list[str] = []
    for text in done.stderr.splitlines():
        match = re.match(r"^Command failed -:(\d+)$", text.strip())
        if match:
            number = int(match.group(1))
            line = lines[number - 1] if 0 < number <= len(lines) else "?"
            result.failed.append((line, "; ".join(message) or "failed"))
            message = []
        elif text.strip():
            message.append(text.strip())
    if done.returncode != 0 and not result.failed:
        raise EnvironmentProblem(f"ip -batch in {netns}: {'; '.join(message) or 'failed'}")
    return result


def _write_sysctls(values: dict) -> list[str]:
    """Runs inside the namespace; returns the sysctls that could not be written."""
    failed = []
    for path, value in values.items():
        try:
            with open(f"/proc/sys/net/{path}", "w") as handle:
                handle.write(value)
        except OSError as err:
            failed.append(f"{path.replace('/', '.')}={value} ({err.strerror})")
    return failed


class Sandbox:
    """A namespace holding a copy of `state`; `close()` (or the `with` block) removes it."""

    def __init__(self, state: NetworkState):
        self.state = state
        self.name = sandbox_name()
        self.helper = f"{self.name}-h"
        self.peers: dict[str, PeerLink] = {}
        self.warnings: list[str] = []
        self.not_copied: list[str] = []
        self.approximated: dict[str, str] = {}  # interface → what it really is (bridge, vlan, port of ...)
        self._namespaces: list[str] = []
        self._listeners: list[socket.socket] = []

    # -- building ---------------------------------------------------------------------------

    def build(self, candidate: Optional[CandidateRuleset] = None) -> None:
        """Copy everything in; on any failure, remove what was made."""
        try:
            for name in (self.name, self.helper):
                self._add_namespace(name)
            call_in_namespace(self.name, _write_sysctls, {"ipv6/conf/all/accept_dad": "0",
                                                          "ipv6/conf/default/accept_dad": "0"})
            # The helper only injects frames: no IPv6 chatter (DAD, router solicitations) from it.
            call_in_namespace(self.helper, _write_sysctls, {"ipv6/conf/all/disable_ipv6": "1",
                                                            "ipv6/conf/default/disable_ipv6": "1"})
            self._make_interfaces()
            self._raise_peers()
            self._copy_sysctls()
            self._copy_addresses_and_routes()
            if candidate is None:
                self._copy_ruleset()
            else:
                load_ruleset_file(self.name, candidate)
            self._open_listeners()
        except BaseException as err:
            undo_after(err, self.close)
            raise

    def _add_namespace(self, name: str) -> None:
        with SignalsHeld():  # a namespace made is a namespace close() knows of
            runner.run(["ip", "netns", "add", name], what=f"cannot create the sandbox namespace {name}")
            self._namespaces.append(name)

    def _make_interfaces(self) -> None:
        # A new namespace can already hold devices: lo, and the fallback tunnels (tunl0, sit0,
        # ...) that tunnel modules add to every namespace. Those are configured, not made.
        existing = {link["ifname"]: link for link in json.loads(self._sandbox_text("-j", "link", "show") or "[]")}
        taken = {link["ifindex"] for link in existing.values()}
        bridges = [i for i in self.state.interfaces if i.kind == "bridge" and i.name not in existing]
        self._make_bridges(bridges, taken)
        lines = []
        for interface in self.state.interfaces:
            if interface.name in existing:
                if interface.mtu != existing[interface.name].get("mtu"):
                    lines.append(f"link set {interface.name} mtu {interface.mtu}")
                continue
            if interface.kind == "bridge":
                continue
            peer = f"p{interface.index}"
            mac = interface.ethernet_mac or random_mac()
            self.peers[interface.name] = PeerLink(interface.name, peer, mac)
            # The copy keeps the target's ifindex where it is free (`meta iif` compares
            # numbers). The peer's must differ: the kernel announces a veth's carrier at once
            # only when its peer's index is not its own, and a second later otherwise.
            index = f"index {interface.index} " if interface.index not in taken else ""
            lines.append(f"link add {interface.name} {index}address {mac} mtu {interface.mtu} "
                         f"type veth peer name {peer} index {PEER_INDEX_BASE + interface.index} mtu {interface.mtu} "
                         f"netns {self.helper}")
            copied_bridge = self.state.bridge_of(interface.name) if interface.master else None
            if copied_bridge is not None:
                lines.append(f"link set {interface.name} master {copied_bridge.name}")
            if interface.kind not in (None, "veth"):
                self.approximated[interface.name] = f"{interface.name} is a {interface.kind}"
            elif interface.master and copied_bridge is None:
                self.approximated[interface.name] = f"{interface.name} is a port of {interface.master}"
            if interface.name in self.approximated:
                self.not_copied.append(f"interface {self.approximated[interface.name]}: the sandbox has a plain veth "
                                       f"of that name")
        failed = _run_batch(self.name, lines).failed
        if failed:
            line, message = failed[0]
            raise EnvironmentProblem(f"cannot create the sandbox's interfaces ({line}): {message}")
        if bridges:
            self._copy_bridge_tables({bridge.name for bridge in bridges})

    def _make_bridges(self, bridges: list, taken: set) -> None:
        """Bridges before their ports. Spanning tree is off, so that the ports forward at once
        (a dry run has no time for the listening and learning states); an option this kernel
        refuses (VLAN filtering, when it is built without) is left out and said."""
        for bridge in bridges:
            index = f"index {bridge.index} " if bridge.index not in taken else ""
            base = f"link add {bridge.name} {index}address {bridge.mac} mtu {bridge.mtu} type bridge stp_state 0"
            options = " ".join(f"{key} {value}" for key, value in bridge.bridge.items() if key != "stp_state")
            failed = _run_batch(self.name, [f"{base} {options}".strip()]).failed
            if failed and options:
                self.not_copied.append(f"bridge {bridge.name}'s options {options}: {failed[0][1]}")
                failed = _run_batch(self.name, [base]).failed
            if failed:
                raise EnvironmentProblem(f"cannot create the sandbox's bridge {bridge.name}: {failed[0][1]}")
            if bridge.bridge.get("stp_state", "0") != "0":
                self.not_copied.append(f"spanning tree of bridge {bridge.name}: the sandbox's ports forward at once, "
                                       f"where live a port may be blocking")

    def _copy_bridge_tables(self, bridges: set) -> None:
        """The VLANs of bridges that filter them (the sandbox's defaults replaced), and every
        address the bridges had learnt, as static entries: a frame goes to the port its
        destination is behind, as it does live, and is not flooded."""
        lines = []
        for dev in sorted({vlan.dev for vlan in self.state.vlans}):
            lines.append(f"vlan del dev {dev} vid 1{' self' if dev in bridges else ''}")
        lines += [vlan.add_command(vlan.dev in bridges) for vlan in self.state.vlans]
        for entry in self.state.fdb:
            vlan = f" vlan {entry.vlan}" if entry.vlan else ""
            lines.append(f"fdb replace {entry.mac} dev {entry.port} master static{vlan}")
        for line, message in _run_batch(self.name, lines, tool="bridge").failed:
            if not line.startswith("vlan del"):
                self.warnings.append(f"not copied: bridge {line} ({message})")

    def _copy_sysctls(self) -> None:
        names = {i.name for i in self.state.interfaces}
        values = {path: value for path, value in self.state.sysctls.items()
                  if "/conf/" not in path or path.split("/")[2] in ("all", "default", *names)}
        for failure in call_in_namespace(self.name, _write_sysctls, values):
            self.warnings.append(f"sysctl not copied: {failure}")

    def _copy_addresses_and_routes(self) -> None:
        lines = []
        for interface in self.state.interfaces:
            lines += [address.replace_command(interface.name) for address in interface.addresses]
        lines += [f"link set {i.name} up" for i in self.state.interfaces if i.up]
        lines += [f"nexthop replace {line}" for line in self.state.nexthops]
        for line, message in _run_batch(self.name, lines).failed:
            self.warnings.append(f"not copied: ip {line} ({message})")
        self._wait_for_links()
        for family in (4, 6):
            self._copy_routes(family)
            self._copy_rules(family)

    def _wait_for_links(self) -> None:
        """The kernel finishes bringing a link up asynchronously (linkwatch): IPv6 adds its
        link-local and multicast routes only then. Routes are compared after that."""
        wanted = {i.name for i in self.state.interfaces if i.up and not i.is_loopback}
        deadline = time.monotonic() + LINK_SETTLE_SECONDS
        while wanted:
            links = json.loads(self._sandbox_text("-j", "link", "show") or "[]")
            if all(link.get("operstate") == "UP" for link in links if link.get("ifname") in wanted):
                return
            if time.monotonic() >= deadline:
                return  # a link that stays down is the copy's truth too
            time.sleep(0.01)

    def _sandbox_text(self, *args: str) -> str:
        return runner.run(runner.ip_argv(self.name, *args)).stdout

    def _copy_routes(self, family: int) -> None:
        """Make the sandbox's routes those of the target: delete what only the sandbox has
        (routes the kernel made on its own), add what it lacks, until both lists agree.

        `replace` cannot be used: for IPv6 it may pick another device's route of the same
        prefix and metric (fe80::/64 on every interface) and overwrite it. The kernel adds
        some routes a moment after a link comes up (IPv6 multicast and link-local routes),
        so the lists are compared again after each round.
        """
        wanted = self.state.routes.get(family, [])
        wanted_set = set(wanted)
        failed: list = []
        for round_number in range(ROUTE_SYNC_ROUNDS):
            if round_number:
                time.sleep(ROUTE_SYNC_PAUSE)
            present = parse_route_lines(self._sandbox_text(f"-{family}", "route", "show", "table", "all"), family)
            present_set = set(present)
            extra = [f"route delete {line}" for line in present if line not in wanted_set]
            missing = [f"route add {line}" for line in wanted if line not in present_set]
            if not extra and [line for line, _ in failed] == missing:
                break  # equal, or equal but for routes the kernel refuses
            _run_batch(self.name, extra, family)
            failed = _run_batch(self.name, missing, family).failed
        for line, message in failed:
            self.warnings.append(f"route not copied: {line[len('route add '):]} ({message})")

    def _copy_rules(self, family: int) -> None:
        wanted = self.state.rules.get(family, [])
        present = parse_rule_lines(self._sandbox_text(f"-{family}", "rule", "show"))
        lines = [f"rule delete {line}" for line in present if line not in wanted]
        lines += [f"rule add {line}" for line in wanted if line not in present]
        for line, message in _run_batch(self.name, lines, family).failed:
            self.warnings.append(f"policy rule not copied: {line} ({message})")

    def _raise_peers(self) -> None:
        lines = [f"link set {peer.peer} up" for peer in self.peers.values()]
        failed = _run_batch(self.helper, lines).failed
        if failed:
            raise EnvironmentProblem(f"cannot bring up the sandbox's helper links: {failed[0][1]}")

    def _copy_ruleset(self) -> None:
        texts = []
        for block in split_tables(self.state.nft_listing):
            if is_trace_table(block.name):
                continue  # a live nftrace run's own trace rules, not the admin's
            if (block.family, block.name) in self.state.xtables_nft:
                continue  # restored below with iptables-nft-restore
            if block.uses_xtables:
                self.not_copied.append(f"table {block.family} {block.name}: {block.family} tables with rules that "
                                       f"nft cannot print are not copied")
                continue
            text, changes = sandbox_table_text(block)
            self.not_copied += changes
            texts.append(text)
        if texts:
            try:
                call_in_namespace(self.name, lambda: NftContext().run("".join(texts)))
            except KernelError as err:
                raise EnvironmentProblem(f"cannot copy the nftables ruleset of {self.state.where} into the "
                                         f"sandbox: {err}") from None
        restores = [(f"{iptables_command(family)}-nft-restore", text)
                    for (family, _), text in sorted(self.state.xtables_nft.items())]
        restores += [(f"{tool}-legacy-restore", text) for tool, text in sorted(self.state.legacy.items())]
        for tool, text in restores:
            argv = runner.netns_exec_argv(self.name, [tool, "-c", *(["--noflush"] if "-nft-" in tool else [])])
            runner.run(argv, input=text, timeout=RESTORE_TIMEOUT,
                       what=f"cannot copy the iptables rules of {self.state.where} into the sandbox: {tool}")
        if self.state.xtables_nft:
            self._drop_chains_the_target_lacks(set(self.state.xtables_nft))

    def _drop_chains_the_target_lacks(self, tables: set) -> None:
        """iptables-nft-restore creates every built-in chain the save names, iptables-nft itself
        only those it needs; an extra base chain would add steps (its policy) to every path."""
        target_chains = parse_ruleset_listing(self.state.nft_listing)[1]

        def drop() -> None:
            nft = NftContext()
            sandbox_chains = parse_ruleset_listing(nft.list_ruleset())[1]
            for key, chain in sandbox_chains.items():
                if (key[0], key[1]) in tables and key not in target_chains and not chain.rules:
                    nft.run(f"delete chain {key[0]} {key[1]} {key[2]}")

        call_in_namespace(self.name, drop)

    def _open_listeners(self) -> None:
        listeners = list(self.state.listeners)
        v4 = {(l.proto, l.port) for l in listeners if l.family == 4}
        # A socket on [::] also takes IPv4 unless it is v6only, which /proc does not tell:
        # where no IPv4 socket has the port, assume the usual dual-stack socket.
        for listener in list(listeners):
            if listener.family == 6 and listener.address == "::" and (listener.proto, listener.port) not in v4:
                listeners.append(type(listener)(listener.proto, "0.0.0.0", listener.port))
        opened, failures = call_in_namespace(self.name, _open_sockets, listeners)
        self._listeners = opened
        for failure in failures:
            self.warnings.append(f"listener not copied: {failure}")

    # -- use ----------------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, input: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run a tool inside the sandbox."""
        return runner.run(runner.netns_exec_argv(self.name, argv), input=input, check=check, timeout=60,
                          what=f"{argv[0]} in the sandbox")

    # -- removal ------------------------------------------------------------------------------

    def close(self) -> None:
        with SignalsHeld():
            for sock in self._listeners:
                sock.close()
            self._listeners = []
            problems = []
            for name in reversed(self._namespaces):
                if netns_exists(name):
                    result = runner.run(["ip", "netns", "del", name], check=False)
                    if result.returncode != 0:
                        problems.append(f"{name}: {runner.first_line(result)}")
            self._namespaces = []
        if problems:
            raise EnvironmentProblem(f"could not remove the sandbox ({'; '.join(problems)}); "
                                     f"'nftrace cleanup' removes it")

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_sockets(listeners) -> tuple[list, list]:
    """Runs inside the sandbox: one socket per listening port of the target."""
    opened, failures = [], []
    for listener in listeners:
        family = socket.AF_INET6 if listener.family == 6 else socket.AF_INET
        kind = socket.SOCK_STREAM if listener.proto == "tcp" else socket.SOCK_DGRAM
        sock = socket.socket(family, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((listener.address, listener.port))
            if kind == socket.SOCK_STREAM:
                sock.listen(LISTEN_BACKLOG)
        except OSError as err:
            sock.close()
            failures.append(f"{listener.proto} {listener.address} port {listener.port} ({err.strerror})")
            continue
        opened.append(sock)
    return opened, failures


def leftover_sandboxes() -> list[str]:
    """Sandbox namespaces (and their helpers) whose nftrace run is gone."""
    try:
        names = sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []
    leftovers = []
    for name in names:
        match = _NAME_RE.match(name)
        if match and not pid_alive(int(match.group(1))):
            leftovers.append(name)
    return leftovers


def remove_leftover_sandboxes() -> list[str]:
    removed = []
    for name in leftover_sandboxes():
        result = runner.run(["ip", "netns", "del", name], check=False)
        if result.returncode != 0 and netns_exists(name):
            raise EnvironmentProblem(f"cannot remove leftover sandbox {name}: {runner.first_line(result)}")
        removed.append(name)
    return removed


