"""Near misses for a live trace (or a dry run's sandbox): the rule book read when an answer first
needs it, and each finished packet annotated with its near misses.

Nothing here is on the event path: the trace rules go in and events are read before the
first listing; the chains and sets a packet's path touches are listed as JSON (`nft -j -a
list chain`, `list set`) when the first packet that needs them is answered, and again only
after the ruleset generation changed (`invalidate`, called on NFT_MSG_NEWGEN). Legacy tables
announce no change: their rules (iptables-legacy-save) and the ipsets (`ipset save`) are
read again when the last reading is older than LEGACY_MAX_AGE seconds.

Packets of one flow mostly look alike: the near misses of a packet are remembered by what
they depend on (its steps, verdict and the packet as each hook saw it), so a flood of the
same datagram costs one evaluation, not one per packet.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import OrderedDict
from typing import Callable, Optional, Protocol

from ..errors import NftraceError
from ..iptables.legacy import read_legacy_ruleset
from ..kernel import runner
from ..iptables.xtmatch import parse_ipset_save
from .nearmiss import find_near_misses
from .rulebook import VARYING_FIELDS, RuleBook

LEGACY_MAX_AGE = 2.0
CACHE_SIZE = 1024


def path_signature(path, tested: frozenset = frozenset(VARYING_FIELDS)) -> tuple:
    """Everything near misses depend on, besides the ruleset. Of the fields that vary from
    packet to packet of a flow (source port, length, tcp flags, mark), only those that some rule
    read so far tests (`tested`): a flood of new connections from ever other source ports is one
    evaluation, not one per packet, unless a rule looks at the source port."""
    sport, length, flags, mark = ("sport" in tested, "length" in tested, "tcp_flags" in tested, "mark" in tested)
    steps = tuple((s.backend, s.hook, s.family, s.table, s.chain, s.type, s.handle, s.rule_number, s.verdict,
                   s.target, s.depth) for s in path.steps)
    seen = tuple((o.hook, o.table, o.chain, o.own, o.packet and (o.packet.src, o.packet.dst, o.packet.proto,
                  sport and o.packet.sport, o.packet.dport, o.packet.icmp_type, o.packet.icmp_code,
                  flags and o.packet.tcp_flags, length and o.packet.length), o.iif, o.oif, mark and o.mark,
                  o.ct and (o.ct.state, o.ct.direction, o.ct.status))
                 for o in path.observations)
    decided = next((index for index, step in enumerate(path.steps) if step is path.decided_by), None)
    return (path.verdict, path.complete, decided, steps, seen)


class NftJsonLister(Protocol):
    def chain(self, family: str, table: str, name: str) -> Optional[dict]: ...

    def set_elements(self, family: str, table: str, name: str) -> Optional[list]: ...


class LiveRuleBook:
    """The rule book of the namespace nftrace runs in, read lazily.

    `nft`: lists one chain or one set at a time as JSON (`NftCommandLister`; None without
    nf_tables): a packet's path touches a few chains of a ruleset that may have 50,000 rules
    (one chain of 1,000 rules lists in a tenth of a second, the whole ruleset in seconds).
    `nft_text` gives a rule's text from the ruleset snapshot; `iptables_form` the iptables-save
    form of an iptables-nft rule; `legacy_families` the families whose legacy tables are traced.
    """

    def __init__(self, nft: Optional[NftJsonLister], nft_text: Optional[Callable] = None,
                 iptables_form: Optional[Callable] = None, legacy_families: tuple = (),
                 clock: Callable[[], float] = time.monotonic, ipsets: Optional[Callable[[], dict]] = None):
        self.nft = nft
        self.nft_text = nft_text
        self.iptables_form = iptables_form
        self.legacy_families = tuple(legacy_families)
        self.clock = clock
        self.ipsets = ipsets or read_ipsets
        self.generation = 0
        self._book: Optional[RuleBook] = None
        self._legacy_read_at: Optional[float] = None

    def invalidate(self) -> None:
        """The nftables ruleset changed: read it again when it is next needed."""
        self._book = None
        self.generation += 1

    def book(self) -> RuleBook:
        if self._book is not None and self.legacy_families and self._legacy_read_at is not None \
                and self.clock() - self._legacy_read_at >= LEGACY_MAX_AGE:
            self._book = None
            self.generation += 1
        if self._book is None:
            nft = self.nft
            book = RuleBook(chain_loader=nft.chain if nft else None, set_loader=nft.set_elements if nft else None,
                            nft_text=self.nft_text, iptables_form=self.iptables_form)
            if self.legacy_families:
                for family in self.legacy_families:
                    book.add_legacy(family, read_legacy_ruleset(family).chains)
                self._legacy_read_at = self.clock()
            book.add_ipsets(self.ipsets())
            self._book = book
        return self._book


class NftCommandLister:
    """One chain or set at a time, as `nft -j -a` lists it, in a process of its own.

    Never a whole table or ruleset: libnftables 1.0.6 frees the flag of a table that has
    exactly one (`flags owner`: nftrace's own trace tables, other programs' owned tables;
    `flags dormant`) before it prints it as JSON (`list ruleset`, `list table`, `list tables`),
    a use after free that corrupts the heap ("corrupted double-linked list" aborts, and
    valgrind says so). `list chain` prints no table and is safe (checked with valgrind, with
    owned and dormant tables around). The listing still runs apart, so that a trace never
    dies of an explanation: a failure only costs the near misses. The command is JSON on
    nft's stdin, so that every name, keywords included, is a JSON value and never parsed as
    nft syntax.

    nft's answer must be one JSON document: libnftables prints the document's newline
    whether or not `json_dumpf` could print the document (its result goes unchecked) and
    exits 0, so an answer can be a lone newline ("Expecting value: line 2 column 1", seen
    now and then in long test runs and not reproduced at will) or a document cut short. A
    listing is a read: such an answer is asked for again (ATTEMPTS in all), and one that
    stays broken is an error that names the listing, never read as an empty chain.
    """

    ATTEMPTS = 3

    def __init__(self, command: str):
        self.command = command

    def _list(self, kind: str, family: str, table: str, name: str) -> Optional[dict]:
        request = {"nftables": [{"list": {kind: {"family": family, "table": table, "name": name}}}]}
        what = f"nft -j list {kind} {family} {table} {name}"
        for _ in range(self.ATTEMPTS):
            result = runner.run([self.command, "-j", "-a", "-f", "-"], input=json.dumps(request), timeout=60,
                                check=False, what=what)
            if result.returncode != 0:
                return None  # gone since, or not of this kind: nothing sound to say about it
            document = parse_listing(result.stdout)
            if document is not None:
                return document
        raise NftraceError(f"{what} printed no JSON document: {result.stdout.strip()[:60]!r}")

    def chain(self, family: str, table: str, name: str) -> Optional[dict]:
        return self._list("chain", family, table, name)

    def set_elements(self, family: str, table: str, name: str) -> Optional[list]:
        for kind in ("set", "map"):
            document = self._list(kind, family, table, name)
            for item in (document or {}).get("nftables", []):
                body = item.get(kind)
                if body is not None:
                    return body.get("elem", [])
        return None


def parse_listing(stdout: str) -> Optional[dict]:
    """nft's JSON answer to a list command; None where it is not one whole JSON document
    (see NftCommandLister). No output at all stays what it always was here: nothing listed."""
    if not stdout:
        return {"nftables": []}
    try:
        document = json.loads(stdout)
    except ValueError:
        return None
    return document if isinstance(document, dict) and isinstance(document.get("nftables"), list) else None


def nft_lister() -> Optional[NftCommandLister]:
    """The lister of this namespace's ruleset; None when the nft command is not installed."""
    command = shutil.which("nft")
    return NftCommandLister(command) if command else None


def read_ipsets() -> dict:
    """The ipsets of the namespace (`ipset save`); none when ipset is not installed."""
    command = shutil.which("ipset")
    if command is None:
        return {}
    try:
        result = runner.run([command, "save"], check=False)
    except runner.CommandFailed:
        return {}
    return parse_ipset_save(result.stdout) if result.returncode == 0 else {}


class NearMissAnnotator:
    """Gives each finished packet its near misses (`PacketPath.near_misses`).

    A failure to read the ruleset leaves the packets without near misses and says so once
    (`warn`): the answer itself never depends on them.
    """

    def __init__(self, source: LiveRuleBook, interfaces: dict, warn: Callable[[str], None] = lambda message: None):
        self.source = source
        self.interfaces = interfaces
        self.warn = warn
        self._cache: OrderedDict = OrderedDict()
        self._failed = False

    def invalidate(self) -> None:
        self.source.invalidate()

    def annotate(self, path) -> None:
        if self._failed or not path.complete or path.verdict not in ("accept", "drop"):
            return
        try:
            book = self.source.book()
        except (NftraceError, ValueError, OSError) as err:
            self._failed = True
            self.warn(f"near misses unavailable: the ruleset could not be read ({err})")
            return
        # Before the first evaluation no rule is read, so the key holds every field; the rules
        # read since say which the next keys need.
        # A path made from a known shape has the signature of every other path of that shape.
        if path.shape is not None:
            key = (self.source.generation, path.shape)
        else:
            key = (self.source.generation, path_signature(path, frozenset(book.tested_fields) if book.chains else
                                                          frozenset(VARYING_FIELDS)))
        found = self._cache.get(key)
        if found is None:
            try:
                found = find_near_misses(path, book, self.interfaces)
            except (NftraceError, ValueError, OSError) as err:
                self._failed = True
                self.warn(f"near misses unavailable: the ruleset could not be read ({err})")
                return
            self._cache[key] = found
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        path.near_misses = list(found)
