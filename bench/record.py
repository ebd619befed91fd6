"""Record real NFT_MSG_TRACE datagrams, for the decoder tests and the decode benchmark.

    sudo .venv/bin/python bench/record.py tests/data/trace_datagrams.hex

builds a client — router — server lab, loads a ruleset that exercises what the kernel puts
in trace events (jumps, goto, verdict maps, policies, reject, marks, conntrack, DNAT,
IPv4 and IPv6, forwarded, input and output packets), traces everything in the
router and writes each datagram received as one line of hex. Every namespace it makes is
deleted when it ends.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# Every python this starts (traffic in the namespaces) runs this checkout's nftrace.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from bench.probes import inside_netns  # noqa: E402
from nftrace.kernel.netlink import decode_datagram  # noqa: E402
from nftrace.trace.events import TRACE_MESSAGE_TYPE  # noqa: E402
from nftrace.kernel.monitor import TraceMonitor  # noqa: E402
from nftrace.lab.topology import (  # noqa: E402
    ROUTER_CLIENT_V4, ROUTER_CLIENT_V6, SERVER_V4, Topology, in_netns, python_in_netns,
)

RECORD_RULESET = """
table inet fw {
    map services { type inet_service : verdict; elements = { 8080 : jump web, 9090 : drop } }
    chain web { tcp dport 8080 counter accept; }
    chain ssh_zone { ip saddr 10.77.1.2 accept; return; }
    chain udp_zone { udp dport 5000 accept; }
    chain reject_zone { tcp dport 2323 reject with tcp reset; }
    chain mangle { type filter hook prerouting priority mangle; policy accept; iifname "r-client" meta mark set 0x2a; }
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        tcp dport 22 jump ssh_zone
        tcp dport vmap @services
        tcp dport 2323 goto reject_zone
        udp dport 5353 jump udp_zone
        ip6 saddr fd77:1::2 tcp dport 80 drop
        icmp type echo-request accept
        icmpv6 type { echo-request, nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        tcp dport 443 accept
    }
    chain output { type filter hook output priority filter; policy accept; tcp dport 25 drop; }
}
table ip nat {
    chain pre { type nat hook prerouting priority dstnat; tcp dport 8443 dnat to 10.77.2.2:443; }
}
table inet trace_all {
    chain pre { type filter hook prerouting priority -350; meta nftrace set 1; }
    chain out { type filter hook output priority -350; meta nftrace set 1; }
}
"""


def _traffic(topo: Topology) -> None:
    """One packet (or connection) of each kind the ruleset treats differently."""
    client = topo.client
    server = _background(topo.server, ["listen-tcp", SERVER_V4, "443", "--seconds", "6"])
    try:
        for port in (22, 8080, 9090, 2323):
            python_in_netns(client, ["nftrace.lab.traffic", "tcp", ROUTER_CLIENT_V4, str(port), "--timeout", "0.5"])
        python_in_netns(client, ["nftrace.lab.traffic", "udp", ROUTER_CLIENT_V4, "5353"])
        python_in_netns(client, ["nftrace.lab.traffic", "tcp", ROUTER_CLIENT_V6, "80", "--timeout", "0.5"])
        python_in_netns(client, ["nftrace.lab.traffic", "icmp", ROUTER_CLIENT_V4])
        python_in_netns(client, ["nftrace.lab.traffic", "icmp", ROUTER_CLIENT_V6])
        python_in_netns(client, ["nftrace.lab.traffic", "tcp", SERVER_V4, "443", "--timeout", "1"])
        python_in_netns(client, ["nftrace.lab.traffic", "tcp", ROUTER_CLIENT_V4, "8443", "--timeout", "1"])
        python_in_netns(topo.router, ["nftrace.lab.traffic", "tcp", SERVER_V4, "25", "--timeout", "0.5"])
    finally:
        server.terminate()
        server.wait()


def _background(ns: str, args: list):
    import subprocess

    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "nftrace.lab.traffic", *args],
                            stdout=subprocess.DEVNULL)


def record(prefix: str) -> list[bytes]:
    """Trace datagrams of one pass of `_traffic`, in the order they arrived."""
    topo = Topology(prefix)
    topo.up()
    try:
        in_netns(topo.router, ["nft", "-f", "-"], input=RECORD_RULESET)
        with inside_netns(topo.router):
            monitor = TraceMonitor(256 << 20)
        with monitor:
            time.sleep(0.2)
            _traffic(topo)
            time.sleep(0.5)
            return [datagram for datagram in monitor.read_raw() if datagram is not None
                    and any(kind == TRACE_MESSAGE_TYPE for kind, _ in decode_datagram(datagram))]
    finally:
        topo.down()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="file to write, one datagram in hex per line")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("record.py: run as root (it builds network namespaces)", file=sys.stderr)
        return 2
    datagrams = record(f"nftrec{os.getpid()}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(datagram.hex() + "\n" for datagram in datagrams))
    print(f"{len(datagrams)} trace datagrams written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
