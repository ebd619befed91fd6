"""Colour for people: the verdict, the deciding rule and ✗/✓ in near misses, on a terminal only.

`--color auto|always|never` as ls, grep and systemd have it: `auto` colours when stdout is a
terminal, `NO_COLOR` (any non-empty value, https://no-color.org) and `TERM=dumb` turn it off;
`always` colours even into a pipe (`| less -R`), `never` never. Colour is only ever added
around text the plain answer already has, so the words are the same either way.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, TextIO

from ..errors import InputError

CHOICES = ("auto", "always", "never")

RESET = "\033[0m"
BOLD = "1"
RED = "31"
GREEN = "32"
YELLOW = "33"
MAGENTA = "35"
VERDICT_COLOURS = {"accept": GREEN, "drop": RED, "queue": YELLOW, "stolen": YELLOW, "unknown": MAGENTA}


def parse_colour_choice(text: Optional[str]) -> str:
    choice = (text or "auto").strip().lower()
    if choice not in CHOICES:
        raise InputError(f"--color: '{text}' is not one of {', '.join(CHOICES)}")
    return choice


def colour_wanted(choice: str, stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether to colour what goes to `stream`."""
    if choice == "always":
        return True
    if choice == "never" or environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Style:
    """Wraps text in ANSI colours, or leaves it as it is (`Style(False)`, the default)."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled

    def _paint(self, text: str, *codes: str) -> str:
        if not self.enabled or not text:
            return text
        return f"\033[{';'.join(codes)}m{text}{RESET}"

    def verdict(self, text: str, verdict: str) -> str:
        """A verdict label or word, in the verdict's colour."""
        return self._paint(text, BOLD, VERDICT_COLOURS.get(verdict, MAGENTA))

    def deciding(self, text: str, verdict: str) -> str:
        """The rule that decided, where the tree shows it."""
        return self._paint(text, BOLD, VERDICT_COLOURS.get(verdict, MAGENTA))

    def failed(self, text: str) -> str:
        return self._paint(text, RED)

    def passed(self, text: str) -> str:
        return self._paint(text, GREEN)

    def unknown(self, text: str) -> str:
        return self._paint(text, YELLOW)


PLAIN = Style(False)
