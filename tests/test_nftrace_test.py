"""`nftrace test FILE...`: firewall regression tests as an admin's CI pipeline runs them."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import REPO, lab_topology, nftrace
from nftrace.dryrun.sandbox import load_ruleset_file, read_candidate

pytestmark = pytest.mark.kernel

DATA = REPO / "tests" / "data"
# A run of a dozen flows takes 10-20 s alone, three times that on a loaded machine (CI runs
# the suite on two releases at once): the bound is for a hang, not for speed.
MANY_FLOWS = 240

WRONG = """ruleset = "router.nft"

[[flow]]
name = "telnet to the router is accepted (it is not)"
from = "10.77.1.2"
to = "10.77.1.1"
proto = "tcp"
dport = 23
expect = "accept"

[[flow]]
name = "ssh from an admin, decided in the wrong chain"
from = "10.77.1.2"
to = "10.77.1.1"
proto = "tcp"
dport = 22
expect = "accept"
chain = "input"

[[flow]]
name = "dns for the lan"
from = "10.77.1.2"
to = "10.77.1.1"
proto = "udp"
dport = 53
expect = "accept"
"""


@pytest.fixture(scope="module")
def router():
    with lab_topology("ntest") as topology:
        yield topology.router


@pytest.fixture
def wrong_file(tmp_path) -> Path:
    """An expectation file next to a copy of router.nft, with two expectations that are wrong."""
    shutil.copy(DATA / "router.nft", tmp_path / "router.nft")
    path = tmp_path / "wrong.expect.toml"
    path.write_text(WRONG)
    return path


def test_all_expectations_met_exit_0_with_a_row_per_flow(router):
    result = nftrace("--netns", router, "test", str(DATA / "router.expect.toml"), str(DATA / "host.expect.toml"),
                     timeout=MANY_FLOWS)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(rows) == 26 and all(row.startswith("PASS") for row in rows)
    assert "26 flows: 26 passed, 0 failed" in result.stdout
    assert f"(against {DATA / 'router.nft'})" in result.stdout


def test_a_mismatch_exits_1_and_says_what_differs(router, wrong_file):
    result = nftrace("--netns", router, "test", str(wrong_file))
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    telnet = next(i for i, line in enumerate(lines) if "telnet" in line)
    assert lines[telnet].startswith("FAIL") and "accept    drop" in lines[telnet]
    assert "tcp dport vmap @lan_ports" in lines[telnet]
    assert lines[telnet + 1].strip() == "└ verdict drop, expected accept"
    assert any("└ decided in chain admin_ssh, expected input" in line for line in lines)
    assert "3 flows: 1 passed, 2 failed" in result.stdout


def test_junit_report_has_a_failure_per_mismatch(router, wrong_file, tmp_path):
    report = tmp_path / "junit.xml"
    result = nftrace("--netns", router, "test", str(wrong_file), "--junit", str(report))
    assert result.returncode == 1
    suites = ET.parse(report).getroot()
    assert (suites.tag, suites.get("tests"), suites.get("failures")) == ("testsuites", "3", "2")
    cases = suites.findall("./testsuite/testcase")
    failed = {case.get("name").rsplit(" (", 1)[0]: case.find("failure") for case in cases}
    assert failed["dns for the lan"] is None
    assert failed["telnet to the router is accepted (it is not)"].get("message") == "verdict drop, expected accept"


def test_ruleset_option_tests_every_flow_against_the_candidate(router, tmp_path):
    candidate = tmp_path / "open.nft"
    candidate.write_text("flush ruleset\n")
    result = nftrace("--netns", router, "test", str(DATA / "router.expect.toml"), "--ruleset", str(candidate),
                     timeout=MANY_FLOWS)
    assert result.returncode == 1
    assert f"(against {candidate})" in result.stdout
    assert "telnet is dropped by the port map" in result.stdout


def test_current_option_tests_the_namespaces_own_ruleset(router):
    load_ruleset_file(router, read_candidate(DATA / "router.nft"))
    result = nftrace("--netns", router, "test", "--current", str(DATA / "router.expect.toml"), timeout=MANY_FLOWS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"(against the current ruleset of netns {router})" in result.stdout


def test_lab_option_needs_no_namespace():
    result = nftrace("test", "--lab", str(DATA / "host.expect.toml"), timeout=MANY_FLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_scenarios_pass_their_expectations():
    """The lab scenarios in rules/, each against its own ruleset, all as dry runs."""
    files = sorted((REPO / "rules").glob("*.expect.toml"))
    assert files, "rules/ has no scenarios"
    result = nftrace("test", "--lab", *map(str, files), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("content,message", [
    ("ruleset = 'router.nft'\n[[flow]]\nfrom = '10.77.1.2'\nto = '10.77.1.1'\nexpect = 'maybe'\n", "expect must be one of"),
    ("ruleset = 'router.nft'\n[[flow]]\nname = 'x'\nfrom = '10.77.1.2'\nto = '10.77.1.1'\nexpect = 'drop'\n", "give --proto"),
    ("this is not toml", "wrong.expect.toml"),
])
def test_bad_expectation_file_is_one_line_exit_2(router, tmp_path, content, message):
    path = tmp_path / "wrong.expect.toml"
    path.write_text(content)
    result = nftrace("--netns", router, "test", str(path))
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr


def test_a_flow_that_cannot_enter_is_an_error_row_and_the_others_still_run(router, tmp_path):
    shutil.copy(DATA / "router.nft", tmp_path / "router.nft")
    path = tmp_path / "unreachable.expect.toml"
    path.write_text(WRONG.split("[[flow]]")[0] + "[[flow]]\nname = 'from nowhere'\nfrom = '192.0.2.9'\n"
                    "to = '10.77.1.1'\nproto = 'udp'\ndport = 53\nexpect = 'accept'\n\n[[flow]]" + WRONG.split("[[flow]]")[3])
    report = tmp_path / "junit.xml"
    result = nftrace("--netns", router, "test", str(path), "--junit", str(report))
    assert result.returncode == 1
    assert "not run: --dry-run: netns" in result.stdout and "no route back to 192.0.2.9" in result.stdout
    assert "2 flows: 1 passed, 1 failed" in result.stdout
    assert ET.parse(report).getroot().get("errors") == "1"


def test_each_flow_gets_the_kernel_drop_of_its_own_packet(router, tmp_path):
    """The sandbox's one drop watcher (bpftrace takes seconds to start) serves every flow of the run:
    each packet the kernel drops after netfilter is answered with its own drop."""
    from nftrace.dryrun.testing import load_all, run_files

    shutil.copy(DATA / "router.nft", tmp_path / "router.nft")
    path = tmp_path / "closed.expect.toml"
    flows = "".join(f"\n[[flow]]\nname = 'udp {port} to the router'\nfrom = '10.77.1.2'\nto = '10.77.1.1'\n"
                    f"proto = 'udp'\ndport = {port}\nexpect = 'accept'\n" for port in (53, 67))
    path.write_text("ruleset = 'router.nft'\n" + flows)
    results = run_files(load_all([path]), router)
    assert [(r.passed, r.packet["packet"]["dport"], r.packet["kernel_drop"]["reason"]) for r in results] == [
        (True, 53, "NO_SOCKET"), (True, 67, "NO_SOCKET")]
