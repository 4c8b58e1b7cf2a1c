"""The `sglang serve` child: its own process group, its output in our log, watched, restarted when it dies.

  start()       the supervisor thread spawns the child and polls GET /health until it answers 200
  wait_ready()  blocks (on the engine thread, inside load()) until the first child is healthy. A first
                child that exits or never becomes healthy is fatal: that is a configuration error, and
                the server should stop with the child's last lines rather than loop
  healthy       False from the moment the child exits or reports itself broken until a new one is
                healthy; the server's readiness and its request door read it
  restart       after a child that was healthy dies: a new one on new ports, backoff 1, 2, 4 ... 60 s
  stop()        SIGTERM to the whole group, then SIGKILL to whatever is left after the grace period

SGLang's worker (`sgl_diffusion::scheduler`) is a child of `sglang serve`; both are in the group, so
signals go to the group, never to one pid.
"""

import atexit
import collections
import logging
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from server.engines.sglang.errors import MAX_ANSWER, read_bounded
from server.errors import APIError

log = logging.getLogger("server.engines.sglang")
child_log = logging.getLogger("sglang")

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# The child is started through this snippet so that it gets PR_SET_PDEATHSIG (prctl option 1): if
# image-server dies without stopping it (SIGKILL, OOM killer), the kernel sends `sglang serve` a SIGTERM
# and it stops its own worker. The parent pid is checked after the prctl, in case it died before.
_EXEC_WITH_PDEATHSIG = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)

WATCH_INTERVAL = 1.0  # seconds between liveness checks of a healthy child
MAX_MISSED_HEALTH = 3  # unanswered /health checks in a row before a live child counts as hung
MAX_BACKOFF = 60.0


@dataclass(frozen=True)
class Ports:
    http: int  # SGLang also binds http + 1 (its offline-request broker) and does not check it first
    scheduler: int
    master: int


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _any_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_ports(http: int = 0) -> Ports:
    """Free loopback ports for one child. Fixed defaults (5555, 30005) would collide between instances."""
    for _ in range(100):
        candidate = http or _any_free_port()
        if candidate < 65535 and _is_free(candidate + 1):
            http = candidate
            break
    else:
        raise RuntimeError("no free pair of loopback ports for SGLang (it needs PORT and PORT+1)")
    taken = {http, http + 1}
    others = []
    while len(others) < 2:
        port = _any_free_port()
        if port not in taken:
            taken.add(port)
            others.append(port)
    return Ports(http, *others)


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _proc_group(pid: str) -> tuple[int, str] | None:
    """(process group, state) of one process, from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
    return int(fields[2]), fields[0]


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: the orphaned worker is reaped by
    init, not by us, and waiting for that would only delay a stop."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            found = _proc_group(entry.name)
            if found and found[0] == pgid and found[1] != "Z":
                return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the child's process group; SIGKILL what is left after `grace` seconds."""
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _clean(raw: bytes) -> str:
    """One output line without colour codes; of a progress bar's carriage-return updates, the last."""
    text = _ANSI.sub("", raw.decode("utf-8", "replace"))
    return text.rstrip().split("\r")[-1].strip()


class SGLangProcess:
    def __init__(
        self,
        command: Callable[[Ports], list[str]],
        *,
        env: dict[str, str],
        cwd: str,
        start_timeout: float,
        port: int = 0,
        stop_grace: float = 10.0,
    ) -> None:
        self._command = command
        self._env = env
        self._cwd = cwd
        self.start_timeout = start_timeout
        self._port = port
        self._stop_grace = stop_grace
        self.base_url = ""
        self.pid: int | None = None
        self.epoch = 0  # counts children that became healthy: state held by a child (LoRAs) is per epoch
        self.startup_seconds = 60.0  # measured at each start; it is what a restart will take
        self._healthy = threading.Event()
        self._stopping = threading.Event()
        self._settled = threading.Event()  # the first child became healthy, or failed
        self._failure = ""
        self._why = ""
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=30)
        self._thread: threading.Thread | None = None
        self._http = httpx.Client(trust_env=False, timeout=5.0)  # loopback: never through a proxy

    # -- public ----------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy.is_set()

    @property
    def retry_after(self) -> int:
        """Seconds a client should wait while the child restarts: about one startup."""
        return max(5, min(120, math.ceil(self.startup_seconds)))

    def start(self) -> None:
        atexit.register(self.stop, 2.0)  # a last resort; close() normally stops the child first
        self._thread = threading.Thread(target=self._supervise, name="sglang-supervisor", daemon=True)
        self._thread.start()

    def wait_ready(self) -> None:
        self._settled.wait()
        if self._failure:
            raise SystemExit(self._failure)

    def stop(self, grace: float | None = None) -> None:
        grace = self._stop_grace if grace is None else grace
        self._stopping.set()
        self._healthy.clear()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            log.info("stopping sglang (process group %d)", proc.pid)
        if proc is not None:
            stop_group(proc, grace)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(grace + 5)

    # -- the supervisor thread -------------------------------------------

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            proc = self._spawn()
            if proc is not None and self._wait_healthy(proc, started):
                self._became_healthy(proc, time.monotonic() - started)
                backoff = 1.0
                self._watch(proc)
                self._healthy.clear()
            if proc is not None:
                stop_group(proc, self._stop_grace)
            if self._stopping.is_set():
                return
            if not self._settled.is_set():
                self._fail_first_start()
                return
            log.warning("restarting sglang in %.0fs", backoff)
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _spawn(self) -> subprocess.Popen | None:
        ports = pick_ports(self._port)
        argv = self._command(ports)
        with self._lock:
            if self._stopping.is_set():
                return None
            proc = subprocess.Popen(
                [sys.executable, "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: one signal reaches the worker too
                env=self._env,
                cwd=self._cwd,
            )
            self._proc = proc
        self.pid = proc.pid
        self.base_url = f"http://127.0.0.1:{ports.http}"
        log.info(
            "started sglang pid=%d (process group %d) on %s: %s", proc.pid, proc.pid, self.base_url, shlex.join(argv)
        )
        threading.Thread(target=self._pump, args=(proc,), name=f"sglang-log-{proc.pid}", daemon=True).start()
        return proc

    def _pump(self, proc: subprocess.Popen) -> None:
        """The child's output, line by line, into our log under the `sglang` logger."""
        for raw in iter(proc.stdout.readline, b""):
            line = _clean(raw)
            if line:
                self._tail.append(line)
                child_log.info("[%d] %s", proc.pid, line)
        proc.stdout.close()

    def _health(self) -> str:
        """'ok'; 'starting' (not listening yet, or warming up: 503 with no body); 'broken' (503 with a reason, or
        an answer past MAX_ANSWER: the rest is never read)."""
        try:
            with self._http.stream("GET", self.base_url + "/health") as streamed:
                response = read_bounded(streamed)
        except httpx.HTTPError:
            return "starting"
        except APIError:
            self._why = f"sglang answered /health with more than {MAX_ANSWER} bytes"
            return "broken"
        if response.status_code == 200:
            return "ok"
        if response.content and response.status_code == 503:
            self._why = response.text
            return "broken"
        return "starting"

    def _wait_healthy(self, proc: subprocess.Popen, started: float) -> bool:
        deadline = started + self.start_timeout
        while not self._stopping.is_set():
            code = proc.poll()
            if code is not None:
                self._why = f"sglang {describe_exit(code)} before it became healthy"
                log.error("%s", self._why)
                return False
            state = self._health()
            if state == "ok":
                return True
            if state == "broken":
                log.error("sglang reports itself broken: %s", self._why)
                return False
            if time.monotonic() > deadline:
                self._why = f"sglang was not healthy after {self.start_timeout:g}s (SGLANG_START_TIMEOUT)"
                log.error("%s", self._why)
                return False
            self._stopping.wait(0.5)
        return False

    def _became_healthy(self, proc: subprocess.Popen, seconds: float) -> None:
        self.startup_seconds = seconds
        self.epoch += 1
        self._healthy.set()
        self._settled.set()
        log.info("sglang pid=%d is healthy after %.1fs", proc.pid, seconds)

    def _watch(self, proc: subprocess.Popen) -> None:
        """Returns when the healthy child has died, reports itself broken, or stops answering."""
        missed = 0
        while not self._stopping.is_set():
            try:
                code = proc.wait(WATCH_INTERVAL)
            except subprocess.TimeoutExpired:
                code = None
            if self._stopping.is_set():
                return
            if code is not None:
                self._healthy.clear()
                log.error("sglang pid=%d %s; readiness is 503 until it is back", proc.pid, describe_exit(code))
                return
            state = self._health()
            if state == "broken":
                self._healthy.clear()
                log.error("sglang pid=%d reports itself broken (%s); restarting it", proc.pid, self._why)
                return
            missed = 0 if state == "ok" else missed + 1
            if missed >= MAX_MISSED_HEALTH:
                self._healthy.clear()
                log.error("sglang pid=%d stopped answering /health; restarting it", proc.pid)
                return

    def _fail_first_start(self) -> None:
        tail = "\n".join(f"  {line}" for line in self._tail)
        self._failure = f"{self._why or 'sglang did not start'}; its last output:\n{tail}"
        self._settled.set()
