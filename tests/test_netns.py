"""Naming the namespaces of a trace: --netns, --pid, --container, --all-netns, and the either-end
match that finds a packet's part after NAT. Reading only: nothing here changes a namespace."""

from __future__ import annotations

import os

import pytest

from nftrace.errors import InputError
from nftrace.flow import parse_flow
from nftrace.kernel.netns import (NamespaceRequest, by_pid, current, named_namespaces, parse_ctr_tasks,
                                  parse_inspect_pid, parse_pid, resolve)
from nftrace.trace.report import netns_words


def test_a_container_runtime_says_pid_zero_for_a_stopped_container():
    assert parse_inspect_pid("4242\n") == 4242
    assert parse_inspect_pid("0\n") is None
    assert parse_inspect_pid("") is None


def test_containerd_tasks_are_found_by_name_or_unique_id_prefix():
    listing = "TASK        PID     STATUS\nweb         300     RUNNING\n3f1a2b4c    400     RUNNING\n3f1a9999    500     STOPPED\n"
    assert parse_ctr_tasks(listing, "web") == 300
    assert parse_ctr_tasks(listing, "3f1a") == 400  # the stopped one does not count
    assert parse_ctr_tasks(listing, "nothing") is None


@pytest.mark.parametrize("text", ["0", "-1", "abc", "12 34", ""])
def test_a_pid_is_a_positive_number(text):
    with pytest.raises(InputError, match="--pid: .* is not a process id"):
        parse_pid(text)


def test_all_netns_leaves_out_nftraces_own_dry_run_sandboxes(tmp_path):
    for name in ("router", "nftrace-sbx-123-abcdef", "nftrace-sbx-123-abcdef-h", "server"):
        (tmp_path / name).touch()
    assert named_namespaces(str(tmp_path)) == ["router", "server"]
    assert named_namespaces(str(tmp_path / "missing")) == []


def test_the_same_namespace_named_twice_is_traced_once_by_its_name():
    targets = resolve(pids=[str(os.getpid())], all_netns=False)
    try:
        targets.add(current())
        [target] = targets.targets
        assert target.label == f"pid:{os.getpid()}" and "traced once" in targets.notes[0]
    finally:
        targets.close()


def test_no_namespace_asked_is_the_one_nftrace_runs_in():
    targets = NamespaceRequest().resolve()
    try:
        [target] = targets.targets
        assert (target.label, target.kind) == (None, "current") and target.alive()
    finally:
        targets.close()


def test_a_process_that_is_gone_no_longer_reaches_its_namespace():
    process = __import__("subprocess").Popen(["sleep", "30"])
    target = by_pid(str(process.pid))
    try:
        assert target.alive()
        process.kill()
        process.wait()
        assert not target.alive()
    finally:
        target.close()


def test_a_request_says_whether_it_names_one_namespace_or_several():
    assert NamespaceRequest(netns=("r",)).one_name == "r"
    assert NamespaceRequest(netns=("r", "s")).several and NamespaceRequest(netns=("r", "s")).one_name is None
    assert NamespaceRequest(all_netns=True).several
    assert NamespaceRequest(pids=("1",)).one_name is None


def test_answers_name_namespaces_as_the_user_did():
    assert netns_words("router") == "netns router"
    assert netns_words("pid:42") == "the namespace of pid 42"
    assert netns_words("container:web") == "container web"
    assert netns_words(None) == "this namespace"


FLOW = parse_flow("10.0.0.5", "192.0.2.1", "tcp", None, 8080)


def headers(src, dst, sport=40000, dport=8080):
    import ipaddress

    return ipaddress.ip_address(src), ipaddress.ip_address(dst), 6, sport, dport


def test_a_packet_dnatted_on_its_way_keeps_its_source_end():
    assert not FLOW.matches(*headers("10.0.0.5", "172.17.0.2", dport=80))
    assert FLOW.matches_an_end(*headers("10.0.0.5", "172.17.0.2", dport=80))


def test_a_packet_snatted_on_its_way_keeps_its_destination_end():
    assert FLOW.matches_an_end(*headers("198.51.100.7", "192.0.2.1", sport=61000))


def test_a_packet_with_neither_end_of_the_flow_is_not_one():
    assert not FLOW.matches_an_end(*headers("198.51.100.7", "172.17.0.2", dport=80))
    assert not FLOW.matches_an_end(*headers("10.0.0.5", "192.0.2.1")[:2], 17, 40000, 8080)  # another protocol


def test_an_end_the_flow_says_nothing_about_matches_nothing_by_itself():
    to_port = parse_flow("0.0.0.0/0", "192.0.2.1", "tcp", None, 8080)
    assert to_port.constrained_ends() == ("dst",)
    assert not to_port.matches_an_end(*headers("10.0.0.5", "172.17.0.2", dport=80))
