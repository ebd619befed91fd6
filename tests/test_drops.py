"""`nftrace drops` against the real kernel: every dropping rule named, with counts equal to
the kernel's own counters, accepted traffic absent, honest sampling, and nothing left behind.

A router namespace carries drop rules with counters: one in its base chain, one in a chain
it jumps to, and a policy drop reached after a return; accepted traffic flows alongside.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

import pytest

from conftest import REPO, load_ruleset, nftrace, ruleset_state, traffic, unique_name
from nftrace.lab.topology import CLIENT_V4, ROUTER_CLIENT_V4, SERVER_V4, Topology, in_netns

pytestmark = pytest.mark.kernel

ROUTER_RULESET = """
table inet fw {
    chain forward {
        type filter hook forward priority filter; policy accept;
        udp dport 6000 counter drop comment "no 6000"
        iifname "r-client" jump clients
    }
    chain clients {
        udp dport 6001 counter drop comment "no 6001 from clients"
        udp dport 5000 counter accept
    }
    chain input {
        type filter hook input priority filter; policy drop;
        meta l4proto { icmp, ipv6-icmp } accept
        jump inbound
        ct state established,related accept
    }
    chain inbound {
        udp dport 7001 counter return
    }
}
"""
# (port, host, packets): two rule drops, a policy drop after a return, accepted traffic.
SENT = ((6000, SERVER_V4, 300), (6001, SERVER_V4, 200), (7001, ROUTER_CLIENT_V4, 100), (5000, SERVER_V4, 400))


@pytest.fixture(scope="module")
def lab():
    topo = Topology(unique_name("drops"))
    topo.up()
    try:
        load_ruleset(topo.router, ROUTER_RULESET)
        yield topo
    finally:
        topo.down()


def counters(ns: str) -> dict:
    """(chain, handle) → packets, for every rule with a counter, as the kernel counts them."""
    listing = json.loads(in_netns(ns, ["nft", "-j", "list", "table", "inet", "fw"]).stdout)
    found = {}
    for item in listing["nftables"]:
        rule = item.get("rule")
        if rule is None:
            continue
        for expr in rule["expr"]:
            if "counter" in expr and isinstance(expr["counter"], dict):
                found[(rule["chain"], rule["handle"])] = expr["counter"]["packets"]
    return found


def handle_of(ns: str, chain: str, text: str) -> int:
    listing = in_netns(ns, ["nft", "-a", "list", "chain", "inet", "fw", chain]).stdout
    for line in listing.splitlines():
        if text in line:
            return int(line.rsplit("# handle ", 1)[1])
    raise AssertionError(f"no rule '{text}' in {chain}")


def counted_since(lab, before: dict, chain: str, text: str) -> int:
    """Packets the rule `text` of `chain` counted since `before` (counters())."""
    handle = handle_of(lab.router, chain, text)
    return counters(lab.router)[(chain, handle)] - before[(chain, handle)]


def send(lab, port: int, host: str, count: int, rate: int = 2000) -> None:
    subprocess.run(traffic(lab.client, "udp", host, str(port), "--count", str(count), "--rate", str(rate),
                           "--max-seconds", "20"), check=True, capture_output=True, timeout=60)


class Drops:
    """`nftrace drops` running in a process group of its own (Ctrl-C reaches it alone), its
    output read as it comes, as a reader would: a full pipe would stop it."""

    def __init__(self, lab, *args: str, env: Optional[dict] = None, namespace: tuple = ()):
        namespace = namespace or ("--netns", lab.router)
        self.process = subprocess.Popen([sys.executable, "-m", "nftrace", *namespace, "drops", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})),
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready()
        self._out: list = []
        self._reader = threading.Thread(target=lambda: self._out.append(self.process.stdout.read()), daemon=True)
        self._reader.start()

    def _wait_ready(self) -> None:
        self.banner = self.process.stderr.readline()
        assert self.banner.startswith("watching drops of"), self.banner + self.process.stderr.read()

    def interrupt(self) -> None:
        os.killpg(self.process.pid, signal.SIGINT)

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        self.process.wait(timeout=timeout)
        err = self.process.stderr.read()
        self._reader.join(timeout)
        return self.process.returncode, "".join(self._out), err

    def document(self) -> dict:
        """The JSON document of a run that ended well (--json)."""
        code, out, err = self.finish()
        assert code == 0, err
        return json.loads(out)


def test_every_drop_is_counted_under_its_rule_equal_to_the_kernel_counters(lab):
    before_rules = ruleset_state(lab.router)
    before = counters(lab.router)
    run = Drops(lab, "--max-rate", "0", "--duration", "6", "--json")
    for port, host, count in SENT:
        send(lab, port, host, count)
    document = run.document()
    after = counters(lab.router)
    delta = {key: after[key] - before.get(key, 0) for key in after}
    by_rule = {(rule["decided_by"]["chain"], rule["decided_by"]["type"], rule["decided_by"]["handle"]): rule["packets"]
               for rule in document["rules"]}
    forward_drop = handle_of(lab.router, "forward", "udp dport 6000")
    clients_drop = handle_of(lab.router, "clients", "udp dport 6001")
    returned = handle_of(lab.router, "inbound", "udp dport 7001")
    assert by_rule == {
        ("forward", "rule", forward_drop): delta[("forward", forward_drop)],
        ("clients", "rule", clients_drop): delta[("clients", clients_drop)],
        ("input", "policy", None): delta[("inbound", returned)],
    }
    assert (delta[("forward", forward_drop)], delta[("clients", clients_drop)], delta[("inbound", returned)]) == (
        300, 200, 100)
    # Accepted traffic is traced (it matched) but is no drop.
    assert all(packet["packet"]["dport"] != 5000 for packet in document["packets"])
    # The kernel's own drops are no echo of a rule's drop (a failure names them; seen once in CI:
    # 601). With no filter, the lab's interfaces' IPv6 multicast (MLD reports, solicitations
    # after link-up) is traced too, and rightly counted as the kernel's: not for this host.
    multicast = sum(reason["packets"] for reason in document["kernel_drops"]
                    if all(flow["dst"].startswith("ff02:") for flow in reason["flows"]))
    assert len(document["packets"]) == document["dropped"] == 600 + multicast, document["kernel_drops"]
    assert document["not_traced"] == 0 and document["sampled"] is False
    assert document["traced"] >= 1000
    assert document["lost_events"] == 0
    assert document["mode"] == "drops" and document["filter"]["src"] is None
    assert {flow["dport"] for rule in document["rules"] for flow in rule["flows"]} == {6000, 6001, 7001}
    assert ruleset_state(lab.router) == before_rules


def test_a_burst_over_the_rate_limit_is_counted_as_not_traced(lab):
    before = counters(lab.router)
    run = Drops(lab, "--proto", "udp", "--dport", "6000", "--duration", "4", "--json")
    send(lab, 6000, SERVER_V4, 3000, rate=0)
    document = run.document()
    counted = counted_since(lab, before, "forward", "udp dport 6000")
    assert counted == 3000
    assert document["traced"] + document["not_traced"] == counted
    assert document["not_traced"] > 0 and document["sampled"] is True
    assert document["rules"][0]["packets"] == document["traced"]
    assert any("counts are a sample" in warning for warning in document["warnings"])


@pytest.mark.parametrize("where", ["socket", "stash"])
def test_events_lost_leave_a_sample_never_a_wrong_count(lab, where):
    """A burst into a 64 KiB receive buffer (the classic filter, where eBPF is not available)
    or into a stash queue of 32 records: events are lost. The packets that may have lost
    events are not counted, the count is a sample (never above the counter, the loss the
    kernel's own count), and the drops after the burst are all counted again."""
    before = counters(lab.router)
    env = {"NFTRACE_RCVBUF": "64K", "NFTRACE_CLASSIC_FILTER": "1"} if where == "socket" else {"NFTRACE_STASH_RECORDS": "32"}
    run = Drops(lab, "--proto", "udp", "--max-rate", "0", "--duration", "8", "--json", env=env)
    for port in (6001, 5000):
        send(lab, port, SERVER_V4, 3000, rate=0)
    send(lab, 6001, SERVER_V4, 100, rate=200)
    document = run.document()
    counted = counted_since(lab, before, "clients", "udp dport 6001")
    assert counted == 3100
    assert document["lost_events"] > 0 and document["sampled"] is True
    assert any("trace events were lost" in warning for warning in document["warnings"])
    by_chain = {rule["decided_by"]["chain"]: rule["packets"] for rule in document["rules"]}
    assert set(by_chain) == {"clients"} and 100 <= by_chain["clients"] < counted
    assert document["kernel_drops"] == []  # the rule's drops are never counted again as the kernel's


def test_ctrl_c_prints_the_summary_and_leaves_the_ruleset_as_it_was(lab):
    before = ruleset_state(lab.router)
    run = Drops(lab, "--max-rate", "0")
    send(lab, 6001, SERVER_V4, 50)
    time.sleep(0.5)
    run.interrupt()
    code, out, _ = run.finish()
    assert code == 0
    assert "dropped by inet fw clients rule handle" in out and 'udp dport 6001 counter drop comment "no 6001 from clients"' in out
    assert "counts are exact" in out
    lines = [line for line in out.splitlines() if " DROP " in line]
    assert len(lines) == 50 and all("→ 10.77.2.2:6001 udp in r-client" in line for line in lines)
    assert ruleset_state(lab.router) == before
    assert "nftrace_" not in in_netns(lab.router, ["nft", "list", "tables"]).stdout


def test_a_concurrent_why_sees_only_its_own_flow(lab):
    before = counters(lab.router)
    run = Drops(lab, "--max-rate", "0", "--duration", "8", "--json")
    why = subprocess.Popen([sys.executable, "-m", "nftrace", "--netns", lab.router, "why", "--from", CLIENT_V4,
                            "--to", SERVER_V4, "--proto", "udp", "--dport", "6000", "--count", "20", "--timeout", "20",
                            "--json", "--", *traffic(lab.client, "udp", SERVER_V4, "6000", "--count", "20",
                                                     "--rate", "100")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.DEVNULL)
    send(lab, 6001, SERVER_V4, 100, rate=200)
    out, err = why.communicate(timeout=60)
    assert why.returncode == 0, err
    packets = json.loads(out)["packets"]
    assert len(packets) == 20
    assert {(packet["packet"]["dport"], packet["verdict"]) for packet in packets} == {(6000, "drop")}
    document = run.document()
    by_chain = {rule["decided_by"]["chain"]: rule["packets"] for rule in document["rules"]}
    for chain, text in (("forward", "udp dport 6000"), ("clients", "udp dport 6001")):
        assert by_chain[chain] == counted_since(lab, before, chain, text)
    assert by_chain == {"forward": 20, "clients": 100}


def drops_at_closed_port(lab, port: int, count: int, rate: int, duration: int, env: Optional[dict] = None) -> dict:
    """`drops` on `count` datagrams to a port of the router that its ruleset lets in and nothing
    listens on (the kernel drops each after netfilter: NO_SOCKET); its JSON document."""
    in_netns(lab.router, ["nft", "insert", "rule", "inet", "fw", "input", "udp", "dport", str(port), "accept"])
    try:
        run = Drops(lab, "--proto", "udp", "--dport", str(port), "--max-rate", "0", "--duration", str(duration),
                    "--json", env=env)
        send(lab, port, ROUTER_CLIENT_V4, count, rate=rate)
        code, out, err = run.finish()
    finally:
        handle = handle_of(lab.router, "input", f"udp dport {port}")
        in_netns(lab.router, ["nft", "delete", "rule", "inet", "fw", "input", "handle", str(handle)])
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("watcher", ["nftrace's own", "bpftrace"])
def test_a_packet_the_kernel_drops_after_netfilter_counts_under_its_reason(lab, watcher):
    """Kernel drops are watched by nftrace's own eBPF program, or by bpftrace where it cannot
    load (NFTRACE_DROP_WATCHER=bpftrace chooses it here)."""
    env = {"NFTRACE_DROP_WATCHER": "bpftrace"} if watcher == "bpftrace" else {}
    document = drops_at_closed_port(lab, 8081, 10, rate=100, duration=5, env=env)
    if any("kernel drop reasons unavailable" in warning for warning in document["warnings"]):
        pytest.skip("bpftrace cannot watch kernel drops here")
    assert document["rules"] == []
    [reason] = document["kernel_drops"]
    assert (reason["reason"], reason["packets"]) == ("NO_SOCKET", 10)
    assert {packet["verdict"] for packet in document["packets"]} == {"accept"}
    assert all(packet["kernel_drop"]["reason"] == "NO_SOCKET" for packet in document["packets"])


def test_a_burst_the_kernel_drops_is_counted_packet_for_packet(lab):
    """20,000 datagrams at once to a closed port: more accepted packets than the kernel keeps
    stashed, more drops than the pairing keeps in hand; each is counted under NO_SOCKET, by the
    packet it was paired with or, for one whose packet was never built, by the drop's own
    headers."""
    burst = 20000
    document = drops_at_closed_port(lab, 8082, burst, rate=0, duration=6)
    assert [(reason["reason"], reason["packets"]) for reason in document["kernel_drops"]] == [("NO_SOCKET", burst)]
    assert document["warnings"] == []


def test_duration_counts_from_when_drops_says_it_is_watching(lab):
    """bpftrace takes half a second to start: `--duration 3` once watched for 2.5 s."""
    document = Drops(lab, "--duration", "3", "--json").document()
    assert document["duration"] >= 3  # from the "watching" line to the end


def test_the_namespace_can_be_named_by_a_process_in_it(lab):
    holder = subprocess.Popen(["ip", "netns", "exec", lab.router, "sleep", "60"])
    try:
        # Never the machine's own namespace: wait until the process is in the router's.
        router = os.stat(f"/run/netns/{lab.router}").st_ino
        deadline = time.monotonic() + 10
        while os.stat(f"/proc/{holder.pid}/ns/net").st_ino != router:
            assert time.monotonic() < deadline, "ip netns exec did not enter the namespace"
            time.sleep(0.01)
        run = Drops(lab, "--proto", "udp", "--dport", "6001", "--max-rate", "0", "--duration", "3", "--json",
                    namespace=("--pid", str(holder.pid)))
        send(lab, 6001, SERVER_V4, 20)
        document = run.document()
    finally:
        holder.kill()
        holder.wait()
    assert f"in the namespace of pid {holder.pid}," in run.banner
    assert document["netns"] == f"pid:{holder.pid}"
    [rule] = document["rules"]
    assert rule["decided_by"]["chain"] == "clients" and rule["packets"] == 20


def test_bad_filter_is_refused_before_anything_is_installed(lab):
    result = nftrace("--netns", lab.router, "drops", "--dport", "22")
    assert result.returncode == 2
    assert result.stderr.strip() == "nftrace: --sport/--dport need --proto tcp, udp or sctp"


def test_packets_dropped_at_ingress_count_once_and_are_named(lab):
    load_ruleset(lab.router, """
table netdev border {
    chain ingress_client {
        type filter hook ingress device "r-client" priority 0; policy accept;
        udp dport 6100 counter drop
    }
}
""")
    try:
        run = Drops(lab, "--proto", "udp", "--dport", "6100", "--duration", "4", "--json")
        send(lab, 6100, SERVER_V4, 2000, rate=0)
        code, out, err = run.finish()
        assert code == 0, err
        listing = json.loads(in_netns(lab.router, ["nft", "-j", "list", "table", "netdev", "border"]).stdout)
        [counted] = [expr["counter"]["packets"] for item in listing["nftables"] if "rule" in item
                     for expr in item["rule"]["expr"] if "counter" in expr]
    finally:
        in_netns(lab.router, ["nft", "delete", "table", "netdev", "border"])
    document = json.loads(out)
    assert counted == 2000
    assert document["traced"] + document["not_traced"] == counted
    [rule] = document["rules"]
    assert (rule["decided_by"]["family"], rule["decided_by"]["chain"]) == ("netdev", "ingress_client")
    assert rule["packets"] == document["traced"]


def test_on_a_terminal_a_live_table_is_redrawn_then_the_summary_is_printed(lab):
    import pty
    import select as select_module

    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "nftrace", "--netns", lab.router, "drops", "--max-rate", "0",
                                "--proto", "udp", "--duration", "4"], stdout=slave, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="160"),
                               start_new_session=True)
    os.close(slave)
    try:
        assert process.stderr.readline().startswith(b"watching drops of")
        send(lab, 6000, SERVER_V4, 30)
        output = b""
        while True:
            ready, _, _ = select_module.select([master], [], [], 20)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the other end closed: the process is done
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(20) == 0
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    text = output.decode("utf-8", "replace")
    assert text.count("\x1b[H\x1b[2J") >= 2  # redrawn in place, then cleared for the summary
    assert "PACKETS" in text and "RATE/s" in text and "LAST FLOW" in text
    assert '[' in text and 'udp dport 6000 counter drop comment "no 6000"' in text
    summary = text.rsplit("\x1b[H\x1b[2J", 1)[1]
    assert "30 dropped of" in summary and "dropped by inet fw forward rule handle" in summary
