"""Nothing left behind, nothing changed, nothing mixed: the guarantees an admin relies on
before running nftrace on a production firewall, attacked with real signals, real
concurrent runs and real ruleset changes, in namespaces.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, load_ruleset, nftrace, ruleset_state, traffic
from nftrace.lab.topology import CLIENT_V4, ROUTER_CLIENT_V4, SERVER_V4, in_netns

pytestmark = pytest.mark.kernel

RULESET = """
table inet fw {
    chain input {
        type filter hook input priority filter; policy accept;
        tcp dport 22 counter drop
        tcp dport 80 counter accept
        udp dport 9 counter meta mark set 0x42
        meta mark 0x42 counter accept
        ct state new counter
    }
}
"""


@pytest.fixture
def router(topology):
    load_ruleset(topology.router, RULESET)
    return topology


def nft_tables(ns):
    return in_netns(ns, ["nft", "list", "tables"]).stdout


def start_nftrace(ns, *args, env=None):
    """nftrace in the background; returns once its trace rules are in (its 'tracing' line)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "nftrace", "--netns", ns, "why", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})),
    )
    line = process.stderr.readline()
    assert line.startswith("tracing "), line + process.stderr.read()
    assert "nftrace_" in nft_tables(ns)
    return process


class JsonRun:
    """The --json document of a running nftrace, read line by line as its packets complete:
    a test waits for the packets it needs instead of sleeping."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.text = ""  # what nftrace wrote so far (read from the pipe itself: no buffer hides a line)
        self.packets: list[dict] = []

    def wait_for(self, done, seconds: float = 15.0) -> list:
        """Read packets until `done(packets)` holds; fail if it does not within `seconds`."""
        import json
        import select

        deadline = time.monotonic() + seconds
        descriptor = self.process.stdout.fileno()
        while not done(self.packets):
            ready, _, _ = select.select([descriptor], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(descriptor, 65536).decode() if ready else ""
            assert chunk, f"nftrace gave {len(self.packets)} packets and no more: {self.packets}"
            self.text += chunk
            lines = self.text.splitlines()[1:]  # the header, then one packet a line
            complete = lines if self.text.endswith("\n") else lines[:-1]
            self.packets = [json.loads(line.lstrip(" ,")) for line in complete if not line.startswith("]")]
        return self.packets

    def stop(self) -> dict:
        """Ctrl-C, then the whole document."""
        import json

        self.process.send_signal(signal.SIGINT)
        self.process.wait(10)
        rest = b""
        while chunk := os.read(self.process.stdout.fileno(), 65536):
            rest += chunk
        return json.loads(self.text + rest.decode())


def dports(packets) -> set:
    return {packet["packet"]["dport"] for packet in packets}


FLOW = ["--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp", "--dport", "22"]


# -- every exit path removes what nftrace added -------------------------------------------


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM),
                                            (signal.SIGHUP, 128 + signal.SIGHUP)])
def test_a_signal_stops_the_trace_and_removes_the_rules(router, signum, status):
    before = ruleset_state(router.router)
    process = start_nftrace(router.router, *FLOW, "--timeout", "30")
    process.send_signal(signum)
    assert process.wait(10) == status
    assert "trace rules removed" in process.stderr.read()
    assert ruleset_state(router.router) == before


def test_sigkill_leaves_nothing_because_the_kernel_owns_the_cleanup(router):
    before = ruleset_state(router.router)
    process = start_nftrace(router.router, *FLOW, "--timeout", "30")
    process.kill()
    process.wait(10)
    assert ruleset_state(router.router) == before


def test_an_interrupted_json_run_still_prints_a_valid_document(router):
    process = start_nftrace(router.router, *FLOW, "--timeout", "30", "--json")
    process.send_signal(signal.SIGINT)
    assert process.wait(10) == 130
    import json

    document = json.loads(process.stdout.read())
    assert document["packets"] == []


def test_a_crash_inside_nftrace_still_removes_the_rules(router, tmp_path):
    # sitecustomize runs in the nftrace process: it breaks the path builder, as a bug would.
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import nftrace.trace.paths
        def broken(self, event, now=0.0):
            raise RuntimeError("injected fault")
        nftrace.trace.paths.PathBuilder.feed = broken
    """))
    before = ruleset_state(router.router)
    result = nftrace("--netns", router.router, "why", *FLOW, "--timeout", "10", "--",
                     *traffic(router.client, "tcp", ROUTER_CLIENT_V4, "22", "--timeout", "0.5"),
                     env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "TMPDIR": str(tmp_path)})
    assert result.returncode == 70
    assert result.stderr.splitlines()[-1].startswith("nftrace: internal error: RuntimeError: injected fault (a bug; ")
    assert "Traceback" not in result.stderr
    assert ruleset_state(router.router) == before


def test_a_traffic_command_that_cannot_start_is_one_line_and_leaves_nothing(router):
    before = ruleset_state(router.router)
    result = nftrace("--netns", router.router, "why", *FLOW, "--timeout", "5", "--", "/nonexistent/sender")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "nftrace: cannot run /nonexistent/sender: No such file or directory"
    assert ruleset_state(router.router) == before


def test_a_failing_traffic_command_ends_the_run_normally(router):
    result = nftrace("--netns", router.router, "why", *FLOW, "--timeout", "20", "--", "false")
    assert result.returncode == 3  # no packet seen; the run ended when the command did
    assert "warning: the traffic command exited with status 1 before any packet of the flow was seen" in result.stderr
    assert "nftrace_" not in nft_tables(router.router)


def dead(pid: int) -> bool:
    """Ended: a zombie, or already waited for."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_ctrl_c_on_the_terminal_stops_the_traffic_command_too_without_a_warning_about_it(router):
    """The terminal sends Ctrl-C to the whole foreground group: nftrace and its traffic command.
    The command's end by that signal says nothing about why no packet was seen."""
    process = subprocess.Popen([sys.executable, "-m", "nftrace", "--netns", router.router, "why", *FLOW,
                                "--timeout", "30", "--", "sleep", "30"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert process.stderr.readline().startswith("tracing ")
    # The order that made the warning: the command has ended when nftrace's handler runs.
    # Signalled together, as by the terminal, either may go first.
    deadline = time.monotonic() + 5

    def command() -> str:
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        return next((child for child in children if Path(f"/proc/{child}/comm").read_text().strip() == "sleep"), "")

    while not command():  # the traffic command starts right after the "tracing" line
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sleeper = command()
    os.kill(int(sleeper), signal.SIGINT)
    while not dead(int(sleeper)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(10) == 130
    said = process.stderr.read()
    assert "trace rules removed" in said and "traffic command" not in said
    assert "nftrace_" not in nft_tables(router.router)


def test_cleanup_removes_only_dead_runs_tables(router):
    dead_pid = 4_000_000  # above pid_max: no such process
    load_ruleset(router.router, "\n".join([
        f"table inet nftrace_{dead_pid}_abcdef {{",
        "    chain mark_prerouting { type filter hook prerouting priority -350; }",
        "}",
        f"table inet nftrace_{os.getpid()}_abcdef {{",
        "}",
        "table inet nftracer {",
        "}",
    ]) + "\n")
    result = nftrace("--netns", router.router, "cleanup")
    assert result.returncode == 0
    # Sandboxes are the machine's (/run/netns): another test or user's killed dry run may have
    # left one at any moment, and cleanup removes it too. What is said of tables is exact.
    said = [line for line in result.stdout.splitlines() if not line.startswith("removed dry-run sandbox namespace ")]
    assert said == [f"removed table inet nftrace_{dead_pid}_abcdef"]
    tables = nft_tables(router.router)
    assert f"nftrace_{dead_pid}_" not in tables
    assert f"nftrace_{os.getpid()}_abcdef" in tables  # a live process's: not ours to remove
    assert "nftracer" in tables  # not nftrace's at all


def test_the_next_run_removes_a_killed_runs_leftover_and_says_so(router):
    load_ruleset(router.router, "table inet nftrace_4000001_abcdef {\n}\n")
    result = nftrace("--netns", router.router, "why", *FLOW, "--timeout", "0.5")
    assert "removed trace tables left by killed nftrace runs: inet nftrace_4000001_abcdef" in result.stderr
    assert "nftrace_4000001" not in nft_tables(router.router)


# -- nothing changed -----------------------------------------------------------------------


def counters(ns):
    listing = in_netns(ns, ["nft", "list", "table", "inet", "fw"]).stdout
    return [(int(p), int(b)) for p, b in re.findall(r"counter packets (\d+) bytes (\d+)", listing)]


def send_mix(topology):
    """The same packets every time: UDP first (it also resolves the router's address), then
    one SYN per port, with a timeout under TCP's first retransmission."""
    in_netns(topology.client, [sys.executable, "-m", "nftrace.lab.traffic", "udp", ROUTER_CLIENT_V4, "9", "--count", "3"])
    results = []
    for port in ("22", "80", "443"):
        results.append(in_netns(topology.client, [sys.executable, "-m", "nftrace.lab.traffic", "tcp", ROUTER_CLIENT_V4, port,
                                                  "--timeout", "0.3"]).stdout.strip())
    return results


def test_tracing_changes_no_verdict_mark_or_counter(router):
    untraced_results = send_mix(router)
    untraced = counters(router.router)
    process = start_nftrace(router.router, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--timeout", "30",
                            "--count", "0", "--max-rate", "0", "--json")
    traced_results = send_mix(router)
    process.send_signal(signal.SIGINT)
    process.wait(10)
    assert traced_results == untraced_results == ["timeout", "refused", "refused"]
    traced = [(p - p0, b - b0) for (p, b), (p0, b0) in zip(counters(router.router), untraced)]
    assert traced == untraced
    import json

    packets = json.loads(process.stdout.read())["packets"]
    assert {p["packet"]["dport"] for p in packets} >= {22, 80, 443, 9}


# -- nothing mixed ---------------------------------------------------------------------------


def test_two_runs_at_once_each_see_only_their_own_flow(router):

    flow_a = ["--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp", "--dport", "22"]
    flow_b = ["--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "tcp"]  # overlaps a
    a = JsonRun(start_nftrace(router.router, *flow_a, "--timeout", "30", "--count", "0", "--json"))
    b = JsonRun(start_nftrace(router.router, *flow_b, "--timeout", "30", "--count", "0", "--json"))
    send_mix(router)
    a.wait_for(lambda packets: 22 in dports(packets))
    b.wait_for(lambda packets: dports(packets) >= {22, 80, 443})
    packets_a = a.stop()["packets"]
    packets_b = b.stop()["packets"]
    assert {p["packet"]["dport"] for p in packets_a} == {22}
    assert {p["packet"]["dport"] for p in packets_b} == {22, 80, 443}
    for packet in packets_a + packets_b:
        assert not any(step["table"].startswith("nftrace_") for step in packet["steps"])
        assert packet["verdict"] == ("drop" if packet["packet"]["dport"] == 22 else "accept")
    assert "nftrace_" not in nft_tables(router.router)


def test_the_kernel_side_rate_limit_bounds_what_is_traced(router):
    import json

    result = nftrace("--netns", router.router, "why", "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "udp",
                     "--dport", "9", "--max-rate", "5", "--count", "0", "--timeout", "20", "--json", "--",
                     *traffic(router.client, "udp", ROUTER_CLIENT_V4, "9", "--count", "200"))
    packets = json.loads(result.stdout)["packets"]
    assert 1 <= len(packets) <= 10  # 5/second with a burst of 5, the sender takes well under a second


# -- the ruleset changes under nftrace --------------------------------------------------------


def test_rule_texts_follow_a_ruleset_reload_during_the_trace(router):

    run = JsonRun(start_nftrace(router.router, *FLOW, "--timeout", "30", "--count", "0", "--json"))
    in_netns(router.client, [sys.executable, "-m", "nftrace.lab.traffic", "tcp", ROUTER_CLIENT_V4, "22", "--timeout", "0.3"])
    run.wait_for(lambda packets: len(packets) >= 1)
    # A firewall manager reloads everything, as `nft -f` of a full file does. The generation
    # change reaches nftrace on the socket of the trace events, before the next packet's.
    load_ruleset(router.router, "flush ruleset\n" + RULESET.replace("tcp dport 22 counter drop",
                                                                   'tcp dport 22 counter reject comment "reloaded"'))
    in_netns(router.client, [sys.executable, "-m", "nftrace.lab.traffic", "tcp", ROUTER_CLIENT_V4, "22", "--timeout", "0.3"])
    run.wait_for(lambda packets: len(packets) >= 2)
    packets = run.stop()["packets"]
    texts = [p["decided_by"]["text"] for p in packets]
    assert texts[0] == "tcp dport 22 counter drop"
    assert texts[-1] == 'tcp dport 22 counter reject comment "reloaded"'
    assert "nftrace_" not in nft_tables(router.router)


def test_without_the_owner_flag_a_deleted_trace_table_stops_the_run_with_a_clear_message(router):
    process = start_nftrace(router.router, *FLOW, "--timeout", "30", env={"NFTRACE_TABLE_OWNER": "0"})
    table = next(line.split()[-1] for line in nft_tables(router.router).splitlines() if "nftrace_" in line)
    in_netns(router.router, ["nft", "delete", "table", "inet", table])
    assert process.wait(10) == 1
    assert f"nftrace's table inet {table} was deleted by someone else; stopping" in process.stderr.read()


def test_without_the_owner_flag_a_normal_end_still_removes_the_table(router):
    before = ruleset_state(router.router)
    result = nftrace("--netns", router.router, "why", *FLOW, "--timeout", "0.5", env={"NFTRACE_TABLE_OWNER": "0"})
    assert result.returncode == 3
    assert ruleset_state(router.router) == before


def test_packets_are_streamed_as_they_complete(router):
    process = start_nftrace(router.router, "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "udp",
                            "--count", "0", "--max-rate", "0", "--timeout", "30", "--json")
    in_netns(router.client, [sys.executable, "-m", "nftrace.lab.traffic", "udp", ROUTER_CLIENT_V4, "9"])
    # The run is still going: the packet must already be on stdout.
    import json
    import select

    ready, _, _ = select.select([process.stdout], [], [], 10)
    assert ready and process.poll() is None
    header = process.stdout.readline()
    assert header.startswith('{"backend": "nft"')
    packet = json.loads(process.stdout.readline().lstrip(" ,"))
    assert packet["packet"]["dport"] == 9
    process.send_signal(signal.SIGINT)
    process.wait(10)


def test_lost_events_are_counted_and_their_packets_never_get_a_verdict(router):
    import json

    # A deliberately tiny socket buffer and an unthrottled burst: the kernel must drop events.
    result = nftrace("--netns", router.router, "why", "--from", CLIENT_V4, "--to", ROUTER_CLIENT_V4, "--proto", "udp",
                     "--dport", "9", "--count", "0", "--max-rate", "0", "--timeout", "20", "--json", "--",
                     *traffic(router.client, "udp", ROUTER_CLIENT_V4, "9", "--count", "3000"),
                     env={"NFTRACE_RCVBUF": "4096"})
    document = json.loads(result.stdout)
    assert document["lost_events"] > 0
    assert any(f"{document['lost_events']} trace events were lost" in warning for warning in document["warnings"])
    for packet in document["packets"]:
        # udp/9 gets mark 0x42 and is accepted by `meta mark 0x42 counter accept`: any other
        # verdict would be a wrong answer.
        assert packet["verdict"] in ("accept", "unknown")
        if not packet["complete"]:
            assert packet["verdict"] == "unknown"
            assert packet["incomplete_reason"] in ("events lost", "went idle")


def test_rules_added_and_chains_flushed_mid_trace_read_right(router):

    run = JsonRun(start_nftrace(router.router, *FLOW, "--timeout", "30", "--count", "0", "--json"))

    def syn(answers: int):
        in_netns(router.client, [sys.executable, "-m", "nftrace.lab.traffic", "tcp", ROUTER_CLIENT_V4, "22", "--timeout", "0.3"])
        run.wait_for(lambda packets: len(packets) >= answers)

    syn(1)  # dropped by `tcp dport 22 counter drop`
    in_netns(router.router, ["nft", "insert", "rule", "inet", "fw", "input", "tcp", "dport", "22", "counter", "reject",
                             "comment", '"inserted mid-trace"'])
    syn(2)  # rejected by the new first rule
    in_netns(router.router, ["nft", "flush", "chain", "inet", "fw", "input"])
    syn(3)  # no rule left: policy accept
    packets = run.stop()["packets"]
    decided = [(p["verdict"], p["decided_by"]["type"], p["decided_by"]["text"]) for p in packets]
    assert decided == [
        ("drop", "rule", "tcp dport 22 counter drop"),
        ("drop", "rule", 'tcp dport 22 counter reject comment "inserted mid-trace"'),
        ("accept", "policy", None),
    ]


FORWARDING = """
table inet fw {
    chain forward {
        type filter hook forward priority filter; policy drop;
        udp dport 7000 counter accept
    }
}
"""


def trace_chains(ns: str) -> list[str]:
    """The chains of the running nftrace's table."""
    table = next(line.split()[2] for line in nft_tables(ns).splitlines() if "nftrace_" in line)
    listing = in_netns(ns, ["nft", "list", "table", "inet", table]).stdout
    return re.findall(r"chain (\S+) \{", listing)


def test_postrouting_goes_unobserved_until_a_chain_there_could_decide(topology):
    """With nothing at postrouting, the last forward chain's accept ends a forwarded packet's
    path, and nftrace's table leaves postrouting alone (an event per packet less). A chain
    added there mid-trace is followed from then on: the observation comes back, and a drop
    there is the answer."""
    load_ruleset(topology.router, FORWARDING)
    run = JsonRun(start_nftrace(topology.router, "--from", CLIENT_V4, "--to", SERVER_V4, "--proto", "udp",
                                "--dport", "7000", "--timeout", "30", "--count", "0", "--json"))

    def datagram(answers: int):
        in_netns(topology.client, [sys.executable, "-m", "nftrace.lab.traffic", "udp", SERVER_V4, "7000",
                                   "--count", "1"])
        return run.wait_for(lambda packets: len(packets) >= answers)[-1]

    def observed_at_postrouting(wanted: bool):
        deadline = time.monotonic() + 10
        while ("obs_postrouting" in trace_chains(topology.router)) != wanted:
            assert time.monotonic() < deadline, trace_chains(topology.router)
            time.sleep(0.05)

    observed_at_postrouting(False)
    first = datagram(1)
    assert (first["verdict"], first["complete"], first["hooks"]) == ("accept", True, ["prerouting", "forward",
                                                                                      "postrouting"])
    assert first["decided_by"]["text"] == "udp dport 7000 counter accept"
    assert first["namespaces"][0]["oif"] == "r-server"
    in_netns(topology.router, ["nft", "add", "table", "inet", "late"])
    in_netns(topology.router, ["nft", "add", "chain", "inet", "late", "post",
                               "{ type filter hook postrouting priority 0; policy accept; }"])
    in_netns(topology.router, ["nft", "add", "rule", "inet", "late", "post", "udp", "dport", "7000", "drop"])
    observed_at_postrouting(True)
    second = datagram(2)
    assert (second["verdict"], second["decided_by"]["chain"], second["decided_by"]["text"]) == (
        "drop", "post", "udp dport 7000 drop")
    in_netns(topology.router, ["nft", "delete", "table", "inet", "late"])
    observed_at_postrouting(False)
    third = datagram(3)
    assert (third["verdict"], third["decided_by"]["text"]) == ("accept", "udp dport 7000 counter accept")
    packets = run.stop()["packets"]
    assert len(packets) == 3
    assert "nftrace_" not in nft_tables(topology.router)
