"""`nftrace demo`: nftrace answering real questions within a minute, on a machine with no
firewall of its own to try it on.

It builds a lab of its own (namespaces nftdemoPID-client, -router, -server; the router runs
rules/nat-router.nft), then traces the scenario's `demo = true` flows one after the other,
each with the very command a user would type, `nftrace --netns ROUTER why ... --count 1 --
TRAFFIC`, in a child process, and prints nftrace's own answer. Then it removes the lab.

The lab goes away on every exit path: normal end, error, Ctrl-C, SIGTERM, SIGHUP (turned into
exceptions so that `finally` runs), with signals held while it is being removed. A demo
killed with SIGKILL leaves a lab whose name carries a dead pid: the next demo removes it, and
its listeners end by themselves within LISTEN_SECONDS.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional, TextIO

from .expectations import FlowExpectation
from .lab import Lab, Scenario, command_name, find_scenario, require_root, scenario_names, why_arguments
from .topology import python_env
from ..signals import Interrupted, SignalsAsExceptions, SignalsHeld
from ..kernel import runner
from ..kernel.system import NETNS_RUN_DIR, pid_alive

DEMO_SCENARIO = "nat-router"
DEMO_PREFIX = "nftdemo"
LISTEN_SECONDS = 120
# Each trace's --timeout; NFTRACE_DEMO_TIMEOUT raises it where everything is slow (a VM under
# software emulation starts Python several times slower than a real machine).
TRACE_TIMEOUT = float(os.environ.get("NFTRACE_DEMO_TIMEOUT") or 10.0)
_LEFTOVER_RE = re.compile(rf"^{DEMO_PREFIX}(\d+)-(client|router|server)$")
_HEADLINE_RE = re.compile(r"^(ACCEPT|DROP|QUEUE|STOLEN|\?)\s")
HEADLINE_VERDICTS = {"ACCEPT": "accept", "DROP": "drop", "QUEUE": "queue", "STOLEN": "stolen", "?": "unknown"}


@dataclass
class DemoAnswer:
    expectation: FlowExpectation
    returncode: int
    headline: Optional[str]

    @property
    def verdict(self) -> Optional[str]:
        match = _HEADLINE_RE.match(self.headline or "")
        return HEADLINE_VERDICTS[match.group(1)] if match else None

    @property
    def as_expected(self) -> bool:
        return self.returncode == 0 and self.verdict == self.expectation.expect


def leftover_demo_labs(netns_names) -> list[str]:
    """Prefixes of demo labs whose demo process is gone (killed with SIGKILL, say)."""
    prefixes = set()
    for name in netns_names:
        match = _LEFTOVER_RE.match(name)
        if match and not pid_alive(int(match.group(1))):
            prefixes.add(f"{DEMO_PREFIX}{match.group(1)}")
    return sorted(prefixes)


def shown_command(args: list[str]) -> str:
    """The command as a user types it (the CLI is `nftrace`, not `python -m nftrace`)."""
    return shlex.join([command_name(), *args])


class Demo:
    """One run of the demo; `run()` returns the exit status."""

    def __init__(self, out: TextIO = sys.stdout, progress: TextIO = sys.stderr, scenario: Optional[Scenario] = None):
        self.out = out
        self.progress = progress
        self.scenario = scenario or find_scenario(DEMO_SCENARIO)
        self.flows = [flow for flow in self.scenario.flows if flow.demo]
        self.lab = Lab(f"{DEMO_PREFIX}{os.getpid()}")
        self.answers: list[DemoAnswer] = []
        self._child: Optional[subprocess.Popen] = None

    def say(self, text: str) -> None:
        self.progress.write(text + "\n")
        self.progress.flush()

    def show(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def run(self) -> int:
        require_root("nftrace demo")
        self._remove_leftovers()
        total = len(self.flows) + 2
        started = time.monotonic()
        try:
            with SignalsAsExceptions():
                try:
                    self.say(f"[1/{total}] building the lab: client, router and server namespaces "
                             f"({self.lab.prefix}-*); the router runs rules/{self.scenario.ruleset.name}")
                    self.lab.up(self.scenario, listen_seconds=LISTEN_SECONDS)
                    for step, flow in enumerate(self.flows, 2):
                        self._trace(step, total, flow)
                finally:
                    with SignalsHeld():
                        self._stop_child()
                        self.say(f"[{total}/{total}] removing the lab")
                        self.lab.down()
        except KeyboardInterrupt:
            self.say("nftrace demo: interrupted; the lab is removed")
            return 130
        except Interrupted as stop:
            self.say(f"nftrace demo: stopped by {signal.Signals(stop.signum).name}; the lab is removed")
            return 128 + stop.signum
        self._recap(time.monotonic() - started)
        return 0 if all(answer.as_expected for answer in self.answers) else 1

    def _remove_leftovers(self) -> None:
        names = os.listdir(NETNS_RUN_DIR) if os.path.isdir(NETNS_RUN_DIR) else []
        for prefix in leftover_demo_labs(names):
            self.say(f"removing {prefix}, left by a demo that was killed")
            Lab(prefix).down()

    def _trace(self, step: int, total: int, flow: FlowExpectation) -> None:
        args = why_arguments(self.lab.topology, flow, timeout=TRACE_TIMEOUT)
        self.say(f"[{step}/{total}] {flow.name}: {flow.flow.describe()}, sent from the {flow.sender}")
        self.say(f"      $ {shown_command(args)}")
        self._child = runner.start([sys.executable, "-m", "nftrace", *args], text=True, env=python_env())
        try:
            stdout, stderr = self._child.communicate(timeout=TRACE_TIMEOUT + 20)
            returncode = self._child.returncode
        except subprocess.TimeoutExpired:
            self._stop_child()
            stdout, stderr, returncode = "", "nftrace: did not finish in time; stopped", 1
        self._child = None
        self.show(stdout.rstrip("\n") + "\n" if stdout.strip() else "(no packet traced)\n")
        if returncode != 0:
            self.say("      nftrace said: " + " | ".join(line for line in stderr.splitlines() if line.startswith("nftrace")))
        lines = stdout.splitlines()
        self.answers.append(DemoAnswer(flow, returncode, lines[0] if lines else None))

    def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            runner.stop(child, grace=5)  # nftrace removes its trace rules on SIGTERM

    def _recap(self, seconds: float) -> None:
        self.show(f"In short ({seconds:.1f} s, lab removed):")
        for answer in self.answers:
            mark = "as expected" if answer.as_expected else f"EXPECTED {answer.expectation.expect.upper()}"
            self.show(f"  {(answer.verdict or 'none').upper():<7} {answer.expectation.name}  [{mark}]")
        self.show("")
        self.show("Each answer names the rule (or policy) that decided, and the tree shows the packet's path.")
        name = command_name()
        self.show(f"Try more: sudo {name} lab up --scenario {self.scenario.name}   (then: sudo {name} lab status)")
        self.show(f"Scenarios: {', '.join(scenario_names(self.scenario.expectations.path.parent))}")


def run_demo() -> int:
    """`nftrace demo`; an NftraceError goes up to the CLI's one-line error."""
    return Demo().run()
