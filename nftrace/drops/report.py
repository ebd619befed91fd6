"""What a `nftrace drops` run found, as data: the JSON document and what the renderers read.

One document, written as the run goes (trace/jsonstream.py): the header first, then every
dropped packet as it completes (as `why` gives a packet), then the counts, known only at the
end. Key order aside, it is:

    {"mode": "drops", "netns", "filter", "duration", "traced", "not_traced", "lost_events",
     "rules": [{"decided_by", "packets", "flows", "other_flows"}],
     "kernel_drops": [{"reason", "explain", "packets", "flows", "other_flows"}],
     "packets": [...], "sampled", "warnings"}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..flow import Flow
from .tally import DropTally, TraceCounts


@dataclass
class DropsReport:
    """One run of `nftrace drops`: the filter, the tally, nftrace's own counters, warnings."""

    flow: Flow
    netns: Optional[str] = None  # the namespace's label: NAME, pid:PID, container:NAME
    namespaces: list = field(default_factory=list)  # [netns]: set by the session, as for `why`
    max_rate: int = 100
    backend: str = "nft"
    mode: str = "drops"
    tally: DropTally = field(default_factory=DropTally)
    counts: Optional[TraceCounts] = None  # read from the trace table at the end
    duration: float = 0.0
    lost_events: int = 0
    warnings: list = field(default_factory=list)
    interfaces: dict = field(default_factory=dict)
    # The legacy iptables tables present, which drops does not trace (`iptables (filter, nat)`).
    untraced_legacy: list = field(default_factory=list)

    @property
    def traced(self) -> Optional[int]:
        return self.counts.traced if self.counts is not None else None

    @property
    def not_traced(self) -> Optional[int]:
        return self.counts.not_traced if self.counts is not None else None

    @property
    def sampled(self) -> bool:
        """Counts are a sample: the rate limit left packets untraced, or events were lost."""
        return bool((self.counts is not None and self.counts.sampled) or self.lost_events)

    def sample_note(self) -> Optional[str]:
        """The plain words for a sample, or None when the counts are exact."""
        notes = []
        if self.counts is not None and self.counts.sampled:
            notes.append(f"counts are a sample: {self.counts.not_traced:,} of {self.counts.matched:,} matching "
                         f"packets were over --max-rate {self.max_rate}/s and not traced "
                         "(--max-rate 0 traces every one)")
        if self.lost_events:
            notes.append(f"{self.lost_events:,} trace events were lost: packets that lost events are not counted")
        return "; ".join(notes) or None

    def header_json(self) -> dict:
        return {"mode": self.mode, "backend": self.backend, "netns": self.netns, "filter": self.flow.to_json(),
                "max_rate": self.max_rate}

    def trailer_json(self) -> dict:
        return {
            "duration": round(self.duration, 3),
            "traced": self.traced,
            "not_traced": self.not_traced,
            "sampled": self.sampled,
            "lost_events": self.lost_events,
            "dropped": self.tally.packets,
            "rules": self.tally.rules_json(),
            "kernel_drops": self.tally.kernel_drops_json(),
            "warnings": list(self.warnings),
        }

    def to_json(self) -> dict:
        document = self.header_json()
        document.update(self.trailer_json())
        return document
