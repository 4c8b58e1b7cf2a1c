"""multi-gpu/run.sh for real on loopback: two CPU instances of the demo model behind Debian's nginx (run as this
user, in a temporary prefix, on free ports). Requests reach both instances and all succeed; an instance stopped
with SIGTERM under load loses no accepted request (nginx retries the others' refusals) and is started again."""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench.harness import free_port
from tests.support.deploy import BIN, ROOT, run, tool
from tests.support.server import CACHE_DIR

UPSTREAM = re.compile(r'"POST /v1/images/generations [^"]*" (\d+) .* upstream=(.*) upstream_status=(.*) time=')


def free_port_pair() -> int:
    """A port p with p+1 free too (instances listen on BASE_PORT, BASE_PORT+1)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


class Host:
    def __init__(self, env: dict, state: Path, proc: subprocess.Popen, log: Path) -> None:
        self.env, self.state, self.proc, self.log = env, state, proc, log
        self.url = "http://" + env["NGINX_LISTEN"]
        self.ports = [int(env["BASE_PORT"]), int(env["BASE_PORT"]) + 1]

    def status(self) -> subprocess.CompletedProcess:
        return run([ROOT / "multi-gpu/status.sh"], env=self.env)

    def wait_all_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            if self.status().returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"not ready after {timeout}s:\n{self.status().stdout}\n{self.output()}")

    def pid(self, instance: int) -> int:
        return int((self.state / f"instance-{instance}.pid").read_text())

    def in_flight(self, port: int) -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        return float(re.search(r"^image_server_in_flight (\S+)$", text, re.M)[1])

    def generations(self) -> list[tuple[int, list[str], list[str]]]:
        """(status, upstreams tried, their statuses) of each generation nginx answered."""
        found = UPSTREAM.findall((self.state / "nginx/access.log").read_text())
        return [(int(code), up.split(", "), st.split(", ")) for code, up, st in found]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def host():
    state = Path(tempfile.mkdtemp(prefix="image-server-multi-gpu-"))
    state.chmod(0o755)  # run as root, nginx's workers are nobody: they must enter it
    env = {
        **os.environ,
        "GPUS": "0,1",
        "BASE_PORT": str(free_port_pair()),
        "NGINX_LISTEN": f"127.0.0.1:{free_port()}",
        "STATE_DIR": str(state),
        "IMAGE_SERVER": str(BIN / "image-server"),
        "NGINX": tool("nginx"),
        "RESTART_DELAY": "1",
        "MODEL_PATH": "demo",
        "CACHE_DIR": str(CACHE_DIR),
        "TORCH_THREADS": "1",
    }
    log = state / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([ROOT / "multi-gpu/run.sh"], env=env, stdout=out, stderr=subprocess.STDOUT)
    h = Host(env, state, proc, log)
    try:
        yield h
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                # Only what this test started: the script, and the processes named in its pid files.
                for pid_file in [*state.glob("instance-*.pid"), state / "nginx/nginx.pid"]:
                    if pid_file.exists():
                        os.kill(int(pid_file.read_text()), signal.SIGKILL)
                proc.kill()
                proc.wait()
        shutil.rmtree(state, ignore_errors=True)


def generate(url: str, size: str = "64x64", steps: int = 2) -> int:
    body = {"prompt": "a lighthouse", "size": size, "num_inference_steps": steps}
    return httpx.post(url + "/v1/images/generations", json=body, timeout=120).status_code


@pytest.mark.slow
def test_nginx_spreads_requests_and_loses_none_when_an_instance_stops(host):
    host.wait_all_ready()
    status = host.status()
    rows = [line.split() for line in status.stdout.splitlines()[1:3]]
    assert [(r[2], r[3], r[4], r[5]) for r in rows] == [(f"127.0.0.1:{p}", "yes", "0", "0") for p in host.ports]
    assert "n/a (no nvidia-smi)" in status.stdout and status.stdout.splitlines()[-1].endswith(": up")

    # Spread: concurrent requests through nginx are answered by both instances.
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: generate(host.url), range(8))) == [200] * 8
    served = {upstreams[-1] for code, upstreams, _ in host.generations() if code == 200}
    assert served == {f"127.0.0.1:{p}" for p in host.ports}

    # Stop instance 0 (SIGTERM, as a rollout or a crash would) while it has work in flight.
    victim = host.pid(0)
    with ThreadPoolExecutor(4) as pool:
        results = [pool.submit(generate, host.url, "512x512", 16) for _ in range(24)]
        deadline = time.monotonic() + 60
        while host.in_flight(host.ports[0]) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(victim, signal.SIGTERM)
        codes = [r.result() for r in results]
    assert codes == [200] * 24  # nothing accepted was lost, nothing refused reached a client
    deadline = time.monotonic() + 60
    while alive(victim) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(victim)
    assert "instance 0 exited with status 0" in host.output()  # it drained, then exited cleanly
    # Some requests met the stopping instance (503 while draining, refused once gone) and went to the other one.
    retried = [statuses for _, upstreams, statuses in host.generations() if len(upstreams) > 1]
    assert retried and all(s[0] in ("502", "503") and s[-1] == "200" for s in retried), retried

    # run.sh starts the stopped instance again, and it rejoins.
    host.wait_all_ready()
    assert host.pid(0) != victim
    assert generate(host.url) == 200

    # SIGTERM to run.sh: instances drain, nginx stops, nothing is left running.
    pids = [host.pid(0), host.pid(1), int((host.state / "nginx/nginx.pid").read_text())]
    host.proc.send_signal(signal.SIGTERM)
    assert host.proc.wait(90) == 0, host.output()
    assert not any(alive(pid) for pid in pids)


MISSING = [("NGINX", "apt-get install nginx"), ("IMAGE_SERVER", "scripts/setup.sh")]


@pytest.mark.parametrize(("variable", "hint"), MISSING)
def test_run_says_what_is_missing_before_starting_anything(tmp_path, variable, hint):
    env = {**os.environ, "GPUS": "0", "STATE_DIR": str(tmp_path), variable: str(tmp_path / "missing")}
    result = run([ROOT / "multi-gpu/run.sh"], env=env, timeout=30)
    assert result.returncode == 1 and hint in result.stdout, result.stdout
    assert not (tmp_path / "nginx/nginx.conf").exists()
