"""Fixtures that build real things: network namespaces with real rulesets, and nftrace runs.

Kernel-backed tests carry the `kernel` marker. Where the machine cannot run them (not root,
no nf_tables, no `ip`), they skip, except when CI or NFTRACE_REQUIRE_KERNEL is set: then
a skip would hide that the product was not tested, so they fail instead.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nftrace.lab.topology import Topology, in_netns, netns_exists, run  # noqa: E402

_counter = itertools.count()

# A suite started as a background job of a script (`./scripts/test.sh &`, as CI's parallel
# parts are) inherits SIGINT ignored, and so would every nftrace it runs: the tests of Ctrl-C
# would then wait for a signal that never arrives. A Python handler here becomes the default
# disposition in every child, as it is for a user at a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _stop_like_ctrl_c(_signum, _frame) -> NoReturn:
    raise KeyboardInterrupt


# SIGTERM (CI stopping its parts, a timeout's kill) ends the suite as Ctrl-C does: pytest then
# runs the fixtures' teardown, and the namespaces of the test under way are deleted.
signal.signal(signal.SIGTERM, _stop_like_ctrl_c)


def kernel_required() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("NFTRACE_REQUIRE_KERNEL"))


def unavailable(reason: str, *, optional: bool = False) -> NoReturn:
    """This machine cannot run the test: the one way a test says so.

    Where CI or NFTRACE_REQUIRE_KERNEL is set, that is a failure, not a skip: a run that could
    not test nftrace must not pass. `optional`: what scripts/setup.sh does not install
    (vagrant), which only some machines have; it skips everywhere.
    """
    if kernel_required() and not optional:
        pytest.fail(f"{reason} (CI/NFTRACE_REQUIRE_KERNEL is set: a skip here is a failure)", pytrace=False)
    pytest.skip(reason)


def _kernel_problem() -> Optional[str]:
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        import nftables  # noqa: F401
    except ImportError:
        return "python3-nftables is not visible to this Python"
    probe = f"nftprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if made.returncode != 0:
        return "cannot create network namespaces"
    try:
        nft = subprocess.run(["ip", "netns", "exec", probe, "nft", "list", "tables"], capture_output=True)
        if nft.returncode != 0:
            return "nf_tables does not work in a namespace"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_KERNEL_PROBLEM: Optional[str] = None
_KERNEL_PROBED = False


def pytest_runtest_setup(item):
    global _KERNEL_PROBLEM, _KERNEL_PROBED
    if item.get_closest_marker("kernel") is None:
        return
    if not _KERNEL_PROBED:
        _KERNEL_PROBLEM, _KERNEL_PROBED = _kernel_problem(), True
    if _KERNEL_PROBLEM:
        unavailable(f"kernel-backed test cannot run: {_KERNEL_PROBLEM}")


def unique_name(kind: str) -> str:
    return f"nt{os.getpid() % 100000}{kind}{next(_counter)}"


@contextlib.contextmanager
def lab_topology(kind: str, setup: Optional[Callable[[Topology], None]] = None, topology_class=Topology,
                 **fields) -> Iterator[Topology]:
    """client — router — server namespaces (nftrace.lab.topology), with what `setup(topology)`
    loads into them; removed afterwards whatever happens. The one way tests build a lab: as
    the `topology` fixture for one test, in a module-scoped fixture for many."""
    topo = topology_class(unique_name(kind), **fields)
    try:
        topo.up()
        if setup is not None:
            setup(topo)
        yield topo
    finally:
        topo.down()


@pytest.fixture
def topology():
    """client — router — server namespaces, removed after the test whatever happens."""
    with lab_topology("t") as topo:
        yield topo


@pytest.fixture
def netns():
    """A factory of empty namespaces (lo up), all removed after the test."""
    made = []

    def make(kind: str = "n") -> str:
        name = unique_name(kind)
        run(["ip", "netns", "add", name])
        made.append(name)
        in_netns(name, ["ip", "link", "set", "lo", "up"])
        return name

    try:
        yield make
    finally:
        for name in made:
            if netns_exists(name):
                run(["ip", "netns", "del", name], check=False)


def load_ruleset(ns: str, text: str) -> None:
    in_netns(ns, ["nft", "-f", "-"], input=text)


def closed_to_neighbour_discovery(table: str) -> str:
    """A ruleset whose input chain lets in only what conntrack knows, so no neighbour discovery
    (which conntrack does not track), and whose forward chain lets everything through."""
    return f"""table inet {table} {{
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state established,related accept
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
    }}
}}
"""


def ruleset_state(ns: str) -> str:
    """The ruleset as `nft -s list ruleset` prints it: what must be identical before and after."""
    return in_netns(ns, ["nft", "-s", "list", "ruleset"]).stdout


def firewall_state(ns: str) -> dict:
    """Everything a run could change: the nftables ruleset, legacy rules (counters aside) and
    legacy tables, and the nf_log bindings."""
    def save(command):
        text = in_netns(ns, [command], check=False).stdout
        return "\n".join(re.sub(r"\[\d+:\d+\]", "", line) for line in text.splitlines() if not line.startswith("#"))

    def read(path):
        return in_netns(ns, ["cat", path], check=False).stdout

    return {
        "iptables-legacy": save("iptables-legacy-save"),
        "ip6tables-legacy": save("ip6tables-legacy-save"),
        "ip_tables": sorted(read("/proc/net/ip_tables_names").split()),
        "ip6_tables": sorted(read("/proc/net/ip6_tables_names").split()),
        "nft": ruleset_state(ns),
        "nf_log": read("/proc/sys/net/netfilter/nf_log/2") + read("/proc/sys/net/netfilter/nf_log/10"),
    }


def traffic(ns: str, *args: str, timeout: float = 30) -> list[str]:
    """argv of a bounded traffic command inside `ns` (for `nftrace why ... -- COMMAND`)."""
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "nftrace.lab.traffic", *args]


def without_admin_rights() -> list[str]:
    """A command prefix that runs the command without CAP_NET_ADMIN and CAP_SYS_ADMIN (what
    nftrace and its lab need), as the same user: the checkout stays readable wherever it is
    (under /root, say), and only the rights under test are gone."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        unavailable("setpriv (util-linux) is not installed")
    dropped = "-net_admin,-sys_admin"
    return [setpriv, f"--inh-caps={dropped}", f"--bounding-set={dropped}", f"--ambient-caps={dropped}"]


@dataclass
class NftraceResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)

    @property
    def packets(self) -> list:
        return self.json["packets"]

    @property
    def packet(self) -> dict:
        """The one packet of a --count 1 run, with the document's `backend`."""
        assert len(self.packets) == 1, self.stdout
        return dict(self.packets[0], backend=self.json["backend"])


def nftrace(*args: str, timeout: float = 60, env: Optional[dict] = None, wrapper: Sequence[str] = ()) -> NftraceResult:
    """Run the real command line in a process of its own, as a user would."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO))
    full_env.update(env or {})
    result = subprocess.run([*wrapper, sys.executable, "-m", "nftrace", *args], capture_output=True, text=True,
                            timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)
    return NftraceResult(result.returncode, result.stdout, result.stderr)


def why(lab: Topology, *flow: str, command: Sequence[str], count: int = 1, extra: Sequence[str] = (),
        backend: Optional[str] = None, env: Optional[dict] = None) -> NftraceResult:
    """`nftrace why` in the lab's router while `command` sends the flow's packets: it must
    answer `count` packets and leave the router's firewall exactly as it was."""
    before = firewall_state(lab.router)
    extra = [*extra, *(["--backend", backend] if backend else [])]
    result = nftrace("--netns", lab.router, "why", *flow, "--count", str(count), "--timeout", "15", "--json", *extra,
                     "--", *command, env=env)
    assert firewall_state(lab.router) == before, "the router's firewall changed"
    assert result.returncode == 0, result.stderr
    assert len(result.packets) == count, result.stdout
    return result


@pytest.fixture
def nftrace_cli():
    return nftrace
