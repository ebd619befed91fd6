"""Fixtures that build real things: network namespaces with real rulesets, and nftrace runs.

Kernel-backed tests carry the `kernel` marker. Where the machine cannot run them (not root,
no nf_tables, no `ip`), they skip, except when CI or NFTRACE_REQUIRE_KERNEL is set: then
a skip would hide that the product was not tested, so they fail instead.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nftrace.lab.topology import Topology, in_netns, netns_exists, run  # noqa: E402

_counter = itertools.count()


def kernel_required() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("NFTRACE_REQUIRE_KERNEL"))


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
        message = f"kernel-backed test cannot run: {_KERNEL_PROBLEM}"
        if kernel_required():
            pytest.fail(message + " (CI/NFTRACE_REQUIRE_KERNEL is set: a skip here is a failure)", pytrace=False)
        pytest.skip(message)


def unique_name(kind: str) -> str:
    return f"nt{os.getpid() % 100000}{kind}{next(_counter)}"


@pytest.fixture
def topology():
    """client — router — server namespaces, removed after the test whatever happens."""
    topo = Topology(unique_name("t"))
    topo.up()
    try:
        yield topo
    finally:
        topo.down()


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


def ruleset_state(ns: str) -> str:
    """The ruleset as `nft -s list ruleset` prints it: what must be identical before and after."""
    return in_netns(ns, ["nft", "-s", "list", "ruleset"]).stdout


def traffic(ns: str, *args: str, timeout: float = 30) -> list[str]:
    """argv of a bounded traffic command inside `ns` (for `nftrace why ... -- COMMAND`)."""
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "nftrace.lab.traffic", *args]


def without_admin_rights() -> list[str]:
    """A command prefix that runs the command without CAP_NET_ADMIN and CAP_SYS_ADMIN (what
    nftrace and its lab need), as the same user: the checkout stays readable wherever it is
    (under /root, say), and only the rights under test are gone."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
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


def nftrace(*args: str, timeout: float = 60, env: Optional[dict] = None, wrapper: Sequence[str] = ()) -> NftraceResult:
    """Run the real command line in a process of its own, as a user would."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO))
    full_env.update(env or {})
    result = subprocess.run([*wrapper, sys.executable, "-m", "nftrace", *args], capture_output=True, text=True,
                            timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)
    return NftraceResult(result.returncode, result.stdout, result.stderr)


@pytest.fixture
def nftrace_cli():
    return nftrace
