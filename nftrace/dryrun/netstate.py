"""What decides a packet's fate in a network namespace, read without changing anything.

A dry run copies this into a sandbox: interfaces with their addresses, MTU and state,
bridges with their ports, VLANs and learnt addresses (FDB),
routes, nexthops and policy rules of both families, the sysctls that decide forwarding and
drops, the listening TCP/UDP ports, the nftables ruleset (set and map elements and stateful
objects as they are now), and legacy iptables tables.

Reading is strictly read-only: `ip ... show`, `nft list`, `*-save`, /proc files. Legacy
tables are saved only when the namespace already has them (saving a table that does not
exist would create it). Parsing of the tools' text is pure and tested on its own.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..kernel.anonchains import read_anonymous_chains
from ..kernel.nft import NftContext
from ..kernel.nsexec import call_in_namespace, thread_proc_net
from ..kernel.runner import bridge_argv, ip_argv, netns_exec_argv, run, run_all
from ..protocols import iptables_command

# -- the sysctls that decide forwarding and drops ---------------------------------------
# Paths under /proc/sys/net. Order matters when writing: a global switch first (writing
# ip_forward or conf/all/forwarding resets every interface), then `all`, `default`, and
# each interface last.
IPV4_GLOBAL = ("ip_forward", "ip_nonlocal_bind", "ip_early_demux", "tcp_syncookies", "icmp_echo_ignore_all",
               "icmp_echo_ignore_broadcasts", "fwmark_reflect", "tcp_fwmark_accept", "tcp_l3mdev_accept",
               "udp_l3mdev_accept", "raw_l3mdev_accept")
IPV4_CONF = ("forwarding", "rp_filter", "accept_local", "route_localnet", "src_valid_mark", "accept_source_route",
             "bc_forwarding", "proxy_arp", "arp_filter", "arp_ignore", "disable_policy", "disable_xfrm",
             "accept_redirects", "send_redirects", "secure_redirects", "shared_media",
             "drop_unicast_in_l2_multicast", "ignore_routes_with_linkdown", "log_martians")
IPV6_GLOBAL = ("ip_nonlocal_bind", "fwmark_reflect", "icmp/echo_ignore_all", "icmp/echo_ignore_anycast",
               "icmp/echo_ignore_multicast")
IPV6_CONF = ("forwarding", "disable_ipv6", "accept_source_route", "disable_policy", "seg6_enabled",
             "drop_unicast_in_l2_multicast", "ignore_routes_with_linkdown", "proxy_ndp", "accept_redirects",
             "mtu", "hop_limit")
# br_netfilter's switches (per namespace): whether bridged frames also pass the IP hooks.
BRIDGE = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables",
          "bridge-nf-filter-vlan-tagged", "bridge-nf-filter-pppoe-tagged", "bridge-nf-pass-vlan-input-dev")
# Bridge options that change which frames it forwards, as `ip link add ... type bridge` takes
# them, with the kernel's defaults (a default is not passed: a kernel without VLAN filtering
# refuses even `vlan_filtering 0`).
BRIDGE_OPTIONS = {"vlan_filtering": "0", "vlan_protocol": "802.1Q", "vlan_default_pvid": "1", "mcast_snooping": "1",
                  "group_fwd_mask": "0"}
NETFILTER = ("nf_conntrack_tcp_loose", "nf_conntrack_tcp_be_liberal", "nf_conntrack_tcp_ignore_invalid_rst",
             "nf_conntrack_checksum", "nf_hooks_lwtunnel")

# Words of `ip route` output that describe the route's state, not its configuration.
_ROUTE_STATUS_WORDS = {"linkdown", "dead", "offload", "trap", "offload_failed", "notify", "rt_offload", "rt_trap",
                       "rt_offload_failed", "pervasive"}
_TCP_LISTEN = "0A"
_UDP_UNCONNECTED = "07"


@dataclass(frozen=True)
class Address:
    """One address of an interface, as `ip address` shows it."""

    family: int  # 4 or 6
    local: str
    prefixlen: int
    peer: Optional[str] = None
    broadcast: Optional[str] = None
    scope: str = "global"
    label: Optional[str] = None
    noprefixroute: bool = False

    def replace_command(self, dev: str) -> str:
        """The `ip -batch` line that gives an interface this address."""
        if self.peer:
            words = [self.local, "peer", f"{self.peer}/{self.prefixlen}"]
        else:
            words = [f"{self.local}/{self.prefixlen}"]
        if self.broadcast and self.family == 4:
            words += ["broadcast", self.broadcast]
        if self.scope and self.scope != "global":
            words += ["scope", self.scope]
        if self.label and self.label != dev and self.family == 4:
            words += ["label", self.label]
        if self.noprefixroute:
            words.append("noprefixroute")
        if self.family == 6:
            words.append("nodad")
        return " ".join(["address", "replace", *words, "dev", dev])


@dataclass
class Interface:
    index: int
    name: str
    link_type: str  # ether, loopback, none, ...
    kind: Optional[str] = None  # veth, bridge, vlan, wireguard, ...; None for a physical device
    mac: Optional[str] = None
    mtu: int = 1500
    up: bool = False
    master: Optional[str] = None
    addresses: list = field(default_factory=list)
    bridge: dict = field(default_factory=dict)  # a bridge's options (BRIDGE_OPTIONS, stp_state)

    @property
    def is_loopback(self) -> bool:
        return self.link_type == "loopback"

    @property
    def ethernet_mac(self) -> Optional[str]:
        return self.mac if self.link_type == "ether" and self.mac else None


@dataclass(frozen=True)
class FdbEntry:
    """A MAC address a bridge knows to be behind one of its ports (learnt or static)."""

    mac: str
    port: str
    bridge: str
    vlan: Optional[int] = None


@dataclass(frozen=True)
class BridgeVlan:
    """`bridge vlan`: one VLAN (or range) of a bridge port, or of the bridge device itself."""

    dev: str
    vid: int
    vid_end: Optional[int] = None
    pvid: bool = False
    untagged: bool = False

    def add_command(self, bridge_device: bool) -> str:
        vids = f"{self.vid}-{self.vid_end}" if self.vid_end else str(self.vid)
        words = ["vlan", "add", "dev", self.dev, "vid", vids]
        words += ["pvid"] if self.pvid else []
        words += ["untagged"] if self.untagged else []
        words += ["self"] if bridge_device else []
        return " ".join(words)


@dataclass(frozen=True)
class Listener:
    proto: str  # tcp | udp
    address: str
    port: int

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4


@dataclass(frozen=True)
class TableBlock:
    """One `table FAMILY NAME { ... }` block of an nft listing."""

    family: str
    name: str
    text: str

    @property
    def uses_xtables(self) -> bool:
        """iptables-nft rules with matches/targets that nft cannot print as nft syntax."""
        return bool(re.search(r"^\t+.*\bxt (match|target) ", self.text, re.MULTILINE))


@dataclass(frozen=True)
class RouteLookup:
    """`ip route get ADDRESS`: how the namespace would reach an address."""

    dev: Optional[str]
    gateway: Optional[str]
    local: bool


@dataclass
class NetworkState:
    """Everything a dry run copies from one namespace (None: the machine's own)."""

    netns: Optional[str]
    interfaces: list = field(default_factory=list)
    routes: dict = field(default_factory=dict)  # 4|6 -> replayable `ip route` lines
    rules: dict = field(default_factory=dict)  # 4|6 -> replayable `ip rule` lines ("pref N ...")
    nexthops: list = field(default_factory=list)
    neighbours: dict = field(default_factory=dict)  # (dev, address) -> lladdr
    fdb: list = field(default_factory=list)  # FdbEntry of every bridge
    vlans: list = field(default_factory=list)  # BridgeVlan of bridges with VLAN filtering
    sysctls: dict = field(default_factory=dict)  # path under /proc/sys/net -> value
    listeners: list = field(default_factory=list)
    nft_listing: str = ""  # `nft -a list ruleset`: handles as comments, state and elements kept
    legacy: dict = field(default_factory=dict)  # iptables|ip6tables -> `*-legacy-save -c` text
    xtables_nft: dict = field(default_factory=dict)  # (family, table) -> `*-nft-save -c -t TABLE` text
    iptables_managed: set = field(default_factory=set)  # (family, table) that nft says iptables-nft manages
    anonymous_chains: list = field(default_factory=list)  # KernelChain: the kernel's names of `jump { }` chains

    def copied_with_xtables(self, block: TableBlock) -> bool:
        """Tables of iptables-nft are copied with its own save/restore: nft's text of them can
        lose what iptables put there (compat matches and targets, comments)."""
        return block.family in ("ip", "ip6") and (block.uses_xtables or (block.family, block.name) in self.iptables_managed)

    def interface(self, name: str) -> Optional[Interface]:
        return next((i for i in self.interfaces if i.name == name), None)

    def bridge_of(self, name: str) -> Optional[Interface]:
        """The bridge a device is, or is a port of (None: neither)."""
        interface = self.interface(name)
        if interface is not None and interface.kind == "bridge":
            return interface
        master = self.interface(interface.master) if interface is not None and interface.master else None
        return master if master is not None and master.kind == "bridge" else None

    def ports(self, bridge: str) -> list[Interface]:
        return [i for i in self.interfaces if i.master == bridge]

    def port_of(self, bridge: str, mac: Optional[str]) -> Optional[str]:
        """The port of `bridge` behind which `mac` was learnt."""
        if mac is None:
            return None
        return next((entry.port for entry in self.fdb if entry.bridge == bridge and entry.mac == mac.lower()), None)

    @property
    def where(self) -> str:
        return f"netns {self.netns}" if self.netns else "the machine's own network namespace"

    def local_addresses(self) -> set:
        return {ipaddress.ip_address(a.local) for i in self.interfaces for a in i.addresses}


# -- pure parsing of the tools' output ------------------------------------------------------


def parse_interfaces(ip_json: str) -> list[Interface]:
    """`ip -d -j address show` → interfaces with their addresses."""
    interfaces = []
    for entry in json.loads(ip_json or "[]"):
        linkinfo = entry.get("linkinfo") or {}
        addresses = []
        for info in entry.get("addr_info", []):
            family = 4 if info.get("family") == "inet" else 6 if info.get("family") == "inet6" else None
            if family is None or "local" not in info:
                continue
            addresses.append(Address(
                family=family,
                local=info["local"],
                prefixlen=int(info.get("prefixlen", 32 if family == 4 else 128)),
                peer=info.get("address") if info.get("address") not in (None, info["local"]) else None,
                broadcast=info.get("broadcast"),
                scope=info.get("scope", "global"),
                label=info.get("label"),
                noprefixroute=bool(info.get("noprefixroute")),
            ))
        interfaces.append(Interface(
            index=int(entry["ifindex"]),
            name=entry["ifname"],
            link_type=entry.get("link_type", "ether"),
            kind=linkinfo.get("info_kind"),
            mac=entry.get("address"),
            mtu=int(entry.get("mtu", 1500)),
            up="UP" in entry.get("flags", []),
            master=entry.get("master"),
            addresses=addresses,
            bridge=_bridge_options(linkinfo) if linkinfo.get("info_kind") == "bridge" else {},
        ))
    return interfaces


def _bridge_options(linkinfo: dict) -> dict:
    """A bridge's options that differ from the kernel's defaults, and its spanning tree state."""
    data = linkinfo.get("info_data") or {}
    options = {key: str(data[key]) for key, default in BRIDGE_OPTIONS.items()
               if key in data and str(data[key]) not in (default, "0x0" if default == "0" else default)}
    options["stp_state"] = str(data.get("stp_state", 0))
    return options


def parse_fdb(bridge_json: str) -> list[FdbEntry]:
    """`bridge -j fdb show` → the addresses bridges forward to one port. Entries of a device's
    own (`self`) and a port's own MAC (`permanent`, which the kernel makes with the port) are
    left out."""
    entries = []
    for entry in json.loads(bridge_json or "[]"):
        if not entry.get("master") or "self" in entry.get("flags", []) or entry.get("state") == "permanent":
            continue
        entries.append(FdbEntry(entry["mac"].lower(), entry["ifname"], entry["master"], entry.get("vlan")))
    return entries


def parse_vlans(bridge_json: str) -> list[BridgeVlan]:
    """`bridge -j vlan show` → the VLANs of each port (and bridge device)."""
    vlans = []
    for device in json.loads(bridge_json or "[]"):
        for vlan in device.get("vlans", []):
            flags = vlan.get("flags", [])
            vlans.append(BridgeVlan(device["ifname"], int(vlan["vlan"]), vlan.get("vlanEnd"), "PVID" in flags,
                                    "Egress Untagged" in flags))
    return vlans


def parse_route_lines(text: str, family: int) -> list[str]:
    """`ip route show table all` → one replayable line per route.

    Multipath nexthops (indented lines) join their route; state words (linkdown, offload, ...)
    and the remaining lifetime of learnt IPv6 routes are dropped; `default` becomes the
    family's zero prefix, so that a line says its family by itself.
    """
    routes: list[str] = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        if raw[0].isspace() and routes:
            routes[-1] = f"{routes[-1]} {raw.strip()}"
        else:
            routes.append(raw.strip())
    return [normalise_route(line, family) for line in routes]


def normalise_route(line: str, family: int) -> str:
    words = line.split()
    kept = []
    skip = 0
    for index, word in enumerate(words):
        if skip:
            skip -= 1
            continue
        if word in _ROUTE_STATUS_WORDS:
            continue
        if word == "expires":
            skip = 1
            continue
        kept.append(word)
    zero = "0.0.0.0/0" if family == 4 else "::/0"
    for index, word in enumerate(kept[:2]):
        if word == "default":
            kept[index] = zero
            break
    if "nhid" in kept:
        # A route through a nexthop object shows the object's gateway and device too; they
        # belong to the object, which is copied on its own.
        kept = _drop_options(kept, ("via", "dev"))
    return " ".join(kept)


def _drop_options(words: list[str], names: Sequence[str]) -> list[str]:
    kept: list[str] = []
    skip = 0
    for word in words:
        if skip:
            skip -= 1
        elif word in names:
            skip = 1
        else:
            kept.append(word)
    return kept


def parse_rule_lines(text: str) -> list[str]:
    """`ip rule show` (`32765:\\tfrom all fwmark 0x1 lookup 100`) → `pref 32765 from all fwmark 0x1 lookup 100`."""
    rules = []
    for line in text.splitlines():
        match = re.match(r"^(\d+):\s+(.*)$", line.strip())
        if not match:
            continue
        rest = " ".join(w for w in match.group(2).split() if w not in ("[detached]", "unresolved"))
        rules.append(f"pref {match.group(1)} {rest}")
    return rules


def parse_nexthop_lines(text: str) -> list[str]:
    """`ip nexthop show` → replayable lines, single nexthops before groups that use them."""
    singles, groups = [], []
    for line in text.splitlines():
        words = [w for w in line.split() if w not in _ROUTE_STATUS_WORDS]
        if not words or words[0] != "id":
            continue
        words = _drop_options(words, ("scope",))
        (groups if "group" in words else singles).append(" ".join(words))
    return singles + groups


def parse_neighbours(ip_json: str) -> dict:
    neighbours = {}
    for entry in json.loads(ip_json or "[]"):
        if entry.get("lladdr") and entry.get("dev") and entry.get("dst"):
            neighbours[(entry["dev"], str(ipaddress.ip_address(entry["dst"])))] = entry["lladdr"]
    return neighbours


def parse_socket_table(text: str, proto: str, family: int) -> list[Listener]:
    """/proc/net/{tcp,tcp6,udp,udp6} → the listening (TCP) or bound, unconnected (UDP) sockets."""
    wanted = _TCP_LISTEN if proto == "tcp" else _UDP_UNCONNECTED
    listeners = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != wanted:
            continue
        local, remote = fields[1], fields[2]
        if proto == "udp" and not remote.endswith(":0000"):
            continue
        address_hex, port_hex = local.split(":")
        listeners.append(Listener(proto, _proc_net_address(address_hex, family), int(port_hex, 16)))
    return listeners


def _proc_net_address(text: str, family: int) -> str:
    # The kernel prints each 32-bit word of the address as a number in host byte order.
    raw = b"".join(struct.pack("=I", int(text[i:i + 8], 16)) for i in range(0, len(text), 8))
    return socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, raw)


def iptables_managed_tables(messages: str) -> set:
    """Tables that nft, listing them, says iptables-nft manages: (family, name)."""
    return set(re.findall(r"table (\S+) (\S+) is managed by iptables-nft", messages))


def split_tables(listing: str) -> list[TableBlock]:
    """An nft listing → its table blocks (nft prints `table ...{` and `}` at column 0)."""
    blocks = []
    current: Optional[list[str]] = None
    header = None
    for line in listing.splitlines():
        if current is None:
            match = re.match(r"^table (\S+) (\S+) \{", line)
            if match:
                header = (match.group(1), match.group(2).strip('"'))
                current = [line]
            continue
        current.append(line)
        if line == "}":
            blocks.append(TableBlock(header[0], header[1], "\n".join(current) + "\n"))
            current = None
    return blocks


def sandbox_table_text(block: TableBlock) -> tuple[str, list[str]]:
    """A table's text as it can be loaded into the sandbox, and what had to change.

    `flags owner` would tie the copy to the short-lived loader and delete it when that exits,
    and `persist` only makes sense with owner; a flowtable's `offload` flag asks for hardware
    the sandbox does not have.
    """
    changes = []
    lines = []
    in_flowtable = False
    for line in block.text.splitlines():
        depth = len(line) - len(line.lstrip("\t"))
        body = line.strip()
        if depth == 1:
            in_flowtable = body.startswith("flowtable ")
        if body.startswith("flags ") and (depth == 1 or (depth == 2 and in_flowtable)):
            flags = [f.strip() for f in body[len("flags "):].rstrip(";").split(",")]
            dropped = {"owner", "persist"} if depth == 1 else {"offload"}
            kept = [f for f in flags if f not in dropped]
            if len(kept) != len(flags):
                if depth == 2:
                    changes.append(f"flowtable offload of table {block.family} {block.name} (hardware offload)")
                if not kept:
                    continue
                line = "\t" * depth + "flags " + ",".join(kept) + (";" if body.endswith(";") else "")
        lines.append(line)
    return "\n".join(lines) + "\n", changes


# -- reading a namespace --------------------------------------------------------------------


def sysctl_paths(interface_names: Sequence[str]) -> list[str]:
    """The sysctls to copy, in the order they must be written."""
    paths = [f"ipv4/{key}" for key in IPV4_GLOBAL] + [f"ipv6/{key}" for key in IPV6_GLOBAL]
    paths += [f"netfilter/{key}" for key in NETFILTER]
    paths += [f"bridge/{key}" for key in BRIDGE]
    for device in ("all", "default", *interface_names):
        paths += [f"ipv4/conf/{device}/{key}" for key in IPV4_CONF]
        paths += [f"ipv6/conf/{device}/{key}" for key in IPV6_CONF]
    return paths


def _read_inside(paths: Sequence[str]) -> dict:
    """Runs in a thread inside the namespace: sysctls, sockets, legacy tables, the ruleset."""
    sysctls = {}
    for path in paths:
        try:
            with open(f"/proc/sys/net/{path}") as handle:
                sysctls[path] = handle.read().strip()
        except OSError:
            continue  # not in this kernel or not in this namespace: nothing to copy
    listeners = []
    for proto in ("tcp", "udp"):
        for family, suffix in ((4, ""), (6, "6")):
            try:
                with open(thread_proc_net(f"{proto}{suffix}")) as handle:
                    listeners += parse_socket_table(handle.read(), proto, family)
            except FileNotFoundError:
                continue  # IPv6 disabled
    legacy = {}
    for tool, names in ((iptables_command(4), "ip_tables_names"), (iptables_command(6), "ip6_tables_names")):
        try:
            with open(thread_proc_net(names)) as handle:
                legacy[tool] = handle.read().split()
        except FileNotFoundError:
            legacy[tool] = []  # module not loaded: no legacy table anywhere
    nft = NftContext()
    listing = nft.list_ruleset(state=True)
    return {"sysctls": sysctls, "listeners": sorted(set(listeners), key=lambda l: (l.proto, l.address, l.port)),
            "legacy_tables": legacy, "listing": listing, "managed": iptables_managed_tables(nft.messages),
            "anonymous": read_anonymous_chains(listing)}


def read_network_state(netns: Optional[str]) -> NetworkState:
    """Read the namespace's state; nothing in it changes."""
    outputs = run_all({
        "interfaces": ip_argv(netns, "-d", "-j", "address", "show"),
        "routes4": ip_argv(netns, "-4", "route", "show", "table", "all"),
        "routes6": ip_argv(netns, "-6", "route", "show", "table", "all"),
        "rules4": ip_argv(netns, "-4", "rule", "show"),
        "rules6": ip_argv(netns, "-6", "rule", "show"),
        "nexthops": ip_argv(netns, "nexthop", "show"),
        "neighbours": ip_argv(netns, "-j", "neighbour", "show"),
        "fdb": bridge_argv(netns, "-j", "fdb", "show"),
        "vlans": bridge_argv(netns, "-j", "vlan", "show"),
    }, allowed_to_fail=("nexthops", "rules6", "routes6", "fdb", "vlans"))
    state = NetworkState(netns)
    state.interfaces = parse_interfaces(outputs["interfaces"])
    state.routes = {4: parse_route_lines(outputs["routes4"], 4), 6: parse_route_lines(outputs["routes6"], 6)}
    state.rules = {4: parse_rule_lines(outputs["rules4"]), 6: parse_rule_lines(outputs["rules6"])}
    state.nexthops = parse_nexthop_lines(outputs["nexthops"])
    state.neighbours = parse_neighbours(outputs["neighbours"])
    bridges = {i.name for i in state.interfaces if i.kind == "bridge"}
    state.fdb = [entry for entry in parse_fdb(outputs["fdb"]) if entry.bridge in bridges]
    filtering = {i.name for i in state.interfaces if i.bridge.get("vlan_filtering")}
    state.vlans = [vlan for vlan in parse_vlans(outputs["vlans"])
                   if vlan.dev in filtering or state.interface(vlan.dev) is not None
                   and state.interface(vlan.dev).master in filtering]
    inside = call_in_namespace(netns, _read_inside, sysctl_paths([i.name for i in state.interfaces]))
    state.sysctls = inside["sysctls"]
    state.listeners = inside["listeners"]
    state.nft_listing = inside["listing"]
    state.iptables_managed = inside["managed"]
    state.anonymous_chains = inside["anonymous"]
    saves = {}
    for tool, tables in inside["legacy_tables"].items():
        if tables:
            saves[("legacy", tool)] = netns_exec_argv(netns, [f"{tool}-legacy-save", "-c"])
    for block in split_tables(state.nft_listing):
        if state.copied_with_xtables(block):
            tool = iptables_command(block.family)
            saves[("nft", block.family, block.name)] = netns_exec_argv(netns, [f"{tool}-nft-save", "-c", "-t", block.name])
    if saves:
        saved = run_all(saves)
        for key, text in saved.items():
            if key[0] == "legacy":
                state.legacy[key[1]] = text
            elif re.search(rf"^\*{re.escape(key[2])}$", text, re.MULTILINE):
                state.xtables_nft[(key[1], key[2])] = text
            # else: iptables-nft cannot save this table ("incompatible"): nft's text is the copy
    return state


def route_towards(netns: Optional[str], address: str) -> Optional[RouteLookup]:
    """How the namespace reaches ADDRESS (`ip route get`, which reads and changes nothing)."""
    family = "-6" if ":" in address else "-4"
    result = run(ip_argv(netns, family, "-j", "route", "get", address), check=False)
    if result.returncode != 0:
        return None
    entries = json.loads(result.stdout or "[]")
    if not entries:
        return None
    entry = entries[0]
    return RouteLookup(dev=entry.get("dev"), gateway=entry.get("gateway"),
                       local=entry.get("type") == "local" or entry.get("dev") == "lo")
