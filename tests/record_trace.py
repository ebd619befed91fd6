"""Record real trace datagrams for the unit tests: `python tests/record_trace.py OUT.json`.

Builds the client/router/server lab in namespaces, loads the router ruleset of
tests/test_live_nftables.py plus nftrace's own trace table, sends a few flows, and writes
the raw netlink datagrams (hex) with the ruleset listing they refer to. The unit tests then
decode and rebuild paths from these bytes exactly as the live tool does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from nftrace.lab.topology import ROUTER_CLIENT_V4, SERVER_V4, Topology, in_netns  # noqa: E402
from test_live_nftables import ROUTER_RULESET  # noqa: E402

FLOWS = [
    ("tcp", ROUTER_CLIENT_V4, "22"),  # jump, accept in called chain
    ("tcp", ROUTER_CLIENT_V4, "9090"),  # vmap drop
    ("tcp", ROUTER_CLIENT_V4, "8080"),  # vmap jump, accept
    ("tcp", ROUTER_CLIENT_V4, "2323"),  # goto, reject
    ("udp", ROUTER_CLIENT_V4, "5353"),  # jump, fall off the end, policy drop
    ("tcp", SERVER_V4, "443"),  # forward accept
    ("tcp", SERVER_V4, "8443"),  # forward policy drop
]

RECORDER = r"""
import json, sys, time
from nftrace.kernel.monitor import TraceMonitor
from nftrace.kernel.nft import NftContext
from nftrace.kernel.tracetable import TraceTable
from nftrace.flow import parse_flow
monitor = TraceMonitor()
nft = NftContext()
table = TraceTable(nft, parse_flow("10.77.1.2", "0.0.0.0/0"), max_rate=0)
table.install()
listing = nft.list_ruleset()
print("ready", flush=True)
datagrams = []
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    if monitor.wait(0.1):
        datagrams.extend(d.hex() for d in monitor.read_raw() if d is not None)
table.remove()
json.dump({"listing": listing, "datagrams": datagrams}, sys.stdout)
"""


def main(out: str) -> None:
    topo = Topology(f"rec{int(time.time()) % 100000}")
    topo.up()
    try:
        in_netns(topo.router, ["nft", "-f", "-"], input=ROUTER_RULESET)
        recorder = subprocess.Popen(["ip", "netns", "exec", topo.router, sys.executable, "-c", RECORDER, "6"],
                                    stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(REPO)})
        assert recorder.stdout.readline().strip() == "ready"
        for proto, host, port in FLOWS:
            extra = ["--timeout", "0.5"] if proto == "tcp" else []
            in_netns(topo.client, [sys.executable, "-m", "nftrace.lab.traffic", proto, host, port, *extra])
        data = json.loads(recorder.stdout.read())
        recorder.wait()
        data["flows"] = FLOWS
        Path(out).write_text(json.dumps(data, indent=1) + "\n")
    finally:
        topo.down()


if __name__ == "__main__":
    main(sys.argv[1])
