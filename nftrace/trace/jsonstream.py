"""`--json`: one JSON document on stdout, written packet by packet."""

from __future__ import annotations

import json

from .report import packet_json


class JsonStream:
    """One JSON document on stdout, written as packets complete, so memory stays flat.

    Each packet is one complete line as soon as it is known (lines after the first start
    with ", "), so a reader can follow a long run line by line. Nothing is written before
    the first packet, so an error found while setting up leaves stdout empty; once
    started, the document is always closed, even on Ctrl-C. Lines are flushed after each
    batch of events read (`flush`), not one by one: under a flood a write(2) per packet
    costs more than the packet's decoding; when events trickle in, a batch is one packet.
    """

    def __init__(self, out, report):
        self.out = out
        self.report = report
        self.count = 0
        self.started = False

    def _start(self) -> None:
        header = json.dumps(self.report.header_json())
        self.out.write(header[:-1] + ', "packets": [\n')
        self.started = True

    def packet(self, path) -> None:
        if not self.started:
            self._start()
        self.out.write(("  " if self.count == 0 else ", ") + json.dumps(packet_json(path, self.report.interfaces)) + "\n")
        self.count += 1

    def flush(self) -> None:
        self.out.flush()

    def finish(self) -> None:
        if not self.started:
            self._start()
        self.out.write("], " + json.dumps(self.report.trailer_json())[1:] + "\n")
        self.out.flush()
