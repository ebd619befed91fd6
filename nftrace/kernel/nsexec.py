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
import queue
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


class NamespaceWorker:
    """A thread that lives in one network namespace and runs what it is given there.

    A trace across several namespaces keeps one per namespace other than its own: the
    libnftables context and the netlink sockets of that namespace are made in it (a socket
    belongs to the namespace of the thread that opened it, for good), and every libnftables
    call, interface lookup and command for that namespace runs in it, so that nothing of
    libnftables' ever reopens a socket in the wrong namespace. Calls run one at a time.
    """

    def __init__(self, fd: int, shown: str):
        self.shown = shown
        self._calls: queue.Queue = queue.Queue()
        self._entered: queue.Queue = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._serve, args=(fd,), name=f"nftrace-netns-{shown}", daemon=True)
        self._thread.start()
        problem = self._entered.get()
        if problem is not None:
            self._thread.join()
            raise problem

    def _serve(self, fd: int) -> None:
        try:
            enter_namespace_fd(fd, self.shown)
        except BaseException as err:  # handed to the constructor, raised there
            self._entered.put(err)
            return
        self._entered.put(None)
        while True:
            item = self._calls.get()
            if item is None:
                return
            function, args, kwargs, outcome, done = item
            try:
                outcome["value"] = function(*args, **kwargs)
            except BaseException as err:  # carried to the caller, raised there
                outcome["error"] = err
            done.set()

    def call(self, function: Callable[..., Any], *args, **kwargs) -> Any:
        """`function(*args, **kwargs)` inside the namespace; its exception is raised here."""
        if not self._thread.is_alive():
            raise EnvironmentProblem(f"the helper thread of {self.shown} has stopped")
        outcome: dict = {}
        done = threading.Event()
        self._calls.put((function, args, kwargs, outcome, done))
        done.wait()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def close(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._calls.put(None)
            self._thread.join(timeout)
