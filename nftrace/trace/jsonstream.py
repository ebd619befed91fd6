"""`--json`: one JSON document on stdout, written packet by packet."""

from __future__ import annotations

import json

from .report import packet_json

# Stands for the trace id in a packet's JSON kept for its shape (never in a rule's text: a
# JSON string holds no control character unescaped, so no text encodes to this).
_TRACE_ID_MARK = "\x00trace id\x00"
_TRACE_ID_JSON = json.dumps(_TRACE_ID_MARK)


class JsonStream:
    """One JSON document on stdout, written as packets complete, so memory stays flat.

    Each packet is one complete line as soon as it is known (lines after the first start
    with ", "), so a reader can follow a long run line by line. Nothing is written before
    the first packet, so an error found while setting up leaves stdout empty; once
    started, the document is always closed, even on Ctrl-C. Lines are written after each
    batch of events read (`flush`), not one by one: under a flood a write(2) per packet
    costs more than the packet's decoding; when events trickle in, a batch is one packet.
    They are held here, not in `out`'s buffer, which PYTHONUNBUFFERED (set in many container
    images) turns into a write(2) per packet; past HELD_CHARACTERS (a backlog's packets
    released at once) they are written before the batch ends, so memory stays flat.
    """

    HELD_CHARACTERS = 1 << 18

    def __init__(self, out, report):
        self.out = out
        self.report = report
        self.count = 0
        self.started = False
        self._shaped = ShapedJson()
        self._lines: list[str] = []
        self._held = 0  # characters in _lines

    def _start(self) -> None:
        header = json.dumps(self.report.header_json())
        self.out.write(header[:-1] + ', "packets": [\n')
        self.started = True

    def packet(self, path) -> None:
        if not self.started:
            self._start()
        text = self._shaped.text(path, self.report.interfaces)
        self._lines.append(("  " if self.count == 0 else ", ") + text + "\n")
        self.count += 1
        self._held += len(text)
        if self._held > self.HELD_CHARACTERS:
            self._write()

    def _write(self) -> None:
        """The held lines, handed to `out` exactly once. They are let go before the write: a
        Ctrl-C handled as an unbuffered write returns (a reader that saw the packet and stopped
        nftrace at once) would otherwise leave them held, and `finish` write them again. Python
        runs a signal's handler after a call, not between these assignments and the write."""
        if self._lines:
            text = "".join(self._lines)
            self._lines, self._held = [], 0
            self.out.write(text)

    def flush(self) -> None:
        self._write()
        self.out.flush()

    def finish(self) -> None:
        if not self.started:
            self._start()
        self._lines.append("], " + json.dumps(self.report.trailer_json())[1:] + "\n")
        self.flush()


class ShapedJson:
    """The JSON of packets whose paths were made from a known shape (trace/shapes.py): written
    once per shape, with the trace id left open, and reused while what the path's shape does not
    say is the same (namespace, interface names, near misses, rule annotations) and nothing was
    added to the path (kernel drop, fix, parts in other namespaces)."""

    MAX_SHAPES = 1024

    def __init__(self) -> None:
        self._kept: dict = {}  # ShapeNode -> (what it was written for, the JSON's parts around the trace id)

    def text(self, path, interfaces: dict) -> str:
        shape = path.shape
        if shape is None or path.kernel_drop is not None or path.fix is not None or path.segments:
            return json.dumps(packet_json(path, interfaces))
        kept = self._kept.get(shape)
        # Every path of a shape has its interfaces (their indexes: their names may change).
        iif, oif = kept[3] if kept is not None else (path.interface_index("iif"), path.interface_index("oif"))
        written_for = (path.netns, path.interfaces, interfaces.get(iif), interfaces.get(oif),
                       tuple([step.iptables for step in path.steps]), tuple(map(id, path.near_misses)))
        if kept is not None and kept[0] == written_for:
            return f'"{path.trace_id:08x}"'.join(kept[1])
        document = packet_json(path, interfaces)
        text = json.dumps(document)
        document["trace_id"] = document["namespaces"][0]["trace_id"] = _TRACE_ID_MARK
        parts = json.dumps(document).split(_TRACE_ID_JSON)
        if len(parts) == 3:
            if len(self._kept) >= self.MAX_SHAPES:
                self._kept.clear()
            # The near misses themselves are kept too: their ids stay theirs while kept.
            self._kept[shape] = (written_for, parts, path.near_misses, (iif, oif))
        return text
