"""Legacy iptables TRACE lines, read through nfnetlink_log, and the nf_log binding they need.

x_tables' TRACE target does not send trace events: `ipt_do_table` hands a line
`TRACE: table:chain:type:rulenum ` and the packet to the logger bound for the packet's protocol
family in its namespace (`net.netfilter.nf_log.2` for IPv4, `.10` for IPv6). nftrace binds
nfnetlink_log there for the run (NFULNL_CFG_CMD_PF_BIND) and listens on NFLOG group 0, the
group a LOG-type message goes to, so the lines arrive as NFULNL_MSG_PACKET messages with the
hook in their packet header and the packet itself as payload. The kernel log is never read.

Only what names no logger type follows that binding: x_tables' TRACE lines, and conntrack's
own messages (invalid packets, where nf_conntrack_log_invalid is set; a helper's drops). LOG
rules and nft `log` statements name theirs (nf_log_packet with a loginfo) and go on writing to
the kernel log while nfnetlink_log is bound (tests/test_live_iptables.py checks it).

The binding outlives the socket, so the listener writes the old one back when it closes, and
first records it in a state file under /run/nftrace: a run killed with SIGKILL leaves that
file behind, and `nftrace cleanup` (or the next run in the namespace) puts the old logger back.
Runs that share a namespace (a `why` beside a `drops`) record the same old logger, and the last
of them to leave puts it back.
Everything else about the wire is declared once, as pyroute2 message classes (made when
first used).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import select
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

from ..errors import EnvironmentProblem, KernelError
from ..trace.events import PacketHeaders, parse_packet_headers
from ..kernel.monitor import EventsLost, open_netfilter_socket, read_datagrams, socket_drops
from ..kernel.netlink import NFNL_SUBSYS_ULOG, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, decode_datagram, message_type
from ..kernel.rcvbuf import MIN_RCVBUF
from ..signals import SignalsHeld, undo_after
from ..kernel.system import NETNS_RUN_DIR, STATE_DIR, current_netns, netns_cookie, pid_alive, process_start

NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
PACKET_MESSAGE_TYPE = message_type(NFNL_SUBSYS_ULOG, NFULNL_MSG_PACKET)
CONFIG_MESSAGE_TYPE = message_type(NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG)

NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_CFG_CMD_PF_BIND = 3
NFULNL_COPY_PACKET = 2
# The group a LOG-type nf_log message (TRACE's) goes to when nfnetlink_log is the logger.
TRACE_GROUP = 0
# Enough of the packet for an IPv4 header with options or an IPv6 header, plus 20 bytes of L4.
COPY_RANGE = 128
# As nft monitor's: TRACE lines come one per rule a packet meets, at most --max-rate packets a second.
NFLOG_RCVBUF = MIN_RCVBUF

PROTOCOL_FAMILIES = {"ip": socket.AF_INET, "ip6": socket.AF_INET6}
FAMILY_NAMES = {number: name for name, number in PROTOCOL_FAMILIES.items()}
# NF_INET_* hook numbers, as NFULA_PACKET_HDR carries them.
HOOK_NAMES = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting"}

NF_LOG_SYSCTL = "/proc/sys/net/netfilter/nf_log/{pf}"
NF_LOG_ALL_NETNS = "/proc/sys/net/netfilter/nf_log_all_netns"
CONNTRACK_LOG_INVALID = "/proc/sys/net/netfilter/nf_conntrack_log_invalid"
NFNETLINK_LOG = "nfnetlink_log"

_PREFIX_RE = re.compile(r"^TRACE: ([^:]+):([^:]+):(rule|return|policy):(\d+)\s*$")


class NflogMessages(NamedTuple):
    config: type  # NFULNL_MSG_CONFIG
    packet: type  # NFULNL_MSG_PACKET


@functools.lru_cache(maxsize=None)
def pyroute2_message_classes() -> NflogMessages:
    """NFULNL_MSG_CONFIG and NFULNL_MSG_PACKET as pyroute2 classes, made when legacy TRACE is first
    listened for: importing pyroute2 would cost a run without legacy tables a tenth of a second
    at its start (kernel/netlink.py)."""
    from pyroute2.netlink import nla
    from pyroute2.netlink.nfnetlink import nfgen_msg

    class nflog_config_msg(nfgen_msg):
        """NFULNL_MSG_CONFIG: res_id is the group, nfgen_family the protocol family for PF_BIND."""

        prefix = "NFULA_CFG_"
        nla_map = (
            ("NFULA_CFG_UNSPEC", "none"),
            ("NFULA_CFG_CMD", "cfg_cmd"),
            ("NFULA_CFG_MODE", "cfg_mode"),
            ("NFULA_CFG_NLBUFSIZ", "be32"),
            ("NFULA_CFG_TIMEOUT", "be32"),
            ("NFULA_CFG_QTHRESH", "be32"),
            ("NFULA_CFG_FLAGS", "be16"),
        )

        class cfg_cmd(nla):
            fields = (("command", "B"),)

        class cfg_mode(nla):
            fields = (("copy_range", ">I"), ("copy_mode", "B"), ("pad", "B"))

    class nflog_packet_msg(nfgen_msg):
        """NFULNL_MSG_PACKET, the NFULA_* attributes of include/uapi/linux/netfilter/nfnetlink_log.h."""

        prefix = "NFULA_"
        nla_map = (
            ("NFULA_UNSPEC", "none"),
            ("NFULA_PACKET_HDR", "packet_hdr"),
            ("NFULA_MARK", "be32"),
            ("NFULA_TIMESTAMP", "timestamp"),
            ("NFULA_IFINDEX_INDEV", "be32"),
            ("NFULA_IFINDEX_OUTDEV", "be32"),
            ("NFULA_IFINDEX_PHYSINDEV", "be32"),
            ("NFULA_IFINDEX_PHYSOUTDEV", "be32"),
            ("NFULA_HWADDR", "cdata"),
            ("NFULA_PAYLOAD", "cdata"),
            ("NFULA_PREFIX", "asciiz"),
            ("NFULA_UID", "be32"),
            ("NFULA_SEQ", "be32"),
            ("NFULA_SEQ_GLOBAL", "be32"),
            ("NFULA_GID", "be32"),
            ("NFULA_HWTYPE", "be16"),
            ("NFULA_HWHEADER", "cdata"),
            ("NFULA_HWLEN", "be16"),
            ("NFULA_CT", "cdata"),
            ("NFULA_CT_INFO", "be32"),
            ("NFULA_VLAN", "cdata"),
            ("NFULA_L2HDR", "cdata"),
        )

        class packet_hdr(nla):
            fields = (("hw_protocol", ">H"), ("hook", "B"), ("pad", "B"))

        class timestamp(nla):
            """struct nfulnl_msg_packet_timestamp: CLOCK_REALTIME."""

            fields = (("sec", ">Q"), ("usec", ">Q"))

    return NflogMessages(nflog_config_msg, nflog_packet_msg)


@dataclass(frozen=True)
class LegacyTraceEvent:
    """One legacy TRACE line: a rule of an x_tables chain matched, a user chain returned, or a
    built-in chain's policy applied. `rule_number` is the kernel's: the rule's position in its
    chain, counted from 1; for a policy or a return, one past the chain's last rule."""

    family: str  # ip | ip6
    table: str
    chain: str
    type: str  # rule | return | policy
    rule_number: int
    hook: Optional[str]
    iif: Optional[int] = None
    oif: Optional[int] = None
    mark: Optional[int] = None
    packet: Optional[PacketHeaders] = None
    # When the packet arrived (CLOCK_REALTIME; sent at prerouting, input and forward only):
    # the line was made no earlier.
    timestamp: Optional[float] = None
    # Set when the line is read (backends.LegacyTracing): the first and last observation of
    # the legacy tables whose rules may have made it, and when it was read (CLOCK_REALTIME).
    seen_between: Optional[tuple[int, int]] = None
    read_at: Optional[float] = None


def parse_trace_prefix(prefix: Optional[str]) -> Optional[tuple[str, str, str, int]]:
    """`TRACE: filter:CLIENTS:rule:2 ` → ("filter", "CLIENTS", "rule", 2); None for any other
    nf_log line (a LOG rule's, while nfnetlink_log is the logger)."""
    match = _PREFIX_RE.match(prefix or "")
    if match is None:
        return None
    table, chain, kind, number = match.groups()
    return table, chain, kind, int(number)


def packet_from_payload(payload: Optional[bytes]) -> Optional[PacketHeaders]:
    """The payload starts at the network header: split it where the transport header starts."""
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4:
        header_length = (payload[0] & 0x0F) * 4
    elif version == 6:
        header_length = 40
    else:
        return None
    return parse_packet_headers(None, payload[:header_length], payload[header_length:header_length + 20])


def decode_nflog_message(raw: bytes) -> Optional[LegacyTraceEvent]:
    """One NFULNL_MSG_PACKET → a LegacyTraceEvent, or None when it is not a TRACE line."""
    msg = pyroute2_message_classes().packet(raw)
    msg.decode()
    get = msg.get_attr
    parsed = parse_trace_prefix(get("NFULA_PREFIX"))
    if parsed is None:
        return None
    table, chain, kind, number = parsed
    header = get("NFULA_PACKET_HDR")
    hook = HOOK_NAMES.get(header["hook"]) if header is not None else None
    family = FAMILY_NAMES.get(msg["nfgen_family"], str(msg["nfgen_family"]))
    stamp = get("NFULA_TIMESTAMP")
    return LegacyTraceEvent(family, table, chain, kind, number, hook, get("NFULA_IFINDEX_INDEV"),
                            get("NFULA_IFINDEX_OUTDEV"), get("NFULA_MARK"), packet_from_payload(get("NFULA_PAYLOAD")),
                            stamp["sec"] + stamp["usec"] / 1e6 if stamp is not None else None)


def decode_nflog_datagram(datagram: bytes) -> Iterator[LegacyTraceEvent]:
    for msg_type, raw in decode_datagram(datagram):
        if msg_type == PACKET_MESSAGE_TYPE:
            event = decode_nflog_message(raw)
            if event is not None:
                yield event


# -- the nf_log binding ---------------------------------------------------------------------


def read_logger(family: str) -> str:
    """The logger bound for a protocol family in this namespace: a name, or NONE."""
    try:
        with open(NF_LOG_SYSCTL.format(pf=PROTOCOL_FAMILIES[family])) as sysctl:
            return sysctl.read().strip()
    except OSError as err:
        raise EnvironmentProblem(f"cannot read the nf_log logger of {family} ({err.strerror}): legacy TRACE lines "
                                 "need nf_log and nfnetlink_log in the kernel") from None


def in_initial_netns() -> bool:
    """Whether this is the machine's own namespace, where a LOG rule's lines reach the kernel log
    (nf_log_all_netns, which lets other namespaces log too, exists only there)."""
    return os.path.exists(NF_LOG_ALL_NETNS)


def conntrack_log_invalid() -> int:
    """nf_conntrack_log_invalid of this namespace: 0 (off, or no conntrack), a protocol number,
    or 255 (all): which invalid packets conntrack logs to the bound logger."""
    try:
        with open(CONNTRACK_LOG_INVALID) as sysctl:
            return int(sysctl.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def write_logger(family: str, name: str) -> None:
    try:
        with open(NF_LOG_SYSCTL.format(pf=PROTOCOL_FAMILIES[family]), "w") as sysctl:
            sysctl.write(name)
    except OSError as err:
        raise KernelError(f"cannot restore the nf_log logger of {family} to {name}: {err.strerror}") from None


def netns_inode_in_use(inode: int) -> bool:
    """Whether some named namespace or some process still has the namespace with this inode."""
    for holder in list(Path(NETNS_RUN_DIR).glob("*")) + list(Path("/proc").glob("[0-9]*/ns/net")):
        try:
            if holder.stat().st_ino == inode:
                return True
        except OSError:
            continue
    return False


@dataclass
class SavedLoggers:
    """The loggers a run found bound before it bound nfnetlink_log, as written to its state file."""

    pid: int
    netns: int  # inode
    loggers: dict  # family → previous logger name
    cookie: Optional[int] = None  # the namespace's cookie, where the kernel has them
    started: Optional[int] = None  # the run's process_start: its pid, once reused, is another process's

    def alive(self) -> bool:
        return pid_alive(self.pid, self.started)

    @property
    def path(self) -> Path:
        return STATE_DIR / f"nflog-{self.netns}-{self.pid}.json"

    def write(self) -> None:
        STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"pid": self.pid, "netns": self.netns, "cookie": self.cookie,
                                         "started": self.started, "loggers": self.loggers}))
        temporary.replace(self.path)

    def restore(self) -> list[str]:
        """Put each old logger back where nfnetlink_log is still bound; return what was restored.

        A binding someone else changed since is theirs: it stays. Where another live run of
        this namespace (a `why` beside a `drops`) still has nfnetlink_log bound, it stays too:
        the last run to leave puts the old logger back (this file goes first, so that two runs
        leaving at once both restore rather than neither).
        """
        restored = []
        with SignalsHeld():
            self.forget()
            held = {family for other in live_bindings(self.netns, self.cookie) for family in other.loggers}
            for family, name in self.loggers.items():
                if family not in held and name != NFNETLINK_LOG and read_logger(family) == NFNETLINK_LOG:
                    write_logger(family, name)
                    restored.append(f"nf_log {family} → {name}")
        return restored

    def of_namespace(self, netns: int, cookie: Optional[int]) -> bool:
        """Whether this state is of that namespace (an inode comes back with a later namespace:
        the cookie tells them apart, where the kernel has cookies)."""
        return self.netns == netns and (self.cookie is None or cookie is None or self.cookie == cookie)

    def forget(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        try:
            STATE_DIR.rmdir()
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.ENOENT, errno.EEXIST):
                raise

    @classmethod
    def load(cls, path: Path) -> Optional["SavedLoggers"]:
        try:
            data = json.loads(path.read_text())
            cookie, started = data.get("cookie"), data.get("started")
            return cls(int(data["pid"]), int(data["netns"]), dict(data["loggers"]), None if cookie is None else int(cookie),
                       None if started is None else int(started))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def saved_loggers() -> list[SavedLoggers]:
    """The state files of every run that bound nfnetlink_log, live or killed, in any namespace."""
    if not STATE_DIR.is_dir():
        return []
    found = (SavedLoggers.load(path) for path in sorted(STATE_DIR.glob("nflog-*.json")))
    return [saved for saved in found if saved is not None]


def live_bindings(netns: int, cookie: Optional[int]) -> list[SavedLoggers]:
    """The bindings of other runs of that namespace still running."""
    return [saved for saved in saved_loggers()
            if saved.pid != os.getpid() and saved.of_namespace(netns, cookie) and saved.alive()]


def restore_leftover_loggers() -> list[str]:
    """Loggers that killed runs in this namespace left bound to nfnetlink_log, put back.

    State files of killed runs whose namespace is gone (its inode may come back with another
    namespace: the cookie tells them apart) are removed on the way.
    """
    netns, cookie = current_netns(), netns_cookie()
    restored = []
    for saved in saved_loggers():
        if saved.alive():
            continue
        if saved.of_namespace(netns, cookie):
            restored.extend(saved.restore())
        elif saved.netns == netns or not netns_inode_in_use(saved.netns):
            saved.forget()
    return restored


# -- the listener ---------------------------------------------------------------------------

NflogItem = Union[LegacyTraceEvent, EventsLost]


class ConfigurationRefused(KernelError):
    """nfnetlink_log said no to a configuration request; `errno` says why."""

    def __init__(self, code: int):
        super().__init__(f"nfnetlink_log refused a configuration request: {os.strerror(code)}")
        self.errno = code


class NflogListener:
    """NFLOG group 0 in this namespace, with nfnetlink_log as the logger of `families`.

    Open it before anything sets the trace bit, close it after: `close()` ends the group
    binding (with the socket) and writes the old loggers back.
    """

    def __init__(self, families: tuple[str, ...], rcvbuf: int = NFLOG_RCVBUF, hold_group: bool = True):
        """`hold_group=False`: bind the loggers only, for lines nobody reads (SilencedTraceLines)."""
        self.families = families
        self.hold_group = hold_group
        self.overruns = 0
        self._saved: Optional[SavedLoggers] = None
        self._seq = 0
        self._buffer = bytearray(1 << 20)
        self.sock = open_netfilter_socket(rcvbuf)
        self._inode = os.fstat(self.sock.fileno()).st_ino
        try:
            self._bind_group()
            self._bind_loggers()
        except BaseException as err:
            undo_after(err, self.close)
            raise

    def _bind_group(self) -> None:
        """Hold NFLOG group 0, where the lines go. Without `hold_group`, only make sure that no
        other program holds it: the lines then go nowhere, or to another nftrace run, which skips
        the lines of packets not its own."""
        try:
            self._configure(0, [("NFULA_CFG_CMD", {"command": NFULNL_CFG_CMD_BIND})])
        except ConfigurationRefused as err:
            if err.errno not in (errno.EBUSY, errno.EPERM):
                raise
            if not self.hold_group and live_bindings(current_netns(), netns_cookie()):
                return
            raise EnvironmentProblem(
                "NFLOG group 0 of this namespace is taken by another program (another nftrace run, ulogd, ...): "
                "legacy iptables TRACE lines would go to it; stop it and try again"
            ) from None
        if not self.hold_group:
            self._configure(0, [("NFULA_CFG_CMD", {"command": NFULNL_CFG_CMD_UNBIND})])
            return
        self._configure(0, [("NFULA_CFG_MODE", {"copy_range": COPY_RANGE, "copy_mode": NFULNL_COPY_PACKET, "pad": 0}),
                            # One message per line, sent at once: paths close as soon as the packet is done.
                            ("NFULA_CFG_QTHRESH", 1)])

    def _bind_loggers(self) -> None:
        """Record the loggers bound now, then bind nfnetlink_log. Where another live run bound it
        already, the logger recorded is the one that run found: whichever leaves last puts it back."""
        netns, cookie = current_netns(), netns_cookie()
        previous = {family: read_logger(family) for family in self.families}
        for other in live_bindings(netns, cookie):
            for family, name in other.loggers.items():
                if previous.get(family) == NFNETLINK_LOG and name != NFNETLINK_LOG:
                    previous[family] = name
        self._saved = SavedLoggers(os.getpid(), netns, previous, cookie, process_start(os.getpid()))
        self._saved.write()
        for family in self.families:
            self._configure(PROTOCOL_FAMILIES[family], [("NFULA_CFG_CMD", {"command": NFULNL_CFG_CMD_PF_BIND})])

    def _configure(self, family: int, attrs: list) -> None:
        """Send one NFULNL_MSG_CONFIG and wait for its acknowledgement.

        Messages of LOG rules may already arrive on the socket: they are skipped here.
        """
        self._seq += 1
        msg = pyroute2_message_classes().config()
        msg["header"]["type"] = CONFIG_MESSAGE_TYPE
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
        msg["header"]["sequence_number"] = self._seq
        msg["nfgen_family"] = family
        msg["res_id"] = TRACE_GROUP
        msg["attrs"] = attrs
        msg.encode()
        self.sock.send(msg.data)
        while True:
            if not select.select([self.sock], [], [], 5.0)[0]:
                raise KernelError("nfnetlink_log did not answer a configuration request")
            # One at a time: what comes after the reply stays queued for `read`.
            for datagram in read_datagrams(self.sock, self._buffer, "nfnetlink_log replies", limit=1):
                for msg_type, raw in decode_datagram(datagram or b""):
                    if msg_type == NLMSG_ERROR and struct.unpack_from("=I", raw, 8)[0] == self._seq:
                        code = -struct.unpack_from("=i", raw, 16)[0]
                        if code:
                            raise ConfigurationRefused(code)
                        return

    def fileno(self) -> int:
        return self.sock.fileno()

    def previous_loggers(self) -> dict:
        """family → the logger bound before this listener bound nfnetlink_log."""
        return dict(self._saved.loggers) if self._saved is not None else {}

    def read(self) -> Iterator[NflogItem]:
        """Every TRACE line queued now; an overflow of the socket yields EventsLost."""
        for datagram in read_datagrams(self.sock, self._buffer, "legacy TRACE lines"):
            if datagram is None:
                self.overruns += 1
                yield EventsLost()
            else:
                yield from decode_nflog_datagram(datagram)

    def dropped_messages(self) -> int:
        return socket_drops(self._inode)

    def close(self) -> None:
        """Close the socket (the kernel drops the group binding with it), then restore the loggers.

        A failed restore keeps the state file, so that `nftrace cleanup` can do it later."""
        with SignalsHeld():
            self.sock.close()
            if self._saved is not None:
                saved, self._saved = self._saved, None
                saved.restore()

    def __enter__(self) -> "NflogListener":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
