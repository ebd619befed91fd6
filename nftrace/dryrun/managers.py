"""Firewall managers that own chains: a direct edit there is undone on their next reload.

firewalld, ufw, Docker, libvirt, kube-proxy, OpenWrt's fw4 and NixOS write their rulesets
themselves and write them again whenever they reload (a restart, a config change, a new
container or VM, a resync every few seconds for kube-proxy). A fix made with `nft` or
`iptables` in their chains works until then. Where the manager's own words for the change are
clear, they are given as a hint; a hint is not proven (the sandbox cannot run the manager).

Pure: the deciding chain's names in, a note and maybe a command out.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Iterable, Optional

from .fixplan import FlowMatch, Placement, kube_proxy_owns

_FIREWALLD_ZONE_RE = re.compile(r"^filter_IN_(?!policy_)(.+?)(?:_(?:pre|log|deny|allow|post))?$")
_FW4_ZONE_RE = re.compile(r"^(input|forward|output)_(.+)$")
_UFW_CHAIN_RE = re.compile(r"^ufw6?-")
_DOCKER_CHAIN_RE = re.compile(r"^DOCKER(?!-USER$)(-|$)")
_LIBVIRT_CHAIN_RE = re.compile(r"^LIBVIRT_")


@dataclass(frozen=True)
class ManagerNote:
    """Who owns the chain a fix goes into, and what to do instead."""

    manager: str
    note: str
    hint: Optional[str] = None  # the manager's own command (or setting) for the change; not proven

    def to_json(self) -> dict:
        return {"manager": self.manager, "note": self.note, "hint": self.hint, "proven": False}


def manager_of(placement: Placement, match: FlowMatch, verdict: str,
               path_chains: Iterable[str] = ()) -> Optional[ManagerNote]:
    """The manager that owns the chain a fix goes into, or the chains the packet ran through
    under it (`path_chains`: the chains of the same table on the packet's path), with its hint."""
    table, chain = placement.table, placement.chain
    chains = {chain, placement.base_chain or chain, *path_chains}
    if table == "firewalld":
        return _firewalld(placement, chains, match, verdict)
    if any(_UFW_CHAIN_RE.match(name) for name in chains):
        return _ufw(placement, match, verdict)
    if table == "docker-bridges" or any(_DOCKER_CHAIN_RE.match(name) for name in chains):
        return _docker(placement, match, verdict)
    if table == "libvirt_network" or any(_LIBVIRT_CHAIN_RE.match(name) for name in chains):
        return ManagerNote("libvirt", f"libvirt writes table {placement.family} {table} again when a virtual "
                                      f"network starts (virsh net-start, libvirtd restart): a direct edit is lost "
                                      f"then; put the rule in a table of your own, or in the network's definition")
    if any(kube_proxy_owns(table, name) for name in chains):
        return ManagerNote("kube-proxy", f"kube-proxy resynchronises table {placement.family} {table} within "
                                         f"seconds: a direct edit does not last; change the Service or a "
                                         f"NetworkPolicy instead")
    if table == "fw4":
        return _fw4(placement, chains, match, verdict)
    if table == "nixos-fw":
        return _nixos(placement, match, verdict)
    return None


def _rich_rule(match: FlowMatch, verdict: str) -> str:
    family = "ipv6" if match.version == 6 else "ipv4"
    parts = [f'rule family="{family}"', f'source address="{match.src}"', f'destination address="{match.dst}"']
    if match.dport and match.proto:
        parts.append(f'port port="{match.dport}" protocol="{match.proto}"')
    elif match.proto:
        parts.append(f'protocol value="{match.proto}"')
    parts.append("accept" if verdict == "accept" else "drop")
    return " ".join(parts)


def _under(placement: Placement, chain: str) -> bool:
    """Whether the change goes into `chain` or under it (the base chain the packet ran under
    there). Not whether the packet met it: every packet that arrives runs the managers'
    reverse-path filters, and passes them unless they dropped it."""
    return chain in (placement.chain, placement.base_chain)


def _firewalld(placement: Placement, chains: set, match: FlowMatch, verdict: str) -> ManagerNote:
    note = ("firewalld owns table inet firewalld and writes it again on every reload (firewall-cmd --reload, "
            "a restart): a direct edit is lost then")
    if _under(placement, "filter_PREROUTING") and verdict == "accept":  # what drops there: its IPv6 reverse-path filter
        return ManagerNote("firewalld", note, "IPv6_rpfilter=no in /etc/firewalld/firewalld.conf (firewalld 2.x also "
                                              "takes loose: a route back through any interface), then "
                                              "firewall-cmd --reload; no zone or rich rule comes before it")
    zone = next((m.group(1) for name in sorted(chains) if (m := _FIREWALLD_ZONE_RE.match(name))), None)
    if zone is None:
        return ManagerNote("firewalld", note + "; make the change in a firewalld zone or policy")
    rich = _rich_rule(match, verdict)
    hint = (f"firewall-cmd --zone={shlex.quote(zone)} --add-rich-rule={shlex.quote(rich)} && "
            f"firewall-cmd --permanent --zone={shlex.quote(zone)} --add-rich-rule={shlex.quote(rich)}")
    return ManagerNote("firewalld", note, hint)


def _ufw(placement: Placement, match: FlowMatch, verdict: str) -> ManagerNote:
    if _UFW_CHAIN_RE.match(placement.chain):
        note = "ufw owns its ufw-* chains and writes them again on `ufw reload` and at boot: a direct edit is lost then"
    else:
        note = ("ufw manages this firewall: a rule added outside it is not in its configuration and is gone after "
                "a reboot")
    words = ["ufw"]
    routed = placement.hook == "forward"
    if routed:
        words.append("route")
    words.append("allow" if verdict == "accept" else "deny")
    if match.iif:
        words += ["in", "on", match.iif]
    if match.oif and routed:
        words += ["out", "on", match.oif]
    words += ["from", match.src, "to", match.dst]
    if match.dport:
        words += ["port", str(match.dport)]
    if match.proto in ("tcp", "udp"):
        words += ["proto", match.proto]
    return ManagerNote("ufw", note, shlex.join(words))


def _docker(placement: Placement, match: FlowMatch, verdict: str) -> ManagerNote:
    if placement.table == "docker-bridges" or _DOCKER_CHAIN_RE.match(placement.chain):
        note = ("Docker owns its DOCKER* chains and writes them again when it restarts or a container starts: a "
                "direct edit is lost then; rules in DOCKER-USER are the admin's and stay")
    else:
        note = ("the packet ran through Docker's chains: Docker's place for the admin's own rules is DOCKER-USER, "
                "which it never rewrites")
    if placement.hook != "forward":
        return ManagerNote("docker", note)
    tool = "ip6tables" if match.version == 6 else "iptables"
    target = "ACCEPT" if verdict == "accept" else "DROP"
    return ManagerNote("docker", note, shlex.join([tool, "-I", "DOCKER-USER", *match.iptables(), "-j", target]))


def _fw4(placement: Placement, chains: set, match: FlowMatch, verdict: str) -> ManagerNote:
    note = ("OpenWrt's fw4 writes table inet fw4 again from /etc/config/firewall on every `fw4 reload` or "
            "`service firewall restart`: a direct edit is lost then")
    # The zone's own chain (input_wan, forward_lan) names the zone the packet came from.
    zone = next((m.group(2) for name in sorted(chains) if (m := _FW4_ZONE_RE.match(name))), None)
    if zone is None:
        return ManagerNote("fw4", note + "; add a rule section to /etc/config/firewall")
    options = [("name", "nftrace fix"), ("src", zone)]
    if placement.hook == "forward":
        options.append(("dest", "*"))
    options += [("src_ip", match.src), ("dest_ip", match.dst)]
    if match.proto:
        options.append(("proto", match.proto))
    if match.dport:
        options.append(("dest_port", str(match.dport)))
    options.append(("target", "ACCEPT" if verdict == "accept" else "DROP"))
    sets = " && ".join(f"uci set firewall.@rule[-1].{key}={shlex.quote(value)}" for key, value in options)
    return ManagerNote("fw4", note, f"uci add firewall rule && {sets} && uci commit firewall && fw4 reload")


def _nixos(placement: Placement, match: FlowMatch, verdict: str) -> ManagerNote:
    """NixOS's options by the chain the change goes under: the reverse-path filter (chain
    rpfilter, at prerouting), input or forward; each takes rules in nft's words, but for open
    ports."""
    note = ("NixOS generates table inet nixos-fw from configuration.nix (networking.firewall): nixos-rebuild "
            "replaces a direct edit")
    rule = f"{match.nft(placement.family)} {verdict}"
    rebuild = "(configuration.nix, then nixos-rebuild switch)"
    if (_under(placement, "rpfilter") or _under(placement, "rpfilter-allow")) and verdict == "accept":
        return ManagerNote("nixos", note, f"networking.firewall.extraReversePathFilterRules = ''{rule}''; {rebuild}; "
                                          f"or checkReversePath = \"loose\" for every source with any route back")
    if placement.hook == "forward":
        return ManagerNote("nixos", note, f"networking.firewall.extraForwardRules = ''{rule}''; {rebuild}")
    if placement.hook == "input" and verdict == "accept" and match.dport and match.proto in ("tcp", "udp"):
        option = "allowedTCPPorts" if match.proto == "tcp" else "allowedUDPPorts"
        return ManagerNote("nixos", note, f"networking.firewall.{option} = [ {match.dport} ]; {rebuild}")
    if placement.hook == "input":
        return ManagerNote("nixos", note, f"networking.firewall.extraInputRules = ''{rule}''; {rebuild}")
    return ManagerNote("nixos", note + "; use networking.firewall.extraInputRules or extraForwardRules")
