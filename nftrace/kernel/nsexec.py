"""Run a function inside another network namespace, in a thread of its own.

setns(2) moves only the calling thread, so a short-lived thread can read or change another
namespace while the rest of nftrace stays where it is. Everything that resolves the network
namespace at the time of the call sees the thread's namespace: netlink and libnftables
sockets opened in it, /proc/sys/net, and /proc/thread-self/net (not /proc/self/net, which
follows the main thread).
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any, Callable, Optional

from ..errors import EnvironmentProblem
from .system import CLONE_NEWNET, enter_namespace, enter_namespace_fd


def call_in_namespace(netns: Optional[str], function: Callable[..., Any], *args, **kwargs) -> Any:
    """`function(*args, **kwargs)` in a thread inside /run/netns/NETNS (None: the caller's namespace).

    Exceptions raised in the thread are raised again in the caller.
    """
    outcome: dict = {}

    def body() -> None:
        try:
            if netns is not None:
                enter_namespace(netns)
            outcome["value"] = function(*args, **kwargs)
        except BaseException as err:  # carried to the caller, raised there
            outcome["error"] = err

    thread = threading.Thread(target=body, name=f"nftrace-netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def thread_proc_net(name: str) -> str:
    """The path of /proc/net/NAME as the calling thread's namespace sees it."""
    return f"/proc/thread-self/net/{name}"


class NamespaceBookmark:
    """Remembers the calling thread's namespace, to come back to it after a setns elsewhere.

    A trace session moves the calling thread into the namespace it traces; after a dry run,
    nftrace goes back, so that the sandbox can be freed and the next one built from home.
    """

    def __init__(self):
        self._fd: Optional[int] = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def restore(self) -> None:
        if self._fd is None:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(self._fd, CLONE_NEWNET) != 0:
            raise EnvironmentProblem(f"cannot return to nftrace's own network namespace: "
                                     f"{os.strerror(ctypes.get_errno())}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class NamespaceCaller:
    """Runs calls inside another network namespace, from nftrace's own thread: setns(2) there,
    the call, setns back.

    A trace across several namespaces keeps one per namespace other than its own. The
    libnftables context and the netlink sockets of that namespace are made through it (a
    socket belongs to the namespace it was opened in, for good, and libnftables 1.0.6 never
    reopens its socket), and so are the interface lookups, /proc/sys reads and commands for
    that namespace. One thread makes every libnftables call, whichever namespace it is for:
    libnftables promises nothing for contexts used from several threads.
    """

    def __init__(self, fd: int, shown: str):
        self.shown = shown
        self._fd = fd
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._thread = threading.current_thread()
        self._inside = False

    def call(self, function: Callable[..., Any], *args, **kwargs) -> Any:
        """`function(*args, **kwargs)` inside the namespace (a call from inside runs at once)."""
        if self._inside:
            return function(*args, **kwargs)
        if threading.current_thread() is not self._thread:
            raise EnvironmentProblem(f"{self.shown} is reached from nftrace's own thread only")
        enter_namespace_fd(self._fd, self.shown)
        self._inside = True
        try:
            return function(*args, **kwargs)
        finally:
            self._inside = False
            enter_namespace_fd(self._home, "nftrace's own network namespace")

    def proxy(self, target: Any) -> "InNamespace":
        """`target` with every method call run inside the namespace."""
        return InNamespace(self, target)

    def close(self) -> None:
        if self._home >= 0:
            os.close(self._home)
            self._home = -1


class InNamespace:
    """An object that belongs to another namespace (a libnftables context, a rule book):
    its methods run inside that namespace; other attributes are read as they are."""

    def __init__(self, caller: NamespaceCaller, target: Any):
        self._caller = caller
        self._target = target

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return value
        caller = self._caller

        def in_namespace(*args, **kwargs):
            return caller.call(value, *args, **kwargs)

        return in_namespace
