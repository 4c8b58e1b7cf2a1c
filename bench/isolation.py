"""What one hostile caller costs the others: each attack class against a real server, measured from beside it.

For each class the tool starts the attack (bench/attacks.py: the payloads and endpoints the isolation tests
use), and meanwhile probes the server as an orchestrator and an honest client would: GET /health every 50 ms,
and a normal 64x64 generation (2 steps) back to back, from another API key (`--one-key`: the attacker's). The
attacker's threads (its clients, its image and upload servers) run at niceness 19: they stand for machines
elsewhere (`--attacker-niceness 0`: they share the 2 cores with the server). It reports /health's p99, the
normal request's median and p95 against the same figures measured quiet, the peak memory the server and its
decode processes added (VmHWM, reset before each class), the 5xx answers, and the longest any attack request
lasted against REQUEST_TIMEOUT. A class is a function of an `Attack` (the server, a stop event, a way to run
attackers in threads), with the settings it needs. The reading classes at the end are controls: honest traffic
of the shape of the non-reading classes.

    python bench/isolation.py [--classes padded-png-json,many-scan-jpeg] [--seconds 20] [--one-key]
                              [--attacker-niceness 19] [--out DIR]

Targets (issue 20, the 2-core demo): /health p99 under 250 ms, the normal request under 2x its quiet latency,
memory growth under 200 MB per class, nothing past REQUEST_TIMEOUT, no 5xx. Timing on a shared machine is
noisy: the report carries the load average before and after each class.
"""

import argparse
import base64
import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import attacks
import harness
import httpx

REQUEST_TIMEOUT = 30.0
SERVER = {
    "REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
    "WRITE_TIMEOUT": "5",
    "BODY_TIMEOUT": "10",
    "REMOTE_IMAGE_HOSTS": "127.0.0.1:*",
    "PLUGINS": "upload",
    "UPLOAD_ALLOWED_HOSTS": "127.0.0.1:*",
    "UPLOAD_RETRIES": "0",
    "API_KEY": "key-attacker,key-honest",
}
NORMAL = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 2, "seed": 1}
# The attacker and the honest client are two callers, each with its API key (SERVER's API_KEY): the tenants whose
# isolation this measures. With --one-key both send the first (one tenant: the honest requests queue behind the
# attack's admitted ones).
KEYS = tuple(SERVER["API_KEY"].split(","))
GENERATIONS = "/v1/images/generations"


@dataclass
class Attack:
    """What a class gets: the server, when to stop, and a record of each attack request (status, seconds)."""

    url: str
    stop: threading.Event
    niceness: int  # of the attacker's threads (its clients and servers)
    key: str = KEYS[0]
    outcomes: list[tuple[int, float]] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def run(self, attackers: int, one: Callable[[], int]) -> None:
        """`attackers` threads each sending `one()` (which returns a status) until told to stop."""

        def loop() -> None:
            attacks.lower_priority(self.niceness)
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    status = one()
                except httpx.HTTPError:
                    status = 0  # the client's own timeout or a dropped connection
                self.outcomes.append((status, time.monotonic() - started))

        threads = [threading.Thread(target=loop, daemon=True) for _ in range(attackers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def post(self, path: str, timeout: float = REQUEST_TIMEOUT + 30, **kwargs) -> int:
        return httpx.post(self.url + path, timeout=timeout, headers=self.headers, **kwargs).status_code


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# -- the classes ------------------------------------------------------------------------------------------


def padded_png_json(attack: Attack) -> None:
    """JSON edits of three 12 MB PNGs padded with a million empty chunks each, as data URLs."""
    url = data_url(attacks.padded_png(64, 1_000_000))
    body = {"prompt": "p", "size": "64x64", "images": [{"image_url": url}] * 3}
    attack.run(2, lambda: attack.post("/v1/images/edits", json=body))


def many_scan_jpeg(attack: Attack) -> None:
    """Multipart edits of a 4096x4096 progressive JPEG of 20,000 scans (800 KB)."""
    jpeg = attacks.many_scan_jpeg(4096, 20_000)
    files = {"image": ("scans.jpg", jpeg, "image/jpeg")}
    attack.run(4, lambda: attack.post("/v1/images/edits", files=files, data={"prompt": "p"}))


def trickling_remote_image(attack: Attack) -> None:
    """Edits whose image URL sends a byte every second, forever."""
    with attacks.HostileServer(interval=1.0, niceness=attack.niceness) as target:
        body = {"prompt": "p", "size": "64x64", "images": [{"image_url": target.url + "/slow.png"}]}
        attack.run(4, lambda: attack.post("/v1/images/edits", json=body))


def sixteen_remote_images(attack: Attack) -> None:
    """Edits of 16 image URLs each, every one a 20 MB PNG served at full speed."""
    with attacks.HostileServer(image=attacks.padded_png(64, 0) + bytes(20 * 2**20), niceness=attack.niceness) as target:
        images = [{"image_url": f"{target.url}/{i}.png"} for i in range(16)]
        body = {"prompt": "p", "size": "64x64", "num_inference_steps": 2, "images": images}
        attack.run(6, lambda: attack.post("/v1/images/edits", json=body))


def huge_upload_error(attack: Attack) -> None:
    """Generations whose upload target answers a 400 MB error body."""
    with attacks.HostileServer(error_bytes=400 * 2**20, niceness=attack.niceness) as target:
        body = {**NORMAL, "upload_urls": [target.url + "/bucket/key"]}
        attack.run(2, lambda: attack.post("/v1/images/generations", json=body))


STREAM = {"prompt": "p", "size": "1024x1024", "stream": True, "partial_images": 2, "output_format": "png",
          "num_inference_steps": 2}  # fmt: skip


ANSWERS = {"prompt": "p", "size": "768x768", "n": 2, "output_format": "png", "num_inference_steps": 2}


def _reading(attack: Attack, body: dict) -> None:
    """Six clients that send `body` a second apart and read all of each answer: what the honest path costs,
    the control for a non-reading class."""

    def one() -> int:
        attack.stop.wait(1.0)
        with httpx.stream("POST", attack.url + GENERATIONS, json=body, headers=attack.headers, timeout=60) as answer:
            for _ in answer.iter_bytes():
                pass
        return answer.status_code

    attack.run(6, one)


def reading_streams(attack: Attack) -> None:
    """The control for non-reading-streams: the same generations, by clients that read every event."""
    _reading(attack, STREAM)


def reading_answers(attack: Attack) -> None:
    """The control for non-reading-answers: the same generations, by clients that read their answers."""
    _reading(attack, ANSWERS)


def non_reading_streams(attack: Attack) -> None:
    """Six streamed 1024x1024 generations with previews (about 10 MB of events each) by clients that never
    read, one a second, held open."""
    _hold(attack, 6, 1.0, lambda: attacks.non_reading(attack.url, "POST", GENERATIONS, _json(STREAM), attack.headers))


def non_reading_answers(attack: Attack) -> None:
    """Six generations of two 768x768 PNGs (4.6 MB of JSON each) by clients that never read, held open."""
    _hold(attack, 6, 1.0, lambda: attacks.non_reading(attack.url, "POST", GENERATIONS, _json(ANSWERS), attack.headers))


def silent_bodies(attack: Attack) -> None:
    """200 connections that send a request's headers, promise a body, and send nothing, held open."""
    _hold(attack, 200, 0.05, lambda: attacks.headers_then_nothing(attack.url, GENERATIONS, headers=attack.headers))


def _json(body: dict) -> bytes:
    return json.dumps(body).encode()


def _hold(attack: Attack, count: int, every: float, open_one: Callable) -> None:
    """`count` connections opened `every` seconds apart, held until the class ends."""
    sockets = []
    while len(sockets) < count and not attack.stop.wait(every):
        sockets.append(open_one())
    attack.stop.wait()
    for sock in sockets:
        sock.close()


CLASSES: dict[str, tuple[Callable[[Attack], None], dict[str, str]]] = {
    "padded-png-json": (padded_png_json, {}),
    "many-scan-jpeg": (many_scan_jpeg, {}),
    "trickling-remote-image": (trickling_remote_image, {}),
    "sixteen-remote-images": (sixteen_remote_images, {}),
    "huge-upload-error": (huge_upload_error, {}),
    "non-reading-streams": (non_reading_streams, {}),
    "non-reading-answers": (non_reading_answers, {}),
    "silent-bodies": (silent_bodies, {}),
    # controls, last: they load the machine as honest traffic does
    "reading-streams": (reading_streams, {}),
    "reading-answers": (reading_answers, {}),
}


# -- measuring ----------------------------------------------------------------------------------------------


def probe(url: str, stop: threading.Event, key: str) -> dict[str, list[float]]:
    """/health every 50 ms and the normal request (from `key`) back to back, until `stop`: their latencies in
    seconds."""
    health: list[float] = []
    normal: list[float] = []

    def ping() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.wait(0.05):
                started = time.monotonic()
                client.get(url + "/health")
                health.append(time.monotonic() - started)

    def honest() -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT + 30) as client:
            while not stop.is_set():
                started = time.monotonic()
                answer = client.post(url + GENERATIONS, json=NORMAL, headers={"Authorization": f"Bearer {key}"})
                if answer.status_code == 200:
                    normal.append(time.monotonic() - started)

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(ping), pool.submit(honest)]:
            future.result()
    return {"health": health, "normal": normal}


def _attacking(attack_fn: Callable[[Attack], None], attack: Attack) -> None:
    """The attack's own thread (its payloads built, its connections held) at the attacker's niceness too."""
    attacks.lower_priority(attack.niceness)
    attack_fn(attack)


def measure(
    server: harness.ServerProcess, seconds: float, attack_fn: Callable[[Attack], None] | None, args: argparse.Namespace
) -> dict:
    """The probes for `seconds`, with `attack_fn` running (None: quiet); then the attack's stragglers."""
    stop = threading.Event()
    attack = Attack(server.url, stop, args.attacker_niceness)
    honest_key = KEYS[0] if args.one_key else KEYS[1]
    harness.reset_peak_rss(server.proc.pid)
    before = harness.peak_rss_mib(server.proc.pid)
    errors_before = server.metric("image_server_requests_total", 'status="5')
    load = harness.load_average()[0]
    with ThreadPoolExecutor(2) as pool:
        attacker = pool.submit(_attacking, attack_fn, attack) if attack_fn else None
        prober = pool.submit(probe, server.url, stop, honest_key)
        time.sleep(seconds)
        stop.set()
        latencies = prober.result()
        if attacker:
            attacker.result()
    health, normal = harness.stats(latencies["health"]), harness.stats(latencies["normal"])
    return {
        "health_p99_ms": health.get("p99", 0) * 1000,
        "normal_p50_s": normal.get("p50", 0),
        "normal_p95_s": normal.get("p95", 0),
        "normal_count": normal["count"],
        "peak_added_mib": harness.peak_rss_mib(server.proc.pid) - before,
        "answers_5xx": server.metric("image_server_requests_total", 'status="5') - errors_before,
        "attack_requests": len(attack.outcomes),
        "attack_statuses": sorted({status for status, _ in attack.outcomes}),
        "attack_longest_s": max((s for _, s in attack.outcomes), default=0.0),
        "load_before": load,
        "load_after": harness.load_average()[0],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", default="all", help="comma-separated classes, or all: " + ", ".join(CLASSES))
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each class runs")
    parser.add_argument("--out", type=Path, help="folder for isolation.json (default out/isolation/<time>)")
    parser.add_argument("--one-key", action="store_true", help="the honest client sends the attacker's key")
    parser.add_argument(
        "--attacker-niceness", type=int, default=19, choices=range(20),
        help="CPU niceness of the attacker's threads: they stand for machines elsewhere (0: they share the CPU)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    harness.exit_on_sigterm()
    names = list(CLASSES) if args.classes == "all" else args.classes.split(",")
    rows = []
    for env in {json.dumps(CLASSES[n][1], sort_keys=True) for n in names}:
        with harness.ServerProcess({"MODEL_PATH": "demo", **SERVER, **json.loads(env)}) as server:
            quiet = measure(server, args.seconds, None, args)
            rows.append({"class": "quiet", **quiet})
            for name in (n for n in names if json.dumps(CLASSES[n][1], sort_keys=True) == env):
                row = {"class": name, **measure(server, args.seconds, CLASSES[name][0], args)}
                row["normal_vs_quiet"] = row["normal_p50_s"] / max(quiet["normal_p50_s"], 1e-9)
                rows.append(row)
                print(json.dumps(row), flush=True)
    harness.save_rows("isolation", args, harness.machine(), rows, samples="")
    columns = ["class", "health_p99_ms", "normal_p50_s", "normal_vs_quiet", "peak_added_mib", "answers_5xx",
               "attack_statuses", "attack_longest_s", "load_before"]  # fmt: skip
    print(harness.table(rows, columns))


if __name__ == "__main__":
    sys.exit(main())
