"""Small, bounded traffic for the lab, the demo, the tests and the benchmarks.

Run as `python -m nftrace.lab.traffic KIND ...` inside a namespace (`ip netns exec NS ...`).
Every sender is bounded in count and time and stops by itself; nothing here needs nc,
ping or socat on the machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time

# linux/in.h, linux/in6.h: path MTU discovery per socket; PROBE sets DF (IPv6: never fragments)
# and ignores the path MTU learned, so a too-big datagram leaves and a router must drop it.
IP_MTU_DISCOVER, IPV6_MTU_DISCOVER, PMTUDISC_PROBE = 10, 23, 3


def _any_address(family) -> str:
    return "::" if family == socket.AF_INET6 else "0.0.0.0"


def tcp_connect(host: str, port: int, timeout: float = 1.0, sport: int = 0, payload: bytes = b"",
                source: str = "") -> str:
    """One TCP connection attempt; says what came back (connected, refused, timeout)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sport or source:
            sock.bind((source or _any_address(family), sport))
        try:
            sock.connect((host, port))
            if payload:
                sock.sendall(payload)
            return "connected"
        except ConnectionRefusedError:
            return "refused"
        except (socket.timeout, TimeoutError):
            return "timeout"
        except OSError as err:
            return f"error: {err.strerror}"


# How far a paced sender may fall behind and catch up (see udp_send).
CATCH_UP_SECONDS = 0.005


def udp_send(host: str, port: int, count: int = 1, sport: int = 0, payload: bytes = b"nftrace", rate: float = 0.0,
             max_seconds: float = 30.0, source: str = "", ttl: int = 0, dont_fragment: bool = False) -> int:
    """Send `count` datagrams, at most for `max_seconds`, with TTL (hop limit) `ttl` if not 0;
    return how many were sent. `dont_fragment`: DF set, whatever path MTU this host learned (a
    router on the way must drop what is too big for it, as a real sender's would)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sent = 0
    deadline = time.monotonic() + max_seconds
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if dont_fragment:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, PMTUDISC_PROBE)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, PMTUDISC_PROBE)
        if ttl:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
            else:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        if sport or source:
            sock.bind((source or _any_address(family), sport))
        gap = 1.0 / rate if rate else 0.0
        due = time.monotonic()
        for _ in range(count):
            try:
                sock.sendto(payload, (host, port))
                sent += 1
            except OSError:
                pass  # ICMP errors from earlier datagrams surface here; keep the count bounded
            now = time.monotonic()
            if gap:
                # The next one is due a gap after this one was: a sleep lasts longer than asked
                # (a sleep per datagram at 10,000/s sent 4,300). Behind by more than a burst,
                # the schedule starts again from now rather than sending the backlog at once.
                due = max(due + gap, now - CATCH_UP_SECONDS)
                if due > now:
                    time.sleep(due - now)
            if now >= deadline:
                break
    return sent


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_echo(host: str, count: int = 1, timeout: float = 1.0) -> int:
    """Send ICMP (v4 or v6) echo requests; return how many replies came back."""
    v6 = ":" in host
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    replies = 0
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, proto) as sock:
        sock.settimeout(timeout)
        ident = os.getpid() & 0xFFFF
        for seq in range(count):
            header = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, seq)
            body = b"nftrace-echo"
            checksum = 0 if v6 else _checksum(header + body)  # the kernel fills in ICMPv6's
            sock.sendto(struct.pack("!BBHHH", 128 if v6 else 8, 0, checksum, ident, seq) + body, (host, 0))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    data = sock.recv(2048)
                except (socket.timeout, TimeoutError):
                    break
                icmp = data if v6 else data[(data[0] & 0x0F) * 4:]
                if icmp and icmp[0] == (129 if v6 else 0):
                    replies += 1
                    break
    return replies


def serve(kind: str, address: str, ports: list[int], seconds: float) -> None:
    """Listen on TCP or UDP ports for at most `seconds`, accepting and closing connections."""
    import selectors

    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    selector = selectors.DefaultSelector()
    sockets = []
    for port in ports:
        sock = socket.socket(family, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        if kind == "tcp":
            sock.listen(64)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        sockets.append(sock)
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            try:
                if kind == "tcp":
                    conn, _ = key.fileobj.accept()
                    conn.close()
                else:
                    key.fileobj.recvfrom(65535)
            except OSError:
                pass
    for sock in sockets:
        sock.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nftrace.lab.traffic", description=__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    tcp = sub.add_parser("tcp", help="one TCP connection attempt")
    tcp.add_argument("host")
    tcp.add_argument("port", type=int)
    tcp.add_argument("--sport", type=int, default=0)
    tcp.add_argument("--timeout", type=float, default=1.0)
    tcp.add_argument("--count", type=int, default=1)
    tcp.add_argument("--source", default="", help="send from this local address")
    tcp.add_argument("--send", default="", help="text to send once connected")
    udp = sub.add_parser("udp", help="a bounded number of UDP datagrams")
    udp.add_argument("host")
    udp.add_argument("port", type=int)
    udp.add_argument("--sport", type=int, default=0)
    udp.add_argument("--count", type=int, default=1)
    udp.add_argument("--rate", type=float, default=0.0)
    udp.add_argument("--max-seconds", type=float, default=30.0)
    udp.add_argument("--source", default="", help="send from this local address")
    udp.add_argument("--ttl", type=int, default=0, help="TTL (IPv6: hop limit) of the datagrams")
    udp.add_argument("--size", type=int, default=0, help="bytes of payload in each datagram")
    udp.add_argument("--dont-fragment", action="store_true",
                     help="set DF and ignore the path MTU this host learned (IP_PMTUDISC_PROBE)")
    icmp = sub.add_parser("icmp", help="ICMP echo requests")
    icmp.add_argument("host")
    icmp.add_argument("--count", type=int, default=1)
    icmp.add_argument("--timeout", type=float, default=1.0)
    for kind in ("listen-tcp", "listen-udp"):
        listen = sub.add_parser(kind, help=f"{kind[7:].upper()} listeners for a bounded time")
        listen.add_argument("address")
        listen.add_argument("ports", type=int, nargs="+")
        listen.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.kind == "tcp":
        for _ in range(args.count):
            print(tcp_connect(args.host, args.port, args.timeout, args.sport, args.send.encode(), args.source), flush=True)
    elif args.kind == "udp":
        payload = b"x" * args.size if args.size else b"nftrace"
        print(udp_send(args.host, args.port, args.count, args.sport, payload, rate=args.rate,
                       max_seconds=args.max_seconds, source=args.source, ttl=args.ttl, dont_fragment=args.dont_fragment))
    elif args.kind == "icmp":
        print(icmp_echo(args.host, args.count, args.timeout))
    else:
        serve(args.kind[7:], args.address, args.ports, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
