"""libnftables, through its Python bindings: one context per namespace, errors as NftraceError.

The context opens its netlink socket when it is created, in the namespace the process is in
then; the trace table's `flags owner` ties that table to this socket, so the context lives
as long as the trace does.
"""

from __future__ import annotations

import errno
import json
import os
import re
from typing import Any, Optional

from ..errors import EnvironmentProblem, KernelError


def _load_bindings():
    try:
        import nftables  # Debian's python3-nftables, on top of libnftables1
    except ImportError:
        raise EnvironmentProblem(
            "the nftables Python bindings are missing: apt-get install python3-nftables "
            "(and run nftrace from a Python that sees Debian's packages)"
        ) from None
    return nftables


class NftContext:
    """A libnftables context with the output options nftrace relies on."""

    def __init__(self):
        nftables = _load_bindings()
        try:
            self._nft = nftables.Nftables()
        except OSError as err:
            raise EnvironmentProblem(f"libnftables cannot be loaded: {err} (apt-get install libnftables1)") from None
        self.messages = ""

    def run(self, command: str, *, json_output: bool = False, handles: bool = False, stateless: bool = False,
            terse: bool = False) -> str:
        """Run nft command text that nftrace wrote itself (never user input); return its output."""
        nft = self._nft
        nft.set_json_output(json_output)
        nft.set_handle_output(handles)
        nft.set_stateless_output(stateless)
        nft.set_terse_output(terse)
        rc, output, error = nft.cmd(command)
        if rc != 0:
            raise KernelError(_first_error_line(error) or f"nft: '{command}' failed", kernel_errno(error))
        # What nft says besides the output, such as "table ip filter is managed by iptables-nft".
        self.messages = error or ""
        return output

    def list_ruleset(self, *, state: bool = False) -> str:
        """The whole ruleset as nft prints it, with handles (`nft -a`).

        state=False: without counter values, quotas and set elements (`-s -t`): the rule text
        an admin reads, and a listing whose size does not grow with the sets' contents.
        state=True: everything, as a copy needs it (`nft -a list ruleset`).
        Never as JSON: libnftables 1.0.6 frees the flag of a table that has exactly one (`flags
        owner`, `flags dormant`) before it prints it as JSON, a use after free that corrupts
        the heap; trace/nearmiss_live.py lists JSON chain by chain, which is safe.
        """
        if state:
            return self.run("list ruleset", handles=True)
        return self.run("list ruleset", handles=True, stateless=True, terse=True)

    def run_json(self, commands: list[dict[str, Any]]) -> None:
        """Apply a list of JSON commands as one atomic transaction.

        libnftables parses its input as JSON only while JSON output is on.
        """
        nft = self._nft
        nft.set_json_output(True)
        nft.set_handle_output(False)
        rc, _, error = nft.cmd(json.dumps({"nftables": commands}))
        if rc != 0:
            raise KernelError(_first_error_line(error) or "nft refused nftrace's trace rules", kernel_errno(error))

    def run_file(self, path: str) -> None:
        """Load an nft file as `nft -f FILE` does; the error names the file and line."""
        nft = self._nft
        nft.set_json_output(False)
        nft.set_handle_output(False)
        rc, _, error = nft.cmd_from_file(path)
        if rc != 0:
            raise KernelError(load_file_error(error))


# libnftables writes the kernel's refusal as `Error: Could not process rule: <strerror(errno)>`.
_REFUSAL_RE = re.compile(r"Could not process rule: (.+?)\s*$", re.MULTILINE)
_ERRNOS = {os.strerror(code): code for code in sorted(errno.errorcode, reverse=True)}


def kernel_errno(error: str) -> Optional[int]:
    """The errno behind libnftables' error text, or None when the kernel did not refuse
    (a parse error). libnftables gives no number, only strerror's text, which this process's
    own strerror (same C library, same locale) maps back."""
    match = _REFUSAL_RE.search(error or "")
    return _ERRNOS.get(match.group(1)) if match else None


def _first_error_line(error: str) -> str:
    for line in (error or "").splitlines():
        if "Error:" in line:
            return "nft: " + line.split("Error:", 1)[1].strip()
    lines = [line for line in (error or "").splitlines() if line.strip()]
    return "nft: " + lines[0].strip() if lines else ""


def load_file_error(error: str) -> str:
    """nft's first error line for a file, as the parser prints it: `FILE:LINE:COL: Error: ...`."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    for line in lines:
        if "Error:" in line:
            return line
    return lines[0] if lines else "nft could not load the file"
