"""Every flow of rules/ scenarios, traced on the lab VMs (vagrant/) with real traffic between them.

Run by scripts/vm-test.sh once the three VMs are up; it talks to them with plain ssh (the
config `vagrant ssh-config` writes, with a shared connection per VM):

    python3 scripts/vm_flows.py --ssh-config FILE [--result FILE] SCENARIO...
    python3 scripts/vm_flows.py --count SCENARIO...       # how many flows, nothing run

For each scenario, the firewall VM loads it into its router namespace (`nftrace lab load`),
then each flow is traced there with `nftrace why --count 1 --json` while its traffic runs:
from the client or the server VM (the firewall's nftrace runs a placeholder command that says
when the trace rules are in, then the sender VM sends), or, for `sender = "router"` flows, from
the router namespace itself, as nftrace's own traffic command. The answer is checked against
the flow's expectation (verdict, deciding chain, rule, NAT) exactly as tests/test_scenarios.py
does for the namespace lab.

Only the host's python3 (3.11+) is needed: the nftrace modules used here are pure Python.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# The one place this script uses nftrace's code: scenarios, their flows and how a flow's
# `nftrace why` and traffic look (the namespace lab's, reused so that both labs trace alike).
from nftrace.lab.lab import find_scenario, why_arguments  # noqa: E402

VM_PYTHON = "/nftrace/.venv/bin/python"
ROUTER_NS = "nftlab-router"
# The namespace lab's names; only `router` is a namespace on the VMs, the others are VMs.
STAND_IN_TOPOLOGY = SimpleNamespace(router=ROUTER_NS, client="nftlab-client", server="nftlab-server")
SENDER_VMS = {"client": "client", "server": "server"}
READY = "nftrace-vm-lab: trace rules in"
TRACE_TIMEOUT = 30.0  # nftrace's --timeout: no packet within this, the flow fails
READY_TIMEOUT = 90.0  # from ssh to trace rules in place, under software emulation on a busy host
SSH_TIMEOUT = 120.0


class VMs:
    def __init__(self, ssh_config: Path):
        self.ssh_config = ssh_config

    def command(self, vm: str, argv: list[str]) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), vm, shlex.join(argv)]

    def run(self, vm: str, argv: list[str], timeout: float = SSH_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(vm, argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)


def traffic_argv(flow) -> list[str]:
    """The flow's traffic command as the namespace lab runs it (`python -m MODULE ARGS`), with
    the VM's python instead of the namespace wrapper and the host's."""
    command = why_arguments(STAND_IN_TOPOLOGY, flow)
    command = command[command.index("--") + 1:]
    module = command.index("-m") + 1
    return [VM_PYTHON, "-m", *command[module:]]


def why_argv(flow) -> list[str]:
    arguments = why_arguments(STAND_IN_TOPOLOGY, flow, timeout=TRACE_TIMEOUT, as_json=True)
    return ["sudo", "nftrace", *arguments[: arguments.index("--")]]


def trace(vms: VMs, flow, workdir: Path) -> tuple[int, str, str]:
    """Trace one flow on the firewall VM while its traffic runs; (exit status, stdout, stderr)."""
    if flow.sender == "router":
        command = [*why_argv(flow), "--", "ip", "netns", "exec", ROUTER_NS, *traffic_argv(flow)]
        result = vms.run("firewall", command, timeout=TRACE_TIMEOUT + SSH_TIMEOUT)
        return result.returncode, result.stdout, result.stderr
    # nftrace starts its traffic command once its trace rules are in: this one says so and
    # waits (nftrace stops it at the first traced packet), and the sender VM sends then.
    placeholder = ["sh", "-c", f"echo '{READY}' >&2; exec sleep {TRACE_TIMEOUT + 10:g}"]
    stdout_path, stderr_path = workdir / "why.out", workdir / "why.err"
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        why = subprocess.Popen(vms.command("firewall", [*why_argv(flow), "--", *placeholder]), stdout=stdout,
                               stderr=stderr, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while READY not in stderr_path.read_text() and why.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if READY in stderr_path.read_text():
            sent = vms.run(SENDER_VMS[flow.sender], ["sudo", *traffic_argv(flow)])
            if sent.returncode != 0:
                print(f"      traffic from the {flow.sender} VM exited {sent.returncode}: {sent.stderr.strip()}")
        why.wait(TRACE_TIMEOUT + SSH_TIMEOUT)
    finally:
        if why.poll() is None:  # only on a timeout above: the ssh session ends nftrace too
            why.terminate()
            why.wait(30)
    return why.returncode, stdout_path.read_text(), stderr_path.read_text()


def check(flow, status: int, stdout: str, stderr: str) -> tuple[list[str], str]:
    """(problems, nftrace's one-line summary) for one traced flow."""
    if status != 0:
        last = [line for line in stderr.splitlines() if line.strip() and READY not in line][-3:]
        return [f"nftrace exited {status}: " + " | ".join(last)], ""
    try:
        packets = json.loads(stdout)["packets"]
    except (ValueError, KeyError) as err:
        return [f"nftrace's JSON is unreadable ({err})"], ""
    if len(packets) != 1:
        return [f"{len(packets)} packets traced, expected 1"], ""
    return flow.check(packets[0]), packets[0].get("summary", "")


def run_scenario(vms: VMs, name: str, workdir: Path) -> tuple[int, int]:
    """(flows as expected, flows) of one scenario."""
    scenario = find_scenario(name, REPO / "rules")
    loaded = vms.run("firewall", ["sudo", "nftrace", "--netns", ROUTER_NS, "lab", "load", name])
    if loaded.returncode != 0:
        print(f"  {name}: the firewall VM could not load it: {loaded.stderr.strip()}")
        return 0, len(scenario.flows)
    print(f"  {name} ({scenario.expectations.description})")
    good = 0
    for flow in scenario.flows:
        started = time.monotonic()
        try:
            problems, summary = check(flow, *trace(vms, flow, workdir))
        except subprocess.TimeoutExpired as err:
            problems, summary = [f"timed out: {shlex.join(err.cmd) if isinstance(err.cmd, list) else err.cmd}"], ""
        seconds = time.monotonic() - started
        if not problems:
            good += 1
            print(f"    ok    {flow.name} ({seconds:.0f} s): {summary}")
        elif flow.xfail:
            good += 1  # the file states nftrace cannot answer this one yet
            print(f"    xfail {flow.name} ({seconds:.0f} s): {'; '.join(problems)} (expected: {flow.xfail})")
        else:
            print(f"    FAIL  {flow.name} ({seconds:.0f} s): {summary + ': ' if summary else ''}{'; '.join(problems)}")
    return good, len(scenario.flows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ssh-config", type=Path)
    parser.add_argument("--result", type=Path, help="write 'AS_EXPECTED TOTAL' here")
    parser.add_argument("--count", action="store_true", help="print the number of flows and stop")
    parser.add_argument("scenarios", nargs="+")
    args = parser.parse_args(argv)
    if args.count:
        print(sum(len(find_scenario(name, REPO / "rules").flows) for name in args.scenarios))
        return 0
    if args.ssh_config is None:
        parser.error("--ssh-config is needed to run flows")
    vms = VMs(args.ssh_config)
    good = total = 0
    with tempfile.TemporaryDirectory(prefix="vm-flows") as workdir:
        for name in args.scenarios:
            scenario_good, scenario_total = run_scenario(vms, name, Path(workdir))
            good += scenario_good
            total += scenario_total
            if args.result:
                args.result.write_text(f"{good} {total}\n")
    return 0 if good == total else 1


if __name__ == "__main__":
    sys.exit(main())
