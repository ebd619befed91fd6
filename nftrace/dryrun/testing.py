"""`nftrace test FILE...`: firewall regression tests, each flow a dry run.

An expectation file (the format of nftrace.lab.expectations, shared with the lab scenarios in
rules/) lists flows with the verdict they must get and, optionally, the rule that must
decide it. Every flow is traced as a dry run in a sandbox copy of the namespace, against
the ruleset the file names, or `--ruleset FILE`, or the namespace's current one
(`--current`). The result is a table (flow, expected, got, deciding rule, pass/fail), exit 1
on any mismatch, and on request a JUnit XML report for CI systems.

A sandbox is built once per ruleset and serves all flows that use it; each flow starts with
an empty conntrack table.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .session import DryRun, DryRunRequest, check_dry_run_flow
from ..errors import InputError
from ..lab.expectations import ExpectationFile, FlowExpectation, load_expectations
from ..trace.paths import Step
from ..trace.report import TraceReport, packet_json

NO_PACKET = {"verdict": "unknown", "decided_by": None}


@dataclass
class FlowResult:
    """One flow of one expectation file, run."""

    file: Path
    ruleset: str
    expectation: FlowExpectation
    packet: Optional[dict]  # nftrace's JSON for the packet; None when none was seen
    problems: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    seconds: float = 0.0
    error: bool = False  # the flow could not be run at all

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def got(self) -> str:
        if self.error:
            return "not run"
        return self.packet["verdict"] if self.packet else "no packet"

    @property
    def deciding_rule(self) -> str:
        return deciding_rule_text(self.packet)


def deciding_rule_text(packet: Optional[dict]) -> str:
    """`inet fw input rule handle 7: tcp dport 22 drop`, or what stands in for it."""
    if packet is None:
        return "(no packet seen)"
    decided = packet.get("decided_by")
    if not decided:
        return packet.get("summary") or "-"
    # The step again, so that it reads as the answer's own line does (a legacy rule by number).
    fields = ("hook", "family", "table", "chain", "type", "handle", "rule_number", "text", "verdict", "iptables")
    return Step(**{name: decided.get(name) for name in fields}, backend=decided.get("backend") or "nft").location()


@dataclass(frozen=True)
class RulesetChoice:
    """What the flows of a file are tested against."""

    path: Optional[Path]  # None: the namespace's current ruleset
    kind: Optional[str]

    def describe(self, where: str) -> str:
        return f"the current ruleset of {where}" if self.path is None else str(self.path)


def ruleset_for(file: ExpectationFile, override: Optional[Path], override_kind: Optional[str],
                current: bool) -> RulesetChoice:
    if current:
        return RulesetChoice(None, None)
    if override is not None:
        return RulesetChoice(Path(override).resolve(), override_kind)
    return RulesetChoice(file.ruleset, file.ruleset_kind)


def load_all(paths: list) -> list[ExpectationFile]:
    """Read and check every file and flow before any sandbox is built: bad input is exit 2."""
    if not paths:
        raise InputError("nftrace test: give at least one expectation file")
    files = [load_expectations(Path(path)) for path in paths]
    for file in files:
        for expectation in file.flows:
            try:
                check_dry_run_flow(expectation.flow, "new")
            except InputError as err:
                raise InputError(f"{file.path}: flow '{expectation.name}': {err}") from None
    return files


def run_files(files: list[ExpectationFile], netns: Optional[str], *, ruleset: Optional[Path] = None,
              ruleset_kind: Optional[str] = None, current: bool = False, timeout: float = 10.0,
              on_result: Optional[Callable[[FlowResult], None]] = None) -> list[FlowResult]:
    """Run every flow of every file as a dry run; a sandbox per distinct ruleset."""
    if current and ruleset is not None:
        raise InputError("--current and --ruleset exclude each other")
    where = f"netns {netns}" if netns else "this namespace"
    results = []
    groups: dict = {}
    for file in files:
        groups.setdefault(ruleset_for(file, ruleset, ruleset_kind, current), []).append(file)
    for choice, group in groups.items():
        with DryRun(DryRunRequest(netns, choice.path, choice.kind)) as dry:
            for file in group:
                for expectation in file.flows:
                    result = run_flow(dry, file, expectation, choice.describe(where), timeout)
                    results.append(result)
                    if on_result:
                        on_result(result)
    return results


def run_flow(dry: DryRun, file: ExpectationFile, expectation: FlowExpectation, ruleset: str,
             timeout: float) -> FlowResult:
    report = TraceReport(flow=expectation.flow, netns=dry.request.netns)
    packets: list = []
    started = time.monotonic()
    try:
        dry.trace(expectation.flow, report, lambda path: packets.append(packet_json(path, report.interfaces)),
                  timeout=timeout)
    except InputError as err:
        # This flow cannot enter this namespace (no route back to its source, no such
        # interface): a failed test of its own, the others still run.
        return FlowResult(file.path, ruleset, expectation, None, [f"not run: {err}"], [], time.monotonic() - started,
                          error=True)
    packet = packets[0] if packets else None
    return FlowResult(file.path, ruleset, expectation, packet, expectation.check(packet or NO_PACKET),
                      list(report.warnings), time.monotonic() - started)


# -- output -------------------------------------------------------------------------------------


def flow_label(expectation: FlowExpectation) -> str:
    return f"{expectation.name} ({expectation.flow.describe()})"


def render_table(results: list[FlowResult]) -> str:
    """The table for people: one row per flow, the differences under a failed row."""
    header = ("RESULT", "FLOW", "EXPECTED", "GOT", "DECIDING RULE")
    rows = [("PASS" if r.passed else "FAIL", flow_label(r.expectation), r.expectation.expect, r.got, r.deciding_rule)
            for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = []
    current_file = None
    for result, row in zip(results, rows):
        if result.file != current_file:
            current_file = result.file
            if lines:
                lines.append("")
            lines.append(f"{result.file} (against {result.ruleset})")
            lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[4])
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])
        for problem in result.problems:
            lines.append(" " * (widths[0] + 2) + f"└ {problem}")
    passed = sum(1 for r in results if r.passed)
    lines.append("")
    lines.append(f"{len(results)} flows: {passed} passed, {len(results) - passed} failed")
    return "\n".join(lines)


def junit_xml(results: list[FlowResult]) -> str:
    """JUnit XML: one test suite per expectation file, one test case per flow."""
    suites = ET.Element("testsuites", name="nftrace test", tests=str(len(results)),
                        failures=str(sum(1 for r in results if not r.passed and not r.error)),
                        errors=str(sum(1 for r in results if r.error)), time=f"{sum(r.seconds for r in results):.3f}")
    by_file: dict = {}
    for result in results:
        by_file.setdefault(result.file, []).append(result)
    for file, file_results in by_file.items():
        suite = ET.SubElement(suites, "testsuite", name=str(file), tests=str(len(file_results)),
                              failures=str(sum(1 for r in file_results if not r.passed and not r.error)),
                              errors=str(sum(1 for r in file_results if r.error)),
                              time=f"{sum(r.seconds for r in file_results):.3f}")
        for result in file_results:
            case = ET.SubElement(suite, "testcase", classname=Path(file).name, name=flow_label(result.expectation),
                                 time=f"{result.seconds:.3f}")
            if result.error:
                ET.SubElement(case, "error", type="not run", message="; ".join(result.problems))
            elif not result.passed:
                failure = ET.SubElement(case, "failure", type="mismatch", message="; ".join(result.problems))
                failure.text = (f"expected {result.expectation.expect}, got {result.got}\n"
                                f"deciding rule: {result.deciding_rule}\nruleset: {result.ruleset}")
            output = [f"deciding rule: {result.deciding_rule}"] + [f"warning: {w}" for w in result.warnings]
            ET.SubElement(case, "system-out").text = "\n".join(output)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
