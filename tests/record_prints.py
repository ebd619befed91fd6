"""Record how this machine's nftables and iptables print the rulesets of rules/ and tests/data/
(the scenarios, and those that `nftrace test` is tested with), for the unit
tests that read each supported release's prints (tests/test_version_prints.py):
`sudo .venv/bin/python tests/record_prints.py [OUT_DIR]`, once on Debian 12 and once on
Debian 13 (scripts/clean-root.sh runs it in a clean root).

Each ruleset is loaded on the router of a lab of namespaces, as `nftrace lab` does,
and what nftrace parses is written to OUT_DIR (default tests/data/prints/nft-VERSION):
SCENARIO.listing (`nft -a -s -t list ruleset`, what the ruleset snapshot reads), SCENARIO.json
(`nft -j -a list ruleset`, what the near-miss rulebook reads) and, for iptables scenarios,
SCENARIO.save (iptables-nft-save or iptables-legacy-save, IPv4 then IPv6). VERSIONS names the
versions of nft, iptables and Python.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nftrace.lab.lab import list_scenarios, load_scenario  # noqa: E402
from nftrace.lab.topology import Topology, in_netns, run  # noqa: E402

SAVE_COMMANDS = {"iptables-nft": ("iptables-nft-save", "ip6tables-nft-save"),
                 "iptables-legacy": ("iptables-legacy-save", "ip6tables-legacy-save")}


def without_dates(save: str) -> str:
    """iptables-save's header and footer lines carry the time of the save."""
    return "".join(line for line in save.splitlines(keepends=True) if not line.startswith("# "))


def main() -> int:
    version = re.search(r"v(\S+)", run(["nft", "--version"]).stdout).group(1)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "tests" / "data" / "prints" / f"nft-{version}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "VERSIONS").write_text(f"{run(['nft', '--version']).stdout.strip()}\n"
                                  f"{run(['iptables', '--version']).stdout.strip()}\n"
                                  f"Python {platform.python_version()}\n")
    topology = Topology(f"nftprint{os.getpid()}")
    topology.up()
    try:
        for scenario in list_scenarios() + list_scenarios(REPO / "tests" / "data"):
            load_scenario(scenario, topology.router)
            router = topology.router
            (out / f"{scenario.name}.listing").write_text(
                in_netns(router, ["nft", "-a", "-s", "-t", "list", "ruleset"]).stdout)
            (out / f"{scenario.name}.json").write_text(in_netns(router, ["nft", "-j", "-a", "list", "ruleset"]).stdout)
            if scenario.kind in SAVE_COMMANDS:
                saves = [without_dates(in_netns(router, [command]).stdout) for command in SAVE_COMMANDS[scenario.kind]]
                (out / f"{scenario.name}.save").write_text("".join(saves))
            print(f"{scenario.name}: recorded", file=sys.stderr)
    finally:
        topology.down()
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
