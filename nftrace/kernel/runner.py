"""Every external command nftrace runs goes through here: one place that fixes how.

- a timeout on every call: a hung `ip` or `iptables-save` ends with an error naming it, never
  with nftrace hanging while its trace rules are in;
- `LC_ALL=C` for every command whose output nftrace reads, so that the words it parses are the
  same on every machine;
- stdin from /dev/null unless input is given: a tool never waits for the terminal;
- a missing tool or a failing one is one line that names the command (`CommandFailed`, an
  EnvironmentProblem), with the Debian package to install when the tool is missing.

Long-running processes (bpftrace, the traffic command, the lab's listeners) are started with
`start`, which fixes the same environment and turns a missing program into the same error; their
callers bound every wait on them.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import IO, Mapping, Optional, Sequence, Union

from ..errors import EnvironmentProblem

DEFAULT_TIMEOUT = 30.0
# What to install when a tool is missing (Debian package names).
PACKAGES = {
    "ip": "iproute2",
    "bridge": "iproute2",
    "nft": "nftables",
    "conntrack": "conntrack",
    "bpftrace": "bpftrace",
    "unshare": "util-linux",
    "setpriv": "util-linux",
    "sysctl": "procps",
}
_ARG_LIMIT = 40
_COMMAND_LIMIT = 120

Input = Union[str, IO, None]


class CommandFailed(EnvironmentProblem):
    """An external command could not be run, timed out, or failed; the message names it."""

    def __init__(self, message: str, result: Optional[subprocess.CompletedProcess] = None):
        super().__init__(message)
        self.result = result


def package_of(program: str) -> str:
    name = os.path.basename(program)
    if name.startswith(("iptables", "ip6tables")):
        return "iptables"
    return PACKAGES.get(name, name)


def describe(argv: Sequence[str]) -> str:
    """The command as a user could type it, cut short where an argument is a whole program."""
    words = []
    for arg in argv:
        arg = str(arg)
        if len(arg) > _ARG_LIMIT or "\n" in arg:
            arg = arg.replace("\n", " ")[:_ARG_LIMIT] + "..."
        words.append(shlex.quote(arg))
    text = " ".join(words)
    return text if len(text) <= _COMMAND_LIMIT else text[:_COMMAND_LIMIT] + "..."


def first_line(result: subprocess.CompletedProcess) -> str:
    """What a failed command said first (stderr, else stdout), or its exit status."""
    for text in (result.stderr, result.stdout):
        for line in (text or "").splitlines():
            if line.strip():
                return line.strip()
    return f"exit status {result.returncode}"


def command_env(env: Optional[Mapping[str, str]] = None, parsed: bool = True) -> dict:
    full = dict(os.environ if env is None else env)
    if parsed:
        full["LC_ALL"] = "C"
    return full


def _missing(argv: Sequence[str], err: OSError, ours: bool = True) -> CommandFailed:
    """A tool of nftrace's that is missing names its package; a user's command, itself."""
    program = str(argv[0])
    if ours and isinstance(err, FileNotFoundError):
        return CommandFailed(f"{os.path.basename(program)} is not installed (apt-get install {package_of(program)})")
    return CommandFailed(f"cannot run {program}: {err.strerror}")


def run(argv: Sequence[str], *, input: Input = None, timeout: float = DEFAULT_TIMEOUT, check: bool = True,
        env: Optional[Mapping[str, str]] = None, what: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run a command to its end and return its output as text.

    `input`: text for its stdin, or an open file; `check`: a non-zero exit raises CommandFailed
    (`what` names it in the message instead of the command line).
    """
    argv = [str(arg) for arg in argv]
    stdin = subprocess.DEVNULL if input is None else None if isinstance(input, str) else input
    text_input = input if isinstance(input, str) else None
    try:
        result = subprocess.run(argv, input=text_input, stdin=stdin, capture_output=True, text=True, timeout=timeout,
                                env=command_env(env))
    except subprocess.TimeoutExpired:
        raise CommandFailed(f"{what or describe(argv)}: no answer within {timeout:g} s") from None
    except OSError as err:
        raise _missing(argv, err) from None
    if check and result.returncode != 0:
        raise CommandFailed(f"{what or describe(argv)}: {first_line(result)}", result)
    return result


def start(argv: Sequence[str], *, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text: bool = False,
          env: Optional[Mapping[str, str]] = None, user_command: bool = False,
          new_session: bool = False) -> subprocess.Popen:
    """Start a long-running command; the caller bounds every wait on it.

    `user_command`: the user's traffic command: its locale is left alone (nftrace does not
    read its output), and a failure to start it names it as the user typed it.
    """
    argv = [str(arg) for arg in argv]
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, text=text,
                                env=command_env(env, parsed=not user_command), start_new_session=new_session)
    except OSError as err:
        raise _missing(argv, err, ours=not user_command) from None


def run_all(commands: Mapping, *, timeout: float = 60.0, allowed_to_fail: Sequence = ()) -> dict:
    """Start every command at once (they only read), then collect their output: key → stdout
    (empty for a command in `allowed_to_fail` that failed)."""
    started: dict = {}
    try:
        for key, argv in commands.items():
            started[key] = start(argv, text=True)
        results = {}
        for key, process in started.items():
            try:
                out, err = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise CommandFailed(f"{describe(commands[key])}: no answer within {timeout:g} s") from None
            if process.returncode != 0 and key not in allowed_to_fail:
                done = subprocess.CompletedProcess(commands[key], process.returncode, out, err)
                raise CommandFailed(f"{describe(commands[key])}: {first_line(done)}", done)
            results[key] = out if process.returncode == 0 else ""
        return results
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def stop(process: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; always reaped."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def netns_exec_argv(netns: Optional[str], argv: Sequence[str]) -> list[str]:
    """`ip netns exec NETNS ARGV...` (None: the current namespace). `ip netns exec` also
    bind-mounts /etc/netns/NETNS/* over /etc, as the namespace's own tools expect."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def ip_argv(netns: Optional[str], *args: str) -> list[str]:
    """`ip -n NETNS ARGS...` (None: the current namespace)."""
    return ["ip", *(["-n", netns] if netns else []), *args]


def bridge_argv(netns: Optional[str], *args: str) -> list[str]:
    """`bridge -n NETNS ARGS...` (None: the current namespace)."""
    return ["bridge", *(["-n", netns] if netns else []), *args]
