"""The lab: a client, a router and a server in network namespaces, a scenario's ruleset on the
router, listeners on the server; `nftrace lab up|down|status|load`, `nftrace demo` and the
scenario tests all stand on it.

A scenario is a pair of files in rules/ (shipped in the package, see `rules_dir`): its ruleset (NAME.nft, or iptables-save text) and its
expectations (NAME.expect.toml, format in expectations.py), which name the ruleset and its
kind. The router is where the ruleset lives and where nftrace traces:

    nftrace --netns nftlab-router why --from 10.77.1.2 --to 10.77.1.1 --proto tcp --dport 22 \\
        -- ip netns exec nftlab-client python3 -m nftrace.lab.traffic tcp 10.77.1.1 22

`up` is idempotent: what the lab is running (scenario, digest of its ruleset file) is kept in
/run/nftrace/lab-PREFIX.json, so the same scenario again changes nothing, and another one, or
an edited file, replaces the router's ruleset in place. `down` removes everything `up` made:
listeners first (a process would keep its namespace alive, unnamed), then the namespaces,
then the state file.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..errors import EnvironmentProblem, InputError
from ..kernel.runner import netns_exec_argv
from ..kernel.system import CAP_NET_ADMIN, CAP_SYS_ADMIN, STATE_DIR, has_capability
from ..protocols import iptables_command
from ..signals import SignalsHeld, undo_after
from .expectations import EXPECTATION_SUFFIX, ExpectationFile, FlowExpectation, load_expectations
from .topology import (CLIENT_V4, CLIENT_V6, ROUTER_CLIENT_V4, ROUTER_CLIENT_V6, ROUTER_SERVER_V4, ROUTER_SERVER_V6,
                     SERVER_V4, SERVER_V6, Topology, in_netns, netns_exists)

LAB_PREFIX = "nftlab"
DEFAULT_SCENARIO = "host-firewall"
# What the scenarios' flows reach on the server; the router's own ports need no listener
# (a connection refused there still went through the input hook).
LISTEN_TCP = (22, 25, 80, 443, 3306, 5432, 6379, 8080, 9090)
LISTEN_UDP = (53, 161, 5000)
LISTEN_SECONDS = 8 * 3600  # the lab's listeners end by themselves after this
_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")

# Built-in chains of each legacy iptables table: restoring a table with only these, policy
# ACCEPT, empties it (rules, user chains, policies) without touching the other tables.
LEGACY_BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
RULESET_LOADERS = {"nft": ("nft", "-f"), "iptables-nft": ("iptables-nft-restore",),
                   "iptables-legacy": ("iptables-legacy-restore",)}


def require_root(command: str = "nftrace lab") -> None:
    """Namespaces need CAP_SYS_ADMIN, rulesets CAP_NET_ADMIN: what root has, and root in a
    container or with capabilities dropped may not."""
    if not (has_capability(CAP_SYS_ADMIN) and has_capability(CAP_NET_ADMIN)):
        raise EnvironmentProblem(f"{command} needs root to create network namespaces and load rulesets; run it with sudo")


def command_name() -> str:
    """How the user ran nftrace (`.venv/bin/nftrace` after setup.sh), for commands we suggest."""
    invoked = sys.argv[0] if sys.argv else ""
    return invoked if os.path.basename(invoked) == "nftrace" else "nftrace"


def rules_dir() -> Path:
    """Where the scenarios are: NFTRACE_RULES when set, else the package's own `rules`, read
    through importlib.resources. In a checkout (an editable install, the Vagrant synced
    folder) that is the symlink nftrace/rules → ../rules, the source; a wheel, pipx or
    `pip install .` carries a copy of the files, so that the demo and the lab work from any
    directory."""
    override = os.environ.get("NFTRACE_RULES")
    if override:
        return Path(override)
    shipped = importlib.resources.files("nftrace") / "rules"
    if not isinstance(shipped, Path):
        # A zip import: nft and iptables-restore need files they can open.
        raise EnvironmentProblem(f"nftrace's scenarios are inside {shipped}, not in a directory: "
                                 "set NFTRACE_RULES to a copy of rules/")
    return shipped.resolve()


@dataclass(frozen=True)
class Scenario:
    """One rules/ scenario: its ruleset, of which kind, and the flows it must decide."""

    expectations: ExpectationFile

    @property
    def name(self) -> str:
        return self.expectations.name

    @property
    def ruleset(self) -> Path:
        return self.expectations.ruleset

    @property
    def kind(self) -> str:
        return self.expectations.ruleset_kind

    @property
    def flows(self) -> list:
        return self.expectations.flows

    def digest(self) -> str:
        """What `up` compares to tell an edited ruleset file from the one loaded."""
        try:
            return hashlib.sha256(self.ruleset.read_bytes()).hexdigest()
        except OSError as err:
            raise InputError(f"scenario {self.name}: cannot read {self.ruleset}: {err.strerror}") from None


def list_scenarios(directory: Optional[Path] = None) -> list[Scenario]:
    directory = Path(directory) if directory else rules_dir()
    return [Scenario(load_expectations(path)) for path in sorted(directory.glob(f"*{EXPECTATION_SUFFIX}"))]


def scenario_names(directory: Optional[Path] = None) -> list[str]:
    directory = Path(directory) if directory else rules_dir()
    return [path.name[: -len(EXPECTATION_SUFFIX)] for path in sorted(directory.glob(f"*{EXPECTATION_SUFFIX}"))]


def find_scenario(name: str, directory: Optional[Path] = None) -> Scenario:
    directory = Path(directory) if directory else rules_dir()
    if not _PREFIX_RE.match(name):
        raise InputError(f"--scenario: '{name}' is not a scenario name")
    path = directory / f"{name}{EXPECTATION_SUFFIX}"
    if not path.exists():
        known = ", ".join(scenario_names(directory)) or f"none: no *{EXPECTATION_SUFFIX} in {directory}"
        raise InputError(f"no scenario '{name}' (known: {known})")
    return Scenario(load_expectations(path))


def load_commands(scenario: Scenario) -> list[list[str]]:
    """The commands that load the scenario's ruleset into an emptied namespace."""
    return [[*RULESET_LOADERS[scenario.kind], str(scenario.ruleset)]]


def legacy_reset_text(table: str) -> str:
    """iptables-save text that empties one legacy table (`-restore` flushes what it names)."""
    chains = "".join(f":{chain} ACCEPT [0:0]\n" for chain in LEGACY_BUILTIN_CHAINS[table])
    return f"*{table}\n{chains}COMMIT\n"


def reset_ruleset(netns: str) -> None:
    """Empty the namespace's firewall: every nftables table, and legacy iptables tables in use."""
    in_netns(netns, ["nft", "flush", "ruleset"])
    for names_file, restore in (("ip_tables_names", f"{iptables_command(4)}-legacy-restore"),
                                ("ip6_tables_names", f"{iptables_command(6)}-legacy-restore")):
        listing = in_netns(netns, ["cat", f"/proc/net/{names_file}"], check=False).stdout
        for table in listing.split():
            if table in LEGACY_BUILTIN_CHAINS:
                in_netns(netns, [restore], input=legacy_reset_text(table))


def load_scenario(scenario: Scenario, netns: str) -> None:
    """Replace the namespace's ruleset with the scenario's (never the machine's own: netns is required)."""
    if not netns_exists(netns):
        raise InputError(f"--netns: network namespace '{netns}' does not exist (see 'ip netns list')")
    scenario.digest()  # a missing ruleset file is said before anything is emptied
    reset_ruleset(netns)
    for command in load_commands(scenario):
        in_netns(netns, command)


def traffic_command(topology: Topology, expectation: FlowExpectation) -> list[str]:
    """argv of one bounded packet of the flow, sent from its sender's namespace."""
    flow = expectation.flow
    if flow.dst.prefixlen != flow.dst.max_prefixlen:
        raise InputError(f"flow '{expectation.name}': traffic needs one destination address, not {flow.dst}")
    host = str(flow.dst.network_address)
    sport = ["--sport", str(flow.sport)] if flow.sport else []
    if flow.proto in ("tcp", "udp") and flow.dport is None:
        raise InputError(f"flow '{expectation.name}': traffic for {flow.proto} needs a dport")
    if flow.proto == "tcp":
        args = ["tcp", host, str(flow.dport), "--timeout", "1", *sport]
    elif flow.proto == "udp":
        args = ["udp", host, str(flow.dport), "--count", "1", *sport]
    elif flow.proto in ("icmp", "icmpv6"):
        args = ["icmp", host, "--count", "1", "--timeout", "1"]
    else:
        raise InputError(f"flow '{expectation.name}': no traffic generator for proto {flow.proto}")
    sender = getattr(topology, expectation.sender)
    return netns_exec_argv(sender, [sys.executable, "-m", "nftrace.lab.traffic", *args])


def why_arguments(topology: Topology, expectation: FlowExpectation, *, timeout: float = 10.0,
                  as_json: bool = False) -> list[str]:
    """`nftrace` arguments that trace one packet of the flow in the router while it is sent."""
    flow = expectation.flow.to_json()
    args = ["--netns", topology.router, "why", "--from", flow["src"], "--to", flow["dst"]]
    for option in ("proto", "sport", "dport", "iif", "oif"):
        if flow[option] is not None:
            args += [f"--{option}", str(flow[option])]
    args += ["--count", "1", "--timeout", f"{timeout:g}"]
    if as_json:
        args.append("--json")
    return args + ["--", *traffic_command(topology, expectation)]


@dataclass
class LabState:
    """What `up` loaded, kept between commands."""

    scenario: str
    digest: str
    ruleset: str
    kind: str

    def to_json(self) -> dict:
        return {"scenario": self.scenario, "digest": self.digest, "ruleset": self.ruleset, "kind": self.kind}


@dataclass
class LabStatus:
    prefix: str
    namespaces: dict  # name -> exists
    state: Optional[LabState]
    listeners: list
    tables: list = field(default_factory=list)
    example: Optional[str] = None  # a command to try: the scenario's first flow

    @property
    def up(self) -> bool:
        return all(self.namespaces.values())

    @property
    def partial(self) -> bool:
        return any(self.namespaces.values()) and not self.up


class Lab:
    """The lab named PREFIX: namespaces PREFIX-client, PREFIX-router, PREFIX-server."""

    def __init__(self, prefix: str = LAB_PREFIX, state_dir: Path = STATE_DIR):
        if not _PREFIX_RE.match(prefix):
            raise InputError(f"--prefix: '{prefix}' is not a usable name (letters, digits, . _ -; up to 31)")
        self.prefix = prefix
        self.topology = Topology(prefix)
        self.state_dir = Path(state_dir)

    @property
    def state_file(self) -> Path:
        return self.state_dir / f"lab-{self.prefix}.json"

    def read_state(self) -> Optional[LabState]:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise EnvironmentProblem(f"{self.state_file}: unreadable lab state ({err}); run 'nftrace lab down'") from None
        try:
            return LabState(data["scenario"], data["digest"], data["ruleset"], data["kind"])
        except (KeyError, TypeError):
            raise EnvironmentProblem(f"{self.state_file}: unreadable lab state; run 'nftrace lab down'") from None

    def _write_state(self, state: LabState) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(state.to_json(), indent=2) + "\n")
        temporary.replace(self.state_file)

    def up(self, scenario: Scenario, listen_seconds: float = LISTEN_SECONDS) -> list[str]:
        """Make the lab run `scenario`; return what was done (empty: it already did)."""
        require_root()
        digest = scenario.digest()
        topology = self.topology
        done = []
        created = not topology.exists()
        if created:
            if any(netns_exists(name) for name in topology.namespaces):
                self.down()  # a half-made lab is rebuilt, not patched
            self._remove_state()  # new namespaces have nothing loaded, whatever a stale file says
            topology.up()  # removes what it made if it fails
            done.append(f"created namespaces {', '.join(topology.namespaces)}")
        try:
            if not topology.listener_pids():
                topology.start_listeners(LISTEN_TCP, LISTEN_UDP, listen_seconds)
                done.append(f"started listeners on {topology.server} for {listen_seconds:g} s")
            state = self.read_state()
            if state is None or (state.scenario, state.digest) != (scenario.name, digest):
                self._remove_state()
                load_scenario(scenario, topology.router)
                self._write_state(LabState(scenario.name, digest, str(scenario.ruleset), scenario.kind))
                done.append(f"loaded scenario {scenario.name} ({scenario.ruleset.name}, {scenario.kind}) "
                            f"into {topology.router}")
        except BaseException as err:
            if created:
                undo_after(err, self.down)  # what this call made, it takes back
            raise
        return done

    def down(self) -> list[str]:
        """Remove everything the lab made; return what was removed (empty: nothing was there)."""
        require_root()
        removed = []
        with SignalsHeld():
            listeners = self.topology.listener_pids()
            present = [name for name in self.topology.namespaces if netns_exists(name)]
            self.topology.down()
            left = [name for name in present if netns_exists(name)]
            if left:
                raise EnvironmentProblem(f"could not remove namespaces {', '.join(left)}")
            state_removed = self._remove_state()
        if listeners:
            removed.append(f"listeners (pids {', '.join(map(str, listeners))})")
        if present:
            removed.append(f"namespaces {', '.join(present)}")
        if state_removed:
            removed.append(f"state {self.state_file}")
        return removed

    def _remove_state(self) -> bool:
        try:
            self.state_file.unlink()
        except FileNotFoundError:
            return False
        if self.state_dir.exists() and not any(self.state_dir.iterdir()):
            self.state_dir.rmdir()
        return True

    def status(self) -> LabStatus:
        namespaces = {name: netns_exists(name) for name in self.topology.namespaces}
        state = self.read_state()
        listeners, tables = [], []
        if os.geteuid() == 0 and namespaces[self.topology.router]:
            listeners = self.topology.listener_pids()
            listing = in_netns(self.topology.router, ["nft", "list", "tables"], check=False).stdout
            tables = [line[len("table "):] for line in listing.splitlines() if line.startswith("table ")]
            legacy = in_netns(self.topology.router, ["cat", "/proc/net/ip_tables_names"], check=False).stdout.split()
            tables += [f"iptables-legacy {name}" for name in legacy]
        return LabStatus(self.prefix, namespaces, state, listeners, tables, self._example(state))

    def _example(self, state: Optional[LabState]) -> Optional[str]:
        if state is None:
            return None
        try:
            flows = find_scenario(state.scenario).flows
        except InputError:
            return None  # the scenario's file went away since; the lab still says what it runs
        if not flows:
            return None
        return f"# {flows[0].name}\n  sudo " + shlex.join([command_name(), *why_arguments(self.topology, flows[0])])


def render_status(status: LabStatus, scenarios: Sequence[str] = ()) -> str:
    """`nftrace lab status` for people: what runs where, and the command to try next."""
    prefix = status.prefix
    if not any(status.namespaces.values()):
        lines = [f"lab {prefix}: down"]
    elif status.partial:
        present = [name for name, exists in status.namespaces.items() if exists]
        lines = [f"lab {prefix}: partly there ({', '.join(present)}); 'nftrace lab down' removes it"]
    else:
        scenario = (f"scenario {status.state.scenario} ({Path(status.state.ruleset).name}, {status.state.kind})"
                    if status.state else "no scenario loaded")
        lines = [
            f"lab {prefix}: up, {scenario}",
            f"  client  {prefix}-client  eth0 {CLIENT_V4} {CLIENT_V6}",
            f"  router  {prefix}-router  r-client {ROUTER_CLIENT_V4} {ROUTER_CLIENT_V6}, "
            f"r-server {ROUTER_SERVER_V4} {ROUTER_SERVER_V6}",
            f"  server  {prefix}-server  eth0 {SERVER_V4} {SERVER_V6}",
        ]
        if status.listeners:
            lines.append(f"  listening on the server: tcp {','.join(map(str, LISTEN_TCP))}; "
                         f"udp {','.join(map(str, LISTEN_UDP))} (pids {', '.join(map(str, status.listeners))})")
        elif os.geteuid() == 0:
            lines.append("  no listener on the server ('nftrace lab up' starts them again)")
        if status.tables:
            lines.append(f"  router ruleset: {', '.join(status.tables)}")
        if status.example:
            lines.append("try:")
            lines.append(f"  {status.example}")
    if scenarios:
        lines.append(f"scenarios: {', '.join(scenarios)}")
    return "\n".join(lines)
