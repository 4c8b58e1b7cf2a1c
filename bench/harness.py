"""What the bench tools share: a server child process, a loopback S3, statistics, the machine's description.

The tools run as scripts (`python bench/pressure.py`), so this module is imported as a sibling (`import harness`).
It imports no torch: the pressure tool must stay light enough to drive a server from the same small machine.
"""

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_count() -> int:
    """CPUs this process may run on (a container's limit, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def env_pairs(pairs: list[str] | None) -> dict[str, str]:
    """`KEY=VALUE` options (repeated --env) as a dict."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env wants KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def size_arg(text: str) -> str:
    """argparse type of a tool's --size: WIDTHxHEIGHT as the server takes it, refused before anything loads."""
    from server.config import size_problem

    if problem := size_problem(text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected {problem}")
    return text


def at_least(low: int) -> Callable[[str], int]:
    """argparse type of an integer option that must be >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {low}")
        return value

    return parse


def json_object(text: str) -> dict:
    """argparse type of a tool's --body: a JSON object of request fields."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object of request fields")
    return value


def exit_on_sigterm() -> None:
    """SIGTERM (timeout, kill) as a normal exit, so that `with Server()` blocks still stop their child."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class ServerFailed(RuntimeError):
    """The server exited or never became ready; the message ends with its log."""


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, log: Callable[[], str]) -> None:
    """Until the server child at `url` answers /ready with 200; ServerFailed if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerFailed(f"the server exited with {proc.returncode}:\n{log()}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ServerFailed(f"the server was not ready after {timeout:g}s:\n{log()}")


class ServerProcess:
    """`image-server serve` as a child process on loopback, configured by environment like the container.

    The one launcher of the bench tools and the tests: a context manager (the process is always stopped, SIGTERM
    then kill, when the block ends, so a benchmark that fails half-way leaves no server behind), or started and
    stopped by hand (pytest fixtures). It imports neither pytest nor openai unless `client` is called.
    """

    def __init__(self, env: dict[str, str] | None = None, command: list[str] | None = None, ready_timeout: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout = ready_timeout
        self.log_path = Path(tempfile.mkstemp(prefix="image-server-", suffix=".log")[1])
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "IMAGE_DIR": tempfile.mkdtemp(prefix="image-server-images-"),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.command = command or [sys.executable, "-m", "server.cli", "serve"]
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "ServerProcess":
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        wait_ready(self.url, self.proc, timeout or self.ready_timeout, self.log_tail)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def metric(self, name: str, labels: str = "") -> float:
        return scrape(self.url, name, labels)

    def client(self, api_key: str = "unused", **kwargs):
        """The official OpenAI client for this server."""
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, **kwargs)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def scrape(url: str, name: str, labels: str = "") -> float:
    """Sum of the samples of one Prometheus series on a server's /metrics (those whose label text contains
    `labels`, or all)."""
    total = 0.0
    for line in httpx.get(url.rstrip("/") + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


class LoopbackS3:
    """A moto S3 server on loopback with one bucket, for the upload plugin's pre-signed PUT URLs."""

    def __init__(self, bucket: str = "bench", port: int = 0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        self.proc: subprocess.Popen | None = None
        self._client = None

    def __enter__(self) -> "LoopbackS3":
        import boto3

        with socket.socket() as probe:  # on a taken port moto would exit, and whatever is there would answer
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError:
                raise RuntimeError(f"port {self.port} is taken") from None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait()
        self._client = boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
        self._client.create_bucket(Bucket=self.bucket)
        return self

    def _wait(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url, timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("the loopback S3 (moto) did not start")

    def presign(self, key: str, expires: int = 3600) -> str:
        return self._client.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires
        )

    def objects(self) -> dict[str, int]:
        """The bucket's objects: key -> size in bytes."""
        listing = self._client.list_objects_v2(Bucket=self.bucket)
        return {entry["Key"]: entry["Size"] for entry in listing.get("Contents", [])}

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# -- memory ------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the server and its decode processes)."""
    pids, i = [pid], 0
    while i < len(pids):
        children = Path(f"/proc/{pids[i]}/task/{pids[i]}/children")
        pids += [int(c) for c in children.read_text().split()] if children.exists() else []
        i += 1
    return pids


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except FileNotFoundError:  # a process that ended meanwhile
        pass
    return 0


def reset_peak_rss(pid: int) -> None:
    """Starts a new peak (VmHWM) for `pid` and its descendants: Linux resets it on `5` to clear_refs."""
    for each in process_tree(pid):
        try:
            Path(f"/proc/{each}/clear_refs").write_text("5")
        except OSError:
            pass


def peak_rss_mib(pid: int) -> float:
    """The peak resident memory of `pid` plus the peaks of its descendants, in MiB (an upper bound of the
    tree's peak: the processes need not have peaked together)."""
    return sum(_status_kib(each, "VmHWM") for each in process_tree(pid)) / 1024


# -- statistics -------------------------------------------------------------


def stats(values: list[float]) -> dict:
    """Percentiles of a sample (empty: only the count)."""
    if not values:
        return {"count": 0}
    a = np.asarray(values, dtype=float)
    p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
    return {
        "count": len(a),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "p50": float(p50),
        "p90": float(p90),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(a.max()),
    }


def parse_server_timing(header: str | None) -> dict[str, float]:
    """`queue;dur=12.5, gen;dur=830.1, post;dur=9.0` -> {"queue": 12.5, "gen": 830.1, "post": 9.0} (ms)."""
    out: dict[str, float] = {}
    for metric in (header or "").split(","):
        name, *params = (p.strip() for p in metric.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if name and key == "dur":
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
    return out


# -- reporting ----------------------------------------------------------------


def machine() -> dict:
    """What the figures were measured on: say it next to every number."""
    return {
        "cpu": _cpu_model(),
        "cpus": cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average": load_average(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def load_average() -> list[float]:
    """1, 5 and 15 minute load: above ~0.5 on an idle run, something else shared the CPUs."""
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def config(args, leave_out: tuple[str, ...] = ()) -> dict:
    """A tool's arguments as JSON can hold them (paths as strings), for the report."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in leave_out}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_rows(tool: str, args, machine: dict, rows: list[dict], samples: str) -> None:
    """Writes <args.out or out/<tool>/<time>>/<tool>.json (config, machine, rows) and prints where, then the rows
    without their raw `samples`."""
    out = args.out or default_out(tool)
    write_json(out / f"{tool}.json", {"config": config(args), "machine": machine, "rows": rows})
    print(f"wrote {out / f'{tool}.json'}")
    print(json.dumps([{k: v for k, v in row.items() if k != samples} for row in rows]))


def default_out(tool: str) -> Path:
    """out/<tool>/<UTC time>: /out/ is ignored by git, and one run never overwrites another."""
    return ROOT / "out" / tool / time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table (what docs/BENCHMARKS.md takes as it is)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
