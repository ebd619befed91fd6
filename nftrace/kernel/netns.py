"""Which network namespaces a run traces: by name, by process, by container, or all of them.

`--netns NAME` (/run/netns/NAME), `--pid PID` (the namespace of a process), `--container
NAME|ID` (the namespace of a container's process, asked of Docker, Podman or containerd
through their own command line) and `--all-netns` (every named namespace, and the one
nftrace runs in) all become a `NetnsTarget`: a label for the answer and an open file
descriptor of the namespace.

The descriptor is opened when the target is resolved: a process that exits afterwards cannot
send nftrace into another namespace that reused its pid. It keeps the namespace itself alive
as long as nftrace holds it, so `alive()` asks whether the namespace is still *reachable* the
way the user named it (the name still mounted, the process still there): when it is not, the
trace of that namespace ends with a warning.

Nothing here creates a namespace or changes one; the runtimes are only asked `inspect`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Iterable, Optional

from ..errors import InputError
from . import runner
from .system import NETNS_RUN_DIR, namespace_path

SANDBOX_PREFIX = "nftrace-sbx-"  # dry-run sandboxes are nftrace's own, never traced by --all-netns
RUNTIMES = ("docker", "podman", "ctr")
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
INSPECT_TIMEOUT = 10.0


@dataclass(eq=False)
class NetnsTarget:
    """One namespace to trace. `label` is what the answer calls it (None: the namespace
    nftrace runs in, unnamed)."""

    label: Optional[str]
    kind: str  # netns | pid | container | current
    path: str  # what was opened: /run/netns/NAME, /proc/PID/ns/net
    fd: int = -1
    inode: tuple = ()  # (st_dev, st_ino) of the namespace: the same namespace named twice is one
    pid: Optional[int] = None
    described: str = ""  # how the user named it, for messages

    @property
    def shown(self) -> str:
        return self.described or (f"netns {self.label}" if self.label else "this namespace")

    def alive(self) -> bool:
        """The namespace can still be reached as the user named it."""
        try:
            if self.kind == "netns":
                stat = os.stat(self.path)
            elif self.kind in ("pid", "container"):
                stat = os.stat(f"/proc/{self.pid}/ns/net")
            else:
                return True
        except OSError:
            return False
        return (stat.st_dev, stat.st_ino) == self.inode

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open(target: NetnsTarget, missing: str) -> NetnsTarget:
    try:
        target.fd = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(missing) from None
    except PermissionError:
        raise InputError(f"{target.described}: permission denied opening {target.path} (run nftrace as root)") from None
    stat = os.fstat(target.fd)
    target.inode = (stat.st_dev, stat.st_ino)
    return target


def by_name(name: str) -> NetnsTarget:
    path = namespace_path(name)  # validates the name, and says when it does not exist
    return _open(NetnsTarget(name, "netns", path, described=f"netns {name}"),
                 f"--netns: network namespace '{name}' does not exist (see 'ip netns list')")


def by_pid(text: str) -> NetnsTarget:
    pid = parse_pid(text)
    target = NetnsTarget(f"pid:{pid}", "pid", f"/proc/{pid}/ns/net", pid=pid, described=f"pid {pid}")
    return _open(target, f"--pid: no process {pid}")


def current() -> NetnsTarget:
    return _open(NetnsTarget(None, "current", "/proc/thread-self/ns/net", described="this namespace"),
                 "cannot open nftrace's own network namespace")


def parse_pid(text: str) -> int:
    value = str(text).strip()
    if not value.isdecimal() or int(value) <= 0:
        raise InputError(f"--pid: '{value[:40]}' is not a process id")
    return int(value)


# -- containers ----------------------------------------------------------------------------


def parse_inspect_pid(output: str) -> Optional[int]:
    """`docker|podman inspect --format '{{.State.Pid}}'` → the pid, None when not running (0)."""
    text = output.strip().splitlines()[0].strip() if output.strip() else ""
    if not text.isdecimal():
        return None
    pid = int(text)
    return pid or None


def parse_ctr_tasks(output: str, wanted: str) -> Optional[int]:
    """`ctr task ls` (TASK PID STATUS) → the pid of the running task named `wanted`, or whose
    id starts with it."""
    found = []
    for line in output.splitlines()[1:]:
        words = line.split()
        if len(words) < 3 or not words[1].isdecimal():
            continue
        task, pid, status = words[0], int(words[1]), words[2]
        if status.upper() == "RUNNING" and (task == wanted or task.startswith(wanted)):
            if task == wanted:
                return pid
            found.append(pid)
    return found[0] if len(found) == 1 else None


def _container_pid(runtime: str, name: str) -> tuple[Optional[int], Optional[str]]:
    """(pid, None), or (None, why this runtime does not give one)."""
    try:
        if runtime in ("docker", "podman"):
            result = runner.run([runtime, "inspect", "--type", "container", "--format", "{{.State.Pid}}", name],
                                check=False, timeout=INSPECT_TIMEOUT)
            if result.returncode != 0:
                return None, runner.first_line(result)
            pid = parse_inspect_pid(result.stdout)
            return (pid, None) if pid else (None, "not running")
        address = os.environ.get("CONTAINERD_ADDRESS", CONTAINERD_SOCKET)
        if not os.path.exists(address):
            return None, f"containerd is not running ({address} does not exist)"
        ctr = ["ctr", "--connect-timeout", "2s"]
        namespaces = runner.run([*ctr, "namespaces", "list", "--quiet"], check=False, timeout=INSPECT_TIMEOUT)
        if namespaces.returncode != 0:
            return None, runner.first_line(namespaces)
        for namespace in namespaces.stdout.split():
            tasks = runner.run([*ctr, "--namespace", namespace, "task", "list"], check=False, timeout=INSPECT_TIMEOUT)
            pid = parse_ctr_tasks(tasks.stdout, name) if tasks.returncode == 0 else None
            if pid:
                return pid, None
        return None, "no running task of that name"
    except runner.CommandFailed as err:  # not installed, or no answer in time
        return None, str(err)


def by_container(name: str, runtimes: Iterable[str] = RUNTIMES) -> NetnsTarget:
    """The namespace of a running container, from the first installed runtime that knows it."""
    if not name or len(name) > 256 or any(c.isspace() or c == "\0" for c in name) or name.startswith("-"):
        raise InputError(f"--container: '{name[:40]}' is not a container name or id")
    installed = [runtime for runtime in runtimes if shutil.which(runtime)]
    if not installed:
        raise InputError(f"--container {name}: no container runtime found (docker, podman or ctr); "
                         "use --pid with the container's process id instead")
    answers = []
    for runtime in installed:
        pid, problem = _container_pid(runtime, name)
        if pid:
            target = NetnsTarget(f"container:{name}", "container", f"/proc/{pid}/ns/net", pid=pid,
                                 described=f"container {name}")
            return _open(target, f"--container {name}: its process {pid} ended before nftrace could enter it")
        answers.append(f"{runtime}: {problem}")
    raise InputError(f"--container {name}: no running container of that name ({'; '.join(answers)})")


# -- every namespace -----------------------------------------------------------------------


def named_namespaces(run_dir: str = NETNS_RUN_DIR) -> list[str]:
    """The names in /run/netns, nftrace's own dry-run sandboxes left out."""
    try:
        names = sorted(os.listdir(run_dir))
    except FileNotFoundError:
        return []
    return [name for name in names if not name.startswith(SANDBOX_PREFIX)]


@dataclass
class TargetList:
    """The namespaces of one run, in the order given, each once; closes their descriptors."""

    targets: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def add(self, target: NetnsTarget) -> None:
        for index, known in enumerate(self.targets):
            if known.inode != target.inode:
                continue
            if known.kind == "current":
                # nftrace runs inside a named namespace: call it by its name.
                self.targets[index] = target
                known.close()
            else:
                self.notes.append(f"{target.shown} is the namespace of {known.shown}: traced once")
                target.close()
            return
        self.targets.append(target)

    def close(self) -> None:
        for target in self.targets:
            target.close()


def resolve(netns: Iterable[str] = (), pids: Iterable[str] = (), containers: Iterable[str] = (),
            all_netns: bool = False) -> TargetList:
    """Every namespace the user asked for, opened, in the order: --netns, --pid, --container,
    then --all-netns's (the current namespace first). None asked: the current one."""
    found = TargetList()
    try:
        for name in netns:
            found.add(by_name(name))
        for pid in pids:
            found.add(by_pid(pid))
        for name in containers:
            found.add(by_container(name))
        if all_netns:
            found.add(current())
            for name in named_namespaces():
                try:
                    found.add(by_name(name))
                except InputError:
                    continue  # deleted since it was listed
        if not found.targets:
            found.add(current())
    except BaseException:
        found.close()
        raise
    return found


@dataclass(frozen=True)
class NamespaceRequest:
    """The namespaces the command line names (--netns, --pid, --container, --all-netns)."""

    netns: tuple = ()
    pids: tuple = ()
    containers: tuple = ()
    all_netns: bool = False

    @property
    def several(self) -> bool:
        return self.all_netns or len(self.netns) + len(self.pids) + len(self.containers) > 1

    @property
    def one_name(self) -> Optional[str]:
        """The one --netns NAME, when that is all that was asked."""
        if not self.several and not self.pids and not self.containers and self.netns:
            return self.netns[0]
        return None

    def resolve(self) -> TargetList:
        return resolve(self.netns, self.pids, self.containers, self.all_netns)
