"""A real client for the differential tests: one packet of a flow, sent the ordinary way.

`python live_sender.py SRC DST PROTO [DPORT [SPORT]]`, run inside the sending namespace. It is kept
apart from nftrace's own packet crafting on purpose: the live side of a comparison must not
share code with the side under test. Bounded: one packet (TCP: one connection attempt, at
most one second).
"""

import socket
import struct
import sys


def main(src: str, dst: str, proto: str, dport: int = 0, sport: int = 0) -> None:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    if proto == "tcp":
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((src, sport))
            sock.settimeout(1.0)
            try:
                sock.connect((dst, dport))
            except OSError:
                pass
    elif proto == "udp":
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((src, sport))
            try:
                sock.sendto(b"live", (dst, dport))
            except OSError:
                pass
    elif proto in ("icmp", "icmpv6"):
        v6 = family == socket.AF_INET6
        with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP) as sock:
            sock.bind((src, 0))
            body = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 4242, 1) + b"live"
            if not v6:
                words = body + (b"\0" if len(body) % 2 else b"")
                total = sum(struct.unpack(f"!{len(words) // 2}H", words))
                while total >> 16:
                    total = (total & 0xFFFF) + (total >> 16)
                body = body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:]
            try:
                sock.sendto(body, (dst, 0))
            except OSError:
                pass
    else:
        raise SystemExit(f"live_sender: no sender for {proto}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(arg) for arg in sys.argv[4:6]))
