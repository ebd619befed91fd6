"""Names vulture (scripts/lint.sh) cannot see being used. Each is used by a framework or a
library by name, never by nftrace's own code: say which here. Dead code is deleted, not listed.

vulture only parses this file; it is never run.
"""
# ruff: noqa: F821, B018
# typer registers commands by decorator; pytest finds hooks, fixtures and markers by name.
cleanup, lab_up, lab_down, lab_status, lab_load, test_command  # nftrace/cli.py
pytest_runtest_setup, nftrace_cli, pytestmark  # tests/
# pyroute2 looks nested attribute classes up by the type names of nla_map.
cfg_cmd, cfg_mode, packet_hdr  # nftrace/iptables/nflog.py
# python-iptables: attributes whose setters build the rule and the table's commit mode.
_.autocommit, _.in_interface, _.out_interface, _.limit_burst  # nftrace/iptables/iptctrace.py
# python-iptables calls its xtables._option_lookup by name; nftrace replaces it for libxtables 1.8.11.
_._option_lookup  # nftrace/iptables/iptctrace.py
# Fields of data read from outside, kept whole: an expectation file's, a /proc row's, a result's.
description  # nftrace/lab/expectations.py
port_id, wall_seconds  # bench/probes.py
# Near misses (branch nearmiss): the interface rulebook.py implements, and a verdict's reject flag.
BookRule, reject  # nftrace/trace/nearmiss.py
