"""`nftrace why --dry-run`: the answer for a flow that nobody sends, from the kernel itself.

The target namespace's network state is copied into a sandbox (nftrace.dryrun.sandbox), one packet
of the flow is crafted and sent into it (nftrace.dryrun.inject), and the ordinary trace machinery
(TraceSession) traces it there. The answer has the kernel's exact semantics, and the target
is never touched: not its ruleset, counters, conntrack table or sockets.

What the copy cannot carry is said plainly: always in the JSON's `dry_run.not_copied`, and as
a warning when a rule on the packet's path depends on it (socket owners, conntrack, ...).
Rule handles and chain names in the answer are the target's own (the copy keeps every chain's
rule order; nftrace.dryrun.names translates), so that `nft -a list ruleset` in the target
shows the rule named, and an anonymous chain has the name the target's kernel gave it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from ..drops.bpftrace import DropReasonsUnavailable, KernelDropWatcher
from ..drops.dropwatch import start_watcher
from ..errors import EnvironmentProblem, InputError
from ..flow import PORT_PROTOCOLS, Flow
from .inject import Injection, multicast_mac, random_mac, solicited_node
from .names import TargetNames
from .netstate import NetworkState, RouteLookup, read_network_state, route_towards
from ..kernel.anonchains import read_anonymous_chains
from ..kernel.nft import NftContext
from ..kernel.nsexec import NamespaceBookmark, call_in_namespace
from ..trace.crossing import assign_namespace
from ..trace.paths import PacketPath
from ..trace.report import TraceReport, summary
from ..trace.ruleset import RulesetSnapshot
from .sandbox import CandidateRuleset, Sandbox, read_candidate
from ..trace.session import TraceOptions, TraceSession
from ..signals import SignalsAsExceptions, UndoStack, undo_after
from ..kernel.netlink import require_pyroute2
from ..kernel.system import namespace_path, require_net_admin

STATES = ("new", "established")
REPLY_PROTOCOLS = ("tcp", "udp", "icmp", "icmpv6")
EPHEMERAL_PORTS = (32768, 60999)
# A crafted packet's events all arrive within microseconds: a short idle time ends a packet
# that the kernel dropped outside netfilter without making the user wait.
DRY_RUN_IDLE_SECONDS = 0.5
ND_ADVICE = "let icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } in"
CONNTRACK_TIMEOUT = 120

NOT_COPIED = (
    "sockets of other processes: only the listening TCP/UDP ports are copied, as listeners of nftrace's own",
    "the live conntrack table: the sandbox's starts empty (--state established makes the flow's connection)",
    "socket owners and cgroups (meta skuid/skgid/cgroup, socket expressions): the sandbox's sockets are nftrace's",
    "bond ports, VLAN and tunnel devices: each is a plain veth of the same name (bridges are copied as "
    "bridges, with their ports, VLANs and learnt addresses)",
    "hardware offload (offloaded flowtables, NIC offload)",
)

# Rule text on the packet's path → why the sandbox's answer may differ from the live one.
PATH_CAVEATS = (
    (re.compile(r"\b(skuid|skgid|cgroup|cgroupv2)\b"),
     "a rule on the packet's path matches socket owners or cgroups: in the sandbox the only sockets are "
     "nftrace's own, so the live answer may differ"),
    (re.compile(r"\bsocket (transparent|mark|wildcard|cgroupv2)\b"),
     "a rule on the packet's path matches sockets: the sandbox has only copies of the listening ports, so "
     "the live answer may differ"),
    (re.compile(r"\bflow (add|offload) @"),
     "a rule on the packet's path offloads flows to a flowtable: packets of an offloaded connection skip "
     "the ruleset live, and the sandbox has no offloaded flow"),
    (re.compile(r"\blimit rate\b"),
     "a rule on the packet's path has a rate limit: the sandbox's starts with a full token bucket, a busy "
     "live one may not"),
    (re.compile(r"\bnumgen random\b"),
     "a rule on the packet's path decides at random (numgen random): another run may differ"),
)
CONNTRACK_CAVEAT_RE = re.compile(r"\bct (state|status)\b")
CONNTRACK_CAVEAT = ("a rule on the packet's path matches conntrack state: the sandbox's conntrack table starts "
                    "empty, so this packet opens a new connection; a connection already open live would be "
                    "established (--state established)")
NAT_CAVEAT = ("--state established: the connection was made directly in the sandbox's conntrack table, "
              "without NAT: an address rewrite that NAT would apply to it is not shown")


def check_dry_run_flow(flow: Flow, state: str) -> None:
    """A dry run crafts one concrete packet: everything it needs must be given."""
    if state not in STATES:
        raise InputError(f"--state: '{state}' is not one of {', '.join(STATES)}")
    for network, option in ((flow.src, "--from"), (flow.dst, "--to")):
        if network.prefixlen != network.max_prefixlen:
            raise InputError(f"--dry-run sends one packet: {option} must be one address, not the prefix {network}")
    if flow.proto is None:
        raise InputError("--dry-run crafts one packet: give --proto (tcp, udp, icmp, icmpv6 or sctp)")
    if flow.proto in PORT_PROTOCOLS and flow.dport is None:
        raise InputError(f"--dry-run crafts one {flow.proto} packet: give --dport")
    if state == "established" and flow.proto == "sctp":
        raise InputError("--state established: sctp is not supported; use tcp, udp, icmp or icmpv6")


def plan_injection(flow: Flow, netstate: NetworkState, peers: dict, helper: str, state: str,
                   route_back: Optional[RouteLookup], token: Callable[[int], int] = secrets.randbelow,
                   route_to: Optional[RouteLookup] = None, notes: Optional[list] = None) -> Injection:
    """Where the flow's packet enters the sandbox, and with which addresses, ports and MACs.

    The packet arrives on --iif, or else on the interface that the route back to the source
    says; a source that is one of the namespace's own addresses is a flow that starts on the
    box, sent from a local socket. On a bridge, it arrives through the port behind which the
    bridge learnt its source (see bridge_entry); `route_to` (the route to the destination)
    says whether the bridge forwards it to another port or takes it in.
    """
    src, dst = str(flow.src.network_address), str(flow.dst.network_address)
    iif = flow.iif
    if iif is None and ipaddress.ip_address(src) not in netstate.local_addresses():
        if route_back is None:
            raise InputError(f"--dry-run: {netstate.where} has no route back to {src}: say where the packet "
                             f"arrives with --iif")
        iif = None if route_back.local else route_back.dev
    if iif == "lo":
        iif = None
    low, high = EPHEMERAL_PORTS
    sport = flow.sport or (low + token(high - low + 1) if flow.proto in PORT_PROTOCOLS else None)
    common = dict(src=src, dst=dst, proto=flow.proto, sport=sport, dport=flow.dport, state=state,
                  icmp_id=1 + token(0xFFFE), seq=1 + token(0xFFFFFFFE), ack=1 + token(0xFFFFFFFE))
    if iif is None:
        return Injection(**common)
    interface = netstate.interface(iif)
    bridge = netstate.bridge_of(iif)
    if interface is None or (iif not in peers and bridge is None):
        raise InputError(f"--iif: no interface '{iif}' in {netstate.where}")
    gateway = route_back.gateway if route_back and route_back.dev in (iif, bridge.name if bridge else None) else None
    neighbour = netstate.neighbours.get((bridge.name if bridge else iif, str(ipaddress.ip_address(gateway or src))))
    dst_mac = peers[iif].mac if iif in peers else None
    if bridge is not None:
        iif, dst_mac = bridge_entry(netstate, bridge, iif, neighbour, dst, route_to, notes if notes is not None else [])
        dst_mac = dst_mac or random_mac(token)
        interface = netstate.interface(iif)
        if iif not in peers:
            raise InputError(f"--dry-run: bridge {bridge.name} of {netstate.where} has no port to send the packet "
                             f"through; say where it arrives with --iif")
    return Injection(**common, iif=iif, netns=helper, peer=peers[iif].peer, src_mac=neighbour or random_mac(token),
                     dst_mac=dst_mac, mtu=interface.mtu)


def neighbour_target(interface, asker: str) -> Optional[str]:
    """The address of `interface` that a neighbour at `asker` resolves: a global one on its
    prefix, else the link-local one (what routers announce as the gateway)."""
    if interface is None:
        return None
    addresses = [a for a in interface.addresses if a.family == 6]
    neighbour = ipaddress.ip_address(asker)
    for address in addresses:
        if neighbour in ipaddress.ip_network(f"{address.local}/{address.prefixlen}", strict=False):
            return address.local
    return next((a.local for a in addresses if a.scope == "link"), None)


def bridge_entry(netstate: NetworkState, bridge, iif: str, src_mac: Optional[str], dst: str,
                 route_to: Optional[RouteLookup], notes: list) -> tuple[str, Optional[str]]:
    """The port a frame of the flow enters `bridge` through, and its destination MAC.

    The port: --iif when it names one, else the one behind which the bridge learnt the
    source's MAC (or its gateway's), else the first port that is up. The destination: the
    bridge's own MAC when the packet is for the box or routed by it, else (a frame bridged
    between two hosts) the destination's MAC as the namespace knows it; unknown, the frame
    is flooded to every port, as live."""
    port = iif if iif != bridge.name else netstate.port_of(bridge.name, src_mac)
    if port is None:
        ports = [p.name for p in netstate.ports(bridge.name) if p.up] or [p.name for p in netstate.ports(bridge.name)]
        port = ports[0] if ports else bridge.name
        notes.append(f"the bridge {bridge.name} has not learnt where {src_mac or 'the source'} is: the packet enters "
                     f"it through port {port} (--iif PORT chooses another)")
    local = ipaddress.ip_address(dst) in netstate.local_addresses()
    bridged = not local and route_to is not None and route_to.dev == bridge.name and route_to.gateway is None
    if not bridged:
        return port, bridge.mac
    dst_mac = netstate.neighbours.get((bridge.name, str(ipaddress.ip_address(dst))))
    if dst_mac is None:
        notes.append(f"{netstate.where} does not know the MAC address of {dst}: the frame is flooded to every port "
                     f"of {bridge.name}")
    return port, dst_mac


def reply_injection(sent: Optional[Injection], path: PacketPath, interfaces: dict, netstate: NetworkState,
                    peers: dict, helper: str, token: Callable[[int], int] = secrets.randbelow) -> Optional[Injection]:
    """The answer of the other side to a packet sent before (`path` is its trace): from the
    address and port it went to, as the last hook left it (after NAT), back to where it came
    from, on the interface it left by (or from a local socket, when it was delivered to the
    box itself). TCP answers a SYN with a SYN-ACK; UDP with a datagram; ping with a pong."""
    if sent is None or sent.proto not in REPLY_PROTOCOLS or sent.state != "new" or not path.complete:
        return None
    last = next((o.packet for o in reversed(path.observations) if o.packet is not None), None)
    if last is None or last.src is None or last.dst is None:
        return None
    common = dict(src=str(last.dst), dst=str(last.src), proto=sent.proto, state="reply", icmp_id=sent.icmp_id,
                  sport=last.dport if sent.proto in PORT_PROTOCOLS else None,
                  dport=last.sport if sent.proto in PORT_PROTOCOLS else None,
                  seq=1 + token(0xFFFFFFFE), ack=(sent.seq + 1) & 0xFFFFFFFF)
    if "input" in path.hooks:
        return Injection(**common)  # the box answers itself
    oif = interfaces.get(path.interface_index("oif") or -1)
    interface = netstate.interface(oif) if oif else None
    if interface is None or oif not in peers:
        return None
    neighbour = netstate.neighbours.get((oif, common["src"]))
    return Injection(**common, iif=oif, netns=helper, peer=peers[oif].peer, src_mac=neighbour or random_mac(token),
                     dst_mac=peers[oif].mac, mtu=interface.mtu)


def conntrack_entry_argv(injection: Injection) -> list[str]:
    """`conntrack -I`: the flow's connection, established, as if both sides had talked."""
    i = injection
    argv = ["conntrack", "-I", "-s", i.src, "-d", i.dst, "-p", i.proto]
    if i.proto == "tcp":
        argv += ["--sport", str(i.sport), "--dport", str(i.dport), "--state", "ESTABLISHED"]
    elif i.proto == "udp":
        argv += ["--sport", str(i.sport), "--dport", str(i.dport)]
    elif i.proto == "icmp":
        argv += ["--icmp-type", "8", "--icmp-code", "0", "--icmp-id", str(i.icmp_id)]
    elif i.proto == "icmpv6":
        argv += ["--icmpv6-type", "128", "--icmpv6-code", "0", "--icmpv6-id", str(i.icmp_id)]
    return argv + ["-u", "SEEN_REPLY,ASSURED", "-t", str(CONNTRACK_TIMEOUT)]


def chains_on_path(path: PacketPath) -> set:
    chains = {(s.family, s.table, s.chain) for s in path.steps}
    chains |= {(s.family, s.table, s.target) for s in path.steps if s.target}
    return chains


def path_caveats(path: PacketPath, snapshot: RulesetSnapshot, state: str) -> list[str]:
    """Warnings for what the sandbox could not copy, where a rule the packet met depends on it.

    The packet met every rule of every chain it ran through (a rule that did not match sends
    no trace event, but was evaluated), so all their rules count.
    """
    texts = []
    for key in sorted(chains_on_path(path)):
        chain = snapshot.chain(*key)
        if chain is None:
            continue
        texts += [rule.text for handle in chain.rules if (rule := snapshot.rule(*key, handle)) is not None]
    caveats = [message for pattern, message in PATH_CAVEATS if any(pattern.search(text) for text in texts)]
    if state == "new" and any(CONNTRACK_CAVEAT_RE.search(text) for text in texts):
        caveats.insert(0, CONNTRACK_CAVEAT)
    return caveats


def _read_sandbox_ruleset() -> tuple[str, list]:
    """Runs in the sandbox: its ruleset, and the names the kernel gave its anonymous chains."""
    listing = NftContext().run("list ruleset", handles=True, stateless=True, terse=True)
    return listing, read_anonymous_chains(listing)


@dataclass
class DryRunRequest:
    netns: Optional[str]
    ruleset: Optional[Path] = None
    ruleset_kind: Optional[str] = None
    state: str = "new"


@dataclass
class NeighbourTrace:
    """A neighbour discovery message that the flow waits for, traced in the sandbox (`kind`: see
    NEIGHBOUR_FIELDS): from `src`, about `target` (the address a solicitation asks for, or to
    which an advertisement answers), through `interface` (in, or out for what this namespace
    sends). `asked` is it as a flow; `path` None if it was not seen."""

    kind: str
    asked: Flow
    src: str
    target: str
    interface: str
    path: Optional[PacketPath]

    @property
    def verdict(self) -> Optional[str]:
        return self.path.verdict if self.path is not None and self.path.complete else None

    @property
    def answer(self) -> Optional[str]:
        return summary(self.path) if self.path is not None else None

    @property
    def name(self) -> str:
        return {"solicitation": "the sender's neighbour solicitation",
                "answer": "the neighbour advertisement that answers it",
                "next hop solicitation": "the solicitation for the next hop",
                "next hop advertisement": "the next hop's neighbour advertisement"}[self.kind]

    @property
    def what(self) -> str:
        """`the sender's neighbour solicitation comes in`: what it is, and which way it goes."""
        return f"{self.name} {'comes in' if self.asked.iif else 'goes out'}"

    def to_json(self) -> dict:
        return {"src": self.src, "target": self.target, "iif" if self.asked.iif else "oif": self.interface,
                "verdict": self.verdict, "answer": self.answer}

    def dropped_words(self, where: str) -> str:
        """What a drop of it does to the flow, in a warning's words."""
        answer, dev = self.answer, self.interface
        if self.kind == "solicitation":
            return (f"{self.src} must first find {self.target}'s link-layer address, and the ruleset drops its "
                    f"neighbour solicitation on {dev} ({answer}): in real traffic no packet of the flow comes at all")
        if self.kind == "answer":
            return (f"{self.target} must first find {self.src}'s link-layer address, and the ruleset drops the "
                    f"neighbour advertisement {where} answers with, out through {dev} ({answer}): in real traffic no "
                    f"packet of the flow comes at all")
        if self.kind == "next hop solicitation":
            return (f"to send the flow on through {dev}, {where} must first find {self.target}'s link-layer "
                    f"address, and the ruleset drops its neighbour solicitation out through {dev} ({answer}): in "
                    f"real traffic the flow's packets go no further")
        return (f"to send the flow on through {dev}, {where} must first find {self.src}'s link-layer address, and "
                f"the ruleset drops the neighbour advertisement that answers ({answer}): in real traffic the flow's "
                f"packets go no further")


class DryRun:
    """One sandbox copy of the target; `trace()` answers for one flow at a time in it."""

    def __init__(self, request: DryRunRequest):
        self.request = request
        if request.state not in STATES:
            raise InputError(f"--state: '{request.state}' is not one of {', '.join(STATES)}")
        self.candidate: Optional[CandidateRuleset] = (
            read_candidate(request.ruleset, request.ruleset_kind) if request.ruleset is not None else None)
        self.netstate: Optional[NetworkState] = None
        self.sandbox: Optional[Sandbox] = None
        self.snapshot: Optional[RulesetSnapshot] = None
        self.names = TargetNames()
        self._bookmark: Optional[NamespaceBookmark] = None
        self._traced = 0
        self._drops: Optional[KernelDropWatcher] = None
        self._drops_problem: Optional[str] = None
        self.last_injection: Optional[Injection] = None
        # check_neighbour_discovery's findings, for describe(): NEIGHBOUR_FIELDS -> JSON or None
        self.neighbours: dict = dict.fromkeys(NEIGHBOUR_FIELDS)

    # -- the sandbox ------------------------------------------------------------------------

    def open(self) -> None:
        require_net_admin()
        require_pyroute2()
        if self.request.netns:
            namespace_path(self.request.netns)
        if self.request.state == "established" and shutil.which("conntrack") is None:
            raise EnvironmentProblem("--state established needs the conntrack tool (apt-get install conntrack)")
        self._bookmark = NamespaceBookmark()
        self.netstate = read_network_state(self.request.netns)
        self.sandbox = Sandbox(self.netstate)
        self.sandbox.build(self.candidate)
        listing, anonymous = call_in_namespace(self.sandbox.name, _read_sandbox_ruleset)
        self.snapshot = RulesetSnapshot(listing)
        self.snapshot.add_anonymous_chains(anonymous)
        if self.candidate is None:
            self.names = TargetNames(self.netstate.nft_listing, self.netstate.anonymous_chains, listing, anonymous)
        else:
            self.names = TargetNames(listing, anonymous)  # the candidate's own names

    def close(self) -> None:
        """Back to nftrace's own namespace, then the sandbox removed (signals held, see signals.py)."""
        with UndoStack() as undo:
            if self.sandbox is not None:
                undo.callback(self._remove_sandbox)
            if self._drops is not None:
                undo.callback(self._drops.close)
            if self._bookmark is not None:
                undo.callback(self._return_home)

    def _return_home(self) -> None:
        bookmark, self._bookmark = self._bookmark, None
        try:
            bookmark.restore()
        finally:
            bookmark.close()

    def _remove_sandbox(self) -> None:
        sandbox, self.sandbox = self.sandbox, None
        sandbox.close()

    def __enter__(self) -> "DryRun":
        try:
            self.open()
        except BaseException as err:
            undo_after(err, self.close)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _drop_watcher(self, report: TraceReport) -> Optional[KernelDropWatcher]:
        """One drop watcher watches the sandbox for every flow traced in it: bpftrace, where it is
        the watcher, takes seconds to start, which `nftrace test` would otherwise pay per flow.
        One that died after it was ready is started again; one that never got ready is not."""
        watcher = self._drops
        if watcher is not None and watcher.ended:
            self._drops = None
            watcher.close()
            if not watcher.ready:
                self._drops_problem = watcher.failure()
        if self._drops is None and self._drops_problem is None:
            try:
                inode = os.stat(namespace_path(self.sandbox.name)).st_ino
                self._drops = start_watcher(inode)
            except DropReasonsUnavailable as err:
                self._drops_problem = str(err)
        if self._drops_problem is not None:
            report.warnings.append(f"kernel drop reasons unavailable: {self._drops_problem}")
        return self._drops

    # -- one flow ---------------------------------------------------------------------------

    def plan(self, flow: Flow, notes: Optional[list] = None) -> Injection:
        check_dry_run_flow(flow, self.request.state)
        src, dst = str(flow.src.network_address), str(flow.dst.network_address)
        route_back = route_towards(self.request.netns, src) if flow.iif is None else None
        bridged = any(i.kind == "bridge" for i in self.netstate.interfaces)
        route_to = route_towards(self.request.netns, dst) if bridged else None
        return plan_injection(flow, self.netstate, self.sandbox.peers, self.sandbox.helper, self.request.state,
                              route_back, route_to=route_to, notes=notes)

    def describe(self, injection: Injection) -> dict:
        """The `dry_run` section of the JSON document."""
        sandbox = self.sandbox
        return {
            "sandbox": sandbox.name,
            "ruleset": "copy" if self.candidate is None else str(self.candidate.path),
            "ruleset_kind": None if self.candidate is None else self.candidate.kind,
            "state": self.request.state,
            "injected": {"src": injection.src, "dst": injection.dst, "proto": injection.proto,
                         "sport": injection.sport, "dport": injection.dport, "iif": injection.iif,
                         "local": injection.local},
            "not_copied": list(NOT_COPIED) + list(sandbox.not_copied),
            **self.neighbours,
        }

    def trace(self, flow: Flow, report: TraceReport, on_packet: Callable[[PacketPath], None], *,
              timeout: float = 10.0, max_rate: int = 100, drop_reasons: bool = True, near_misses: bool = True) -> int:
        """Send the flow's packet into the sandbox and trace it; return how many packets were seen (0 or 1)."""
        notes: list = []
        injection = self.plan(flow, notes)
        if self._traced:
            self._forget_connections()
        return self._trace_injection(flow, injection, report, on_packet, timeout=timeout, max_rate=max_rate,
                                     drop_reasons=drop_reasons, near_misses=near_misses, notes=notes)

    def trace_reply(self, path: PacketPath, interfaces: dict, report: TraceReport,
                    on_packet: Callable[[PacketPath], None], *, timeout: float = 10.0,
                    drop_reasons: bool = False) -> Optional[int]:
        """Send the other side's answer to the packet traced last (`path`), while its connection
        is in the sandbox's conntrack table, and trace it; None when there is no answer to send."""
        injection = reply_injection(self.last_injection, path, interfaces, self.netstate, self.sandbox.peers,
                                    self.sandbox.helper)
        if injection is None:
            return None
        flow = Flow(ipaddress.ip_network(injection.src), ipaddress.ip_network(injection.dst), injection.proto,
                    injection.sport, injection.dport)
        return self._trace_injection(flow, injection, report, on_packet, timeout=timeout, drop_reasons=drop_reasons,
                                     near_misses=False)

    def _trace_injection(self, flow: Flow, injection: Injection, report: TraceReport,
                         on_packet: Callable[[PacketPath], None], *, timeout: float = 10.0, max_rate: int = 100,
                         drop_reasons: bool = True, near_misses: bool = True, notes: tuple = ()) -> int:
        self._traced += 1
        self.last_injection = injection
        report.mode = "dry-run"
        report.dry_run = self.describe(injection)
        report.warnings.extend(w for w in [*self.sandbox.warnings, *notes] if w not in report.warnings)
        if self.request.state == "established":
            self.sandbox.run(conntrack_entry_argv(injection))
            if any(chain.type == "nat" for chain in self.snapshot.chains.values()):
                report.warnings.append(NAT_CAVEAT)
        drops = self._drop_watcher(report) if drop_reasons else None
        options = TraceOptions(flow=flow, netns=self.sandbox.name, count=1, timeout=timeout, max_rate=max_rate,
                               command=injection.command(), idle_seconds=DRY_RUN_IDLE_SECONDS,
                               drop_reasons=drops is not None, near_misses=near_misses)
        session = TraceSession(options, report, drop_watcher=drops)

        def deliver(path: PacketPath) -> None:
            assign_namespace(path, self.request.netns)  # the target's, not the sandbox's
            caveats = path_caveats(path, self.snapshot, self.request.state)
            self.names.translate(path, self.snapshot)
            for which in ("iif", "oif"):
                name = report.interfaces.get(path.interface_index(which) or -1)
                if name in self.sandbox.approximated:
                    caveats.append(f"the packet passed {self.sandbox.approximated[name]} in {self.netstate.where}; "
                                   f"the sandbox has a plain veth of that name, so the live path may differ")
            for caveat in caveats:
                if caveat not in report.warnings:
                    report.warnings.append(caveat)
            on_packet(path)

        try:
            session.run(deliver)
        finally:
            self._bookmark.restore()
        if not session.packets_seen and injection.iif and not self.netstate.interface(injection.iif).up:
            report.warnings.append(f"interface {injection.iif} is down in {self.netstate.where}: the packet cannot "
                                   f"arrive on it")
        return session.packets_seen

    def check_neighbour_discovery(self, flow: Flow, report: TraceReport) -> None:
        """IPv6 packets go only between neighbours that have found each other's link-layer
        address, and the messages that find it pass the chains like any packet:
        - a packet from the wire comes only after its sender (the source, or the gateway the route
          back names) has sent a neighbour solicitation for this namespace's address (input
          chains), and this namespace has answered it with an advertisement (output chains);
        - a packet forwarded or sent on leaves only after this namespace has sent a solicitation
          for its next hop (output chains) and the next hop has answered (input chains).
        A ruleset that drops any of them makes the flow vanish, whatever its own answer says.
        They are traced before the flow's packet; what became of them goes in `dry_run`
        (NEIGHBOUR_FIELDS), and a drop is a warning."""
        dropped = []
        for field, trace in NEIGHBOUR_FIELDS.items():
            traced = trace(self, flow)
            self.neighbours[field] = traced.to_json() if traced is not None else None
            if traced is not None and traced.verdict == "drop":
                dropped.append(traced.dropped_words(self.netstate.where))
        report.warnings += [f"{words}, whatever the answer says; {ND_ADVICE}" for words in dropped]

    def _solicitation(self, flow: Flow) -> Optional[tuple]:
        """(the sender's solicitation as an Injection, the asker, the address it asks for), or
        None where none is asked: IPv4 (ARP is not inet's), a local sender, an established
        connection (its neighbour is known)."""
        injection = self.plan(flow)
        if injection.family != 6 or injection.local or self.request.state != "new":
            return None
        route_back = route_towards(self.request.netns, injection.src) if flow.iif is None else None
        on_link = route_back is None or not route_back.gateway or route_back.dev != injection.iif
        asker = injection.src if on_link else route_back.gateway
        target = neighbour_target(self.netstate.interface(injection.iif), asker)
        if target is None:
            return None
        group = solicited_node(target)
        solicitation = replace(injection, src=asker, dst=group, proto="icmpv6", sport=None, dport=None,
                               nd_target=target, dst_mac=multicast_mac(group))
        return solicitation, asker, target

    def trace_solicitation(self, flow: Flow) -> Optional[NeighbourTrace]:
        """The sender's solicitation that the flow's first packet waits for, sent into the
        sandbox and traced (see check_neighbour_discovery)."""
        found = self._solicitation(flow)
        if found is None:
            return None
        solicitation, asker, target = found
        asked = Flow(ipaddress.ip_network(asker), ipaddress.ip_network(solicitation.dst), "icmpv6",
                     iif=solicitation.iif)
        return NeighbourTrace("solicitation", asked, asker, target, solicitation.iif,
                              self._trace_neighbour(asked, solicitation))

    def trace_answer(self, flow: Flow) -> Optional[NeighbourTrace]:
        """The advertisement this namespace answers the sender's solicitation with: the
        solicitation is sent again, and the kernel's own answer traced on its way out."""
        found = self._solicitation(flow)
        if found is None:
            return None
        solicitation, asker, target = found
        asked = Flow(ipaddress.ip_network(target), ipaddress.ip_network(asker), "icmpv6", oif=solicitation.iif)
        return NeighbourTrace("answer", asked, target, asker, solicitation.iif,
                              self._trace_neighbour(asked, solicitation))

    def _next_hop(self, flow: Flow) -> Optional[tuple]:
        """(output interface, next hop, this namespace's address there) of a flow forwarded or
        sent on, by the route of its destination as given (not after a DNAT); None for IPv4, a
        packet delivered here, an established connection, an interface without neighbours."""
        if flow.ip_version != 6 or self.request.state != "new":
            return None
        route = route_towards(self.request.netns, str(flow.dst.network_address))
        if route is None or route.local or route.dev not in self.sandbox.peers:
            return None
        next_hop = route.gateway or str(flow.dst.network_address)
        own = neighbour_target(self.netstate.interface(route.dev), next_hop)
        return (route.dev, next_hop, own) if own is not None else None

    def trace_next_hop_solicitation(self, flow: Flow) -> Optional[NeighbourTrace]:
        """This namespace's solicitation for the flow's next hop: the flow's packet is sent (the
        sandbox has no neighbours, so forwarding it makes the kernel ask) and the kernel's
        solicitation traced on its way out. Not seen where the flow's packet is dropped."""
        found = self._next_hop(flow)
        if found is None:
            return None
        dev, next_hop, own = found
        self.sandbox.run(["ip", "neigh", "flush", "dev", dev], check=False)  # asked again, at once
        group = solicited_node(next_hop)
        # From whichever address the kernel picks (the link-local one, for a forwarded packet).
        asked = Flow(ipaddress.ip_network("::/0"), ipaddress.ip_network(group), "icmpv6", oif=dev)
        return NeighbourTrace("next hop solicitation", asked, own, next_hop, dev,
                              self._trace_neighbour(asked, self.plan(flow)))

    def trace_advertisement(self, flow: Flow) -> Optional[NeighbourTrace]:
        """The next hop's advertisement that the flow's packets wait for on their way out, sent
        into the sandbox from the next hop (the route's gateway, or the destination on its link)
        to this namespace's address there, and traced (see check_neighbour_discovery)."""
        found = self._next_hop(flow)
        if found is None:
            return None
        dev, next_hop, own = found
        peer, interface = self.sandbox.peers[dev], self.netstate.interface(dev)
        advertisement = Injection(next_hop, own, "icmpv6", iif=dev, netns=self.sandbox.helper, peer=peer.peer,
                                  src_mac=self.netstate.neighbours.get((dev, next_hop)) or random_mac(),
                                  dst_mac=peer.mac, mtu=interface.mtu, nd_target=next_hop, nd_advert=True)
        asked = Flow(ipaddress.ip_network(next_hop), ipaddress.ip_network(own), "icmpv6", iif=dev)
        return NeighbourTrace("next hop advertisement", asked, next_hop, own, dev,
                              self._trace_neighbour(asked, advertisement))

    def _trace_neighbour(self, asked: Flow, injection: Injection) -> Optional[PacketPath]:
        """Trace a neighbour discovery message; the flow's packet stays the one traced last
        (trace_reply answers it)."""
        paths: list = []
        flow_packet = self.last_injection
        try:
            self._trace_injection(asked, injection, TraceReport(flow=asked, netns=self.request.netns), paths.append,
                                  drop_reasons=False, near_misses=False)
        finally:
            self.last_injection = flow_packet
        return paths[0] if paths else None

    def _forget_connections(self) -> None:
        """Each flow of `nftrace test` starts with an empty conntrack table, as a single dry run does."""
        if shutil.which("conntrack") is None:
            return
        for family in ("ipv4", "ipv6"):
            self.sandbox.run(["conntrack", "-F", "-f", family], check=False)


# The neighbour discovery a dry run checks, in the order it happens: the `dry_run` field of
# each, and what traces it.
NEIGHBOUR_FIELDS = {"neighbour_solicitation": DryRun.trace_solicitation, "neighbour_answer": DryRun.trace_answer,
                    "next_hop_solicitation": DryRun.trace_next_hop_solicitation,
                    "next_hop_advertisement": DryRun.trace_advertisement}


class DryRunSession:
    """What `nftrace why --dry-run` runs in place of a live TraceSession: the same interface."""

    def __init__(self, options: TraceOptions, report: TraceReport, request: DryRunRequest,
                 with_sandbox: Optional[Callable[[DryRun], None]] = None):
        self.options = options
        self.report = report
        self.request = request
        self.packets_seen = 0
        # Called after the trace while the sandbox is still there (--fix proves its change in it).
        self.with_sandbox = with_sandbox

    def run(self, on_packet: Callable[[PacketPath], None], on_ready: Callable[[], None] = lambda: None) -> None:
        if self.options.command:
            raise InputError("--dry-run sends its own packet: no COMMAND after --")
        check_dry_run_flow(self.options.flow, self.request.state)
        with SignalsAsExceptions(), UndoStack() as undo:
            dry = DryRun(self.request)
            self.report.mode = "dry-run"
            undo.callback(dry.close)
            dry.open()
            dry.check_neighbour_discovery(self.options.flow, self.report)
            self.packets_seen = dry.trace(self.options.flow, self.report, on_packet, timeout=self.options.timeout,
                                          max_rate=self.options.max_rate, drop_reasons=self.options.drop_reasons)
            if self.with_sandbox is not None:
                self.with_sandbox(dry)
