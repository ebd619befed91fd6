"""A real Docker daemon inside a test network namespace, for the container tests.

Docker rewrites the firewall of the namespace it runs in (its DOCKER chains, through
iptables-nft) and adds docker0 there: so dockerd runs inside a namespace the test made,
never in the machine's own. `nsenter --net` moves only its network namespace (`ip netns
exec` would remount /sys and hide the cgroup mounts dockerd needs); its data, exec root and
API socket live in a directory of the test's own, so that it shares nothing with any other
Docker on the machine. No image registry is reachable: the image is imported from a root
made of busybox-static.

Stopping, on every exit path of the test: containers removed, dockerd ended (SIGTERM, then
SIGKILL), any process it started that is still there (containerd, shims) ended by pid, its
mounts unmounted, its directory deleted. docker0 and Docker's chains go with the namespace,
which the test's fixture deletes. dockerd gets SIGKILL if the test process itself dies
(setpriv --pdeathsig).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

IMAGE = "nftrace-busybox:test"
BUSYBOX = "/bin/busybox"
START_SECONDS = 60.0
STOP_SECONDS = 20.0
BUSYBOX_LINKS = ("sh", "httpd", "nc", "sleep", "ip")


def docker_problem() -> Optional[str]:
    """Why Docker cannot run here, or None."""
    for tool in ("dockerd", "docker", "containerd", "runc", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install docker.io)"
    if not os.path.exists(BUSYBOX):
        return f"{BUSYBOX} is missing (apt-get install busybox-static)"
    return None


class DockerHost:
    """dockerd running in network namespace `netns`; `stop()` (or the `with` block) ends it."""

    def __init__(self, netns: str):
        self.netns = netns
        self.root = Path(tempfile.mkdtemp(prefix=f"nftrace-docker-{netns}-", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.process: Optional[subprocess.Popen] = None
        self.containers: list[str] = []

    @property
    def env(self) -> dict:
        """The environment in which `docker` (and `nftrace --container`) talk to this daemon."""
        return dict(os.environ, DOCKER_HOST=f"unix://{self.socket}")

    def docker(self, *args: str, timeout: float = 60, check: bool = True, input: Optional[bytes] = None):
        result = subprocess.run(["docker", *args], env=self.env, capture_output=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {result.stderr.decode(errors='replace').strip()}")
        return result

    def start(self) -> "DockerHost":
        log = open(self.root / "dockerd.log", "wb")
        argv = ["setpriv", "--pdeathsig", "KILL", "nsenter", f"--net=/run/netns/{self.netns}",
                "dockerd", "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
                "--pidfile", str(self.root / "dockerd.pid"), "-H", f"unix://{self.socket}"]
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd ended at start: {self.log_tail()}")
            if self.socket.exists() and self.docker("version", check=False, timeout=10).returncode == 0:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not answer within {START_SECONDS:g} s: {self.log_tail()}")

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = (self.root / "dockerd.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    def import_image(self) -> str:
        """An image of busybox-static alone, imported (no registry needed)."""
        rootfs = self.root / "rootfs"
        (rootfs / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
        for name in BUSYBOX_LINKS:
            link = rootfs / "bin" / name
            if not link.exists():
                link.symlink_to("busybox")
        tarball = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True).stdout
        self.docker("import", "-", IMAGE, input=tarball)
        return IMAGE

    def run(self, name: str, *args: str) -> str:
        """`docker run -d --name NAME ARGS...`; removed by stop()."""
        self.containers.append(name)
        self.docker("run", "-d", "--name", name, *args)
        return name

    def container_pid(self, name: str) -> int:
        return int(self.docker("inspect", "--format", "{{.State.Pid}}", name).stdout.strip())

    # -- stopping ---------------------------------------------------------------------------

    def stop(self) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                for name in self.containers:
                    self.docker("rm", "-f", name, check=False, timeout=30)
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            self._end_leftover_processes()
            self._unmount_leftovers()
            shutil.rmtree(self.root, ignore_errors=True)

    def _processes(self) -> list[int]:
        """Processes that dockerd started (containerd, shims, containers' init): they name
        this daemon's directory on their command line, which nothing else on the machine does."""
        marker = str(self.root).encode()
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return [pid for pid in found if pid != os.getpid()]

    def _end_leftover_processes(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGKILL):
            pids = self._processes()
            for pid in pids:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while pids and time.monotonic() < deadline:
                time.sleep(0.1)
                pids = self._processes()
            if not pids:
                return

    def _unmount_leftovers(self) -> None:
        prefix = str(self.root)
        mounts = []
        with open("/proc/self/mountinfo") as info:
            for line in info:
                point = line.split()[4].replace("\\040", " ")
                if point == prefix or point.startswith(prefix + "/"):
                    mounts.append(point)
        for point in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)

    def __enter__(self) -> "DockerHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
