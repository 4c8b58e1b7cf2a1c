"""ENGINE=sglang against the real thing: SGLang 0.5.23 in its own venv serving the tiny FLUX.1 demo checkpoint.

One image-server (and so one SGLang child) serves the whole module, started here and stopped by the last
test; SGLang's worker would otherwise sit beside the other tests. The first run installs SGLang with
scripts/setup-sglang.sh (several minutes, about 11 GB); later runs reuse the venv.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from plugins.nsfw.demo import write_demo_classifier
from tests.support.images import decode_b64, gradient, pixels, png_bytes
from tests.support.loras import foreign_lora, kohya_lora, peft_lora, wrong_shape_lora
from tests.support.s3 import presigned_put
from tests.support.server import ROOT, ServerProcess

# the SGLang install can run inside the first test's setup
pytestmark = [pytest.mark.sglang, pytest.mark.timeout(3600)]

FAST = {"num_inference_steps": 4, "seed": 9}
THREE = [{"name": "style", "weight": 1.0}, {"name": "detail", "weight": 0.7}, {"name": "grain", "weight": 0.5}]
LONG = {"prompt": "long", "size": "1024x1024", "num_inference_steps": 50, "seed": 1}  # seconds on SGLang's CPU path


def group_members(pgid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[1][0] != "Z"]


def wait_group_gone(pgid: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return group_members(pgid)


def wait_for(probe, done, timeout: float):
    deadline = time.monotonic() + timeout
    while not done(value := probe()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert done(value), value
    return value


def child_pids(srv: ServerProcess) -> list[int]:
    """Every SGLang child the server started, from its log (each leads its own process group)."""
    return [int(pid) for pid in re.findall(r"started sglang pid=(\d+)", srv.logs())]


@pytest.fixture(scope="session")
def sglang_bin() -> str:
    if os.environ.get("IMAGE_SERVER_SKIP_SGLANG"):
        pytest.skip("IMAGE_SERVER_SKIP_SGLANG is set")
    done = subprocess.run([str(ROOT / "scripts" / "setup-sglang.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"scripts/setup-sglang.sh failed:\n{done.stderr[-4000:]}")
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sglang-loras")
    peft_lora(d / "style.safetensors", seed=1)
    kohya_lora(d / "detail.safetensors", seed=2)
    peft_lora(d / "grain.safetensors", seed=3, prefix="")  # bare keys
    foreign_lora(d / "foreign.safetensors")
    wrong_shape_lora(d / "shape.safetensors")
    return d


@pytest.fixture(scope="module")
def sglang_server(sglang_bin, lora_dir, tmp_path_factory):
    nsfw = write_demo_classifier(tmp_path_factory.mktemp("nsfw") / "nsfw_image_detection")
    srv = ServerProcess(
        {
            "ENGINE": "sglang",
            "SGLANG_BIN": sglang_bin,
            "PLUGINS": "lora,nsfw,upload",
            "LORA_DIR": str(lora_dir),
            "NSFW_MODEL_PATH": str(nsfw),
            "NSFW_CHECK": "false",  # on only where a test asks for it
            "NSFW_THRESHOLD": "0.0",  # every checked image is flagged: the random classifier's scores mean nothing
            "UPLOAD_ALLOWED_HOSTS": "127.0.0.1:*",
        }
    )
    srv.start(wait=False)
    try:
        srv.wait_ready(timeout=900)
        yield srv
    finally:
        srv.stop()
        leftovers = {pgid: wait_group_gone(pgid, 20) for pgid in child_pids(srv)}
        for pgid, members in leftovers.items():
            if members:
                os.killpg(pgid, signal.SIGKILL)
        assert not any(leftovers.values()), f"SGLang processes outlived the server: {leftovers}"


@pytest.fixture
def client(sglang_server) -> openai.OpenAI:
    return sglang_server.client(max_retries=0, timeout=300)


def image(client, loras=None, **extra) -> np.ndarray:
    body = {**FAST, **extra}
    if loras is not None:
        body["loras"] = loras
    result = client.images.generate(prompt="a fox", size="256x256", output_format="png", extra_body=body)
    return pixels(decode_b64(result.data[0].b64_json))


def seeds_and_pixels(result) -> tuple[list[int], list[np.ndarray]]:
    return [item.model_extra["seed"] for item in result.data], [pixels(decode_b64(i.b64_json)) for i in result.data]


def in_flight(srv: ServerProcess, body: dict, pool: ThreadPoolExecutor):
    """Send `body` and return once the engine is generating it."""
    future = pool.submit(httpx.post, srv.url + "/v1/images/generations", json=body, timeout=300)
    deadline = time.monotonic() + 30
    while srv.metric("image_server_in_flight") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # from the door into SGLang
    assert not future.done(), future.result().text
    return future


def test_models_and_log_show_the_engine(sglang_server):
    card = httpx.get(sglang_server.url + "/v1/models").json()["data"][0]
    engine = card["engine"]
    assert (engine["engine"], engine["sglang_version"], engine["family"]) == ("sglang", "0.5.23", "FLUX.1-dev")
    assert engine["pipeline"] == "FluxPipeline" and engine["task_types"] == ["T2I"]
    assert card["ready"] is True and card["defaults"] == {"num_inference_steps": 28, "guidance_scale": 3.5}
    logs = sglang_server.logs()
    assert "SGLang 0.5.23 serving flux-demo" in logs
    assert "--sleep-on-idle" in logs and "--strict-ports" in logs
    pid = child_pids(sglang_server)[0]
    assert f"sglang: [{pid}]" in logs  # the child's own output, prefixed, in the server's log


def test_idle_child_does_not_busy_poll(sglang_server):
    """Without --sleep-on-idle SGLang's idle worker spins a whole core (measured ~98%)."""

    def cpu_seconds(pgid: int) -> float:
        ticks = 0
        for pid in subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime + stime
        return ticks / os.sysconf("SC_CLK_TCK")

    pgid = child_pids(sglang_server)[-1]
    before, started = cpu_seconds(pgid), time.monotonic()
    time.sleep(4)
    share = (cpu_seconds(pgid) - before) / (time.monotonic() - started)
    assert share < 0.3, f"the idle SGLang child used {share:.0%} of a core"


def test_n_images_and_seeds_reproduce(client):
    def generate(n, seed):
        result = client.images.generate(
            prompt="a fox",
            size="256x256",
            n=n,
            output_format="png",
            extra_body={"num_inference_steps": 4, "seed": seed},
        )
        return seeds_and_pixels(result)

    seeds, (first, second) = generate(2, 1234)
    assert seeds == [1234, 1235] and (first != second).any()
    _, again = generate(2, 1234)
    assert (again[0] == first).all() and (again[1] == second).all()
    _, listed = generate(2, [1234, 1235])  # consecutive seeds: the same single SGLang call
    assert (listed[0] == first).all() and (listed[1] == second).all()
    seeds, apart = generate(2, [77, 1234])  # not consecutive: one call per image
    _, (alone,) = generate(1, 1234)
    assert seeds == [77, 1234] and (apart[1] == alone).all()


def test_weighted_loras_change_the_image_and_the_empty_set_restores_the_base(client):
    base = image(client, [])
    three = image(client, THREE)
    assert np.abs(three - base).mean() > 1
    assert (image(client, []) == base).all()  # unmerged: the base weights bit for bit
    one = image(client, [{"name": "style", "weight": 1.0}])
    assert (one != base).any() and (one != three).any()
    assert (image(client, [{"name": "style", "weight": 1.0}]) == one).all()  # after a switch, from SGLang's cache
    half = image(client, [{"name": "style", "weight": 0.5}])
    assert 0 < np.abs(half - base).mean() < np.abs(one - base).mean() * 1.5
    assert (image(client, THREE) == three).all()


@pytest.mark.parametrize(
    ("name", "why"),
    [("foreign", "no LoRA weights for any layer"), ("shape", "does not fit")],
)
def test_a_lora_that_matches_nothing_or_does_not_fit_is_a_400(client, name, why):
    base = image(client, [])
    with pytest.raises(openai.BadRequestError) as err:
        image(client, [{"name": name}])
    assert err.value.body["code"] == "lora_invalid" and why in err.value.body["message"]
    assert (image(client, []) == base).all()  # SGLang never saw it: the model is intact


def test_concurrent_requests_with_different_sets_never_mix(client):
    sets = [[], [{"name": "style"}], [{"name": "grain", "weight": 0.8}, {"name": "detail", "weight": 0.3}]]
    expected = [image(client, s) for s in sets]
    with ThreadPoolExecutor(9) as pool:
        results = list(pool.map(lambda i: image(client, sets[i % 3]), range(9)))
    for i, result in enumerate(results):
        assert (result == expected[i % 3]).all(), f"request {i} got another set's image"


def test_nsfw_and_upload_run_on_sglang_images(client, moto):
    endpoint, s3 = moto
    urls = [presigned_put(endpoint, f"sglang/{i}.jpeg") for i in range(2)]
    result = client.images.generate(
        prompt="x", size="256x256", n=2, extra_body={**FAST, "nsfw_check": True, "upload_urls": urls}
    )
    for i, item in enumerate(result.data):
        extra = item.model_extra
        assert extra["nsfw"] is True and 0 < extra["nsfw_score"] < 1
        assert extra["upload"]["status"] == "uploaded" and extra["s3_url"] == f"{endpoint}/images/sglang/{i}.jpeg"
        stored = Image.open(io.BytesIO(s3.get_object(Bucket="images", Key=f"sglang/{i}.jpeg")["Body"].read()))
        assert (stored.format, stored.size) == ("JPEG", (256, 256))


def test_what_flux1_cannot_do_is_a_clear_400(client, sglang_server):
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(image=("in.png", png_bytes(gradient(256, 256)), "image/png"), prompt="p")
    assert err.value.body["code"] == "unsupported" and "no edit endpoint" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        image(client, guidance_scale=7.0)  # FLUX.1's distilled guidance is fixed when SGLang starts
    assert err.value.body["param"] == "guidance_scale"
    response = httpx.post(sglang_server.url + "/v1/videos", json={"prompt": "a wave"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "unsupported"
    # a negative prompt is honoured through true CFG
    assert np.abs(image(client, negative_prompt="blurry") - image(client)).mean() > 0.5


def test_child_death_answers_503_and_the_restarted_child_serves_the_same_images(client, sglang_server):
    styled = image(client, [{"name": "style"}])
    base = image(client, [])
    pgid = child_pids(sglang_server)[-1]
    with ThreadPoolExecutor(1) as pool:
        running = in_flight(sglang_server, LONG, pool)
        killed = time.monotonic()
        os.killpg(pgid, signal.SIGKILL)
        answer = running.result()
    assert answer.status_code == 503 and int(answer.headers["retry-after"]) >= 5
    assert answer.json()["error"]["code"] == "engine_restarting"
    assert time.monotonic() - killed < 10  # answered at once, not after a timeout

    ready = wait_for(lambda: httpx.get(sglang_server.url + "/ready"), lambda r: r.status_code == 503, 5)
    assert ready.json()["error"]["code"] == "engine_restarting"
    with pytest.raises(openai.InternalServerError) as err:
        image(client)
    assert err.value.status_code == 503 and err.value.response.headers["retry-after"]
    assert "was killed by SIGKILL" in sglang_server.logs()

    sglang_server.wait_ready(timeout=600)
    assert len(child_pids(sglang_server)) >= 2 and not group_members(pgid)
    assert (image(client, [{"name": "style"}]) == styled).all()  # the new child loads the adapter again
    assert (image(client, []) == base).all()


def test_sigterm_drains_then_stops_the_child_group(sglang_server):
    pgid = child_pids(sglang_server)[-1]
    assert group_members(pgid)
    with ThreadPoolExecutor(1) as pool:
        running = in_flight(sglang_server, LONG, pool)
        sglang_server.signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(sglang_server.url + "/ready").status_code == 503
        assert running.result().status_code == 200  # the request in flight finished
    assert sglang_server.proc.wait(60) == 0
    assert not wait_group_gone(pgid, 5), "the SGLang child group outlived the server"
    assert "stopping sglang" in sglang_server.logs()


@pytest.fixture
def kontext_model() -> Path:
    """The demo weights as a FluxKontextPipeline: a model with SGLang's image-edit task (TI2I)."""
    from diffusers import FluxKontextPipeline, FluxPipeline

    from server.engines.demos import demo_model_path
    from tests.support.server import CACHE_DIR

    path = CACHE_DIR / "flux-kontext-tiny"
    if not (path / "model_index.json").exists():
        FluxKontextPipeline.from_pipe(FluxPipeline.from_pretrained(demo_model_path(CACHE_DIR))).save_pretrained(path)
    return path


def test_edits_go_to_sglang_images_edits(sglang_bin, kontext_model):
    """Edits through SGLang's /v1/images/edits. SGLang 0.5.23 has no native tiny edit model, so this is the
    Kontext copy on SGLang's diffusers backend under FLUX.2's task type; runs after the module's server stopped."""
    srv = ServerProcess(
        {
            "ENGINE": "sglang",
            "SGLANG_BIN": sglang_bin,
            "MODEL_PATH": str(kontext_model),
            "SGLANG_MODEL_ID": "FLUX.2-dev",
            "SGLANG_ARGS": "--backend diffusers --warmup-mode off",
        }
    ).start(wait=False)
    try:
        srv.wait_ready(timeout=900)
        client = srv.client(max_retries=0, timeout=300)

        def edit(source, n=1):
            result = client.images.edit(
                image=("in.png", png_bytes(source), "image/png"),
                prompt="make it blue",
                n=n,
                output_format="png",
                extra_body={"seed": 5, "num_inference_steps": 2},
            )
            return seeds_and_pixels(result)

        seeds, (first,) = edit(gradient(256, 256))
        assert seeds == [5] and (edit(gradient(256, 256))[1][0] == first).all()
        assert np.abs(edit(gradient(256, 256).rotate(90))[1][0] - first).mean() > 0.1  # the input image is used
        seeds, pair = edit(gradient(256, 256), n=2)
        assert seeds == [5, 6] and (pair[0] != pair[1]).any()
    finally:
        srv.stop()
    assert srv.proc.returncode == 0
    for pgid in child_pids(srv):
        assert not wait_group_gone(pgid, 20)


def test_sglang_compare_tool_runs_and_reports(sglang_bin, tmp_path):
    """bench/sglang_compare.py on a tiny workload: it runs all three sides and reports (no timing asserted)."""
    out = tmp_path / "compare"
    command = [
        sys.executable,
        "bench/sglang_compare.py",
        "--size",
        "64x64",
        "--steps",
        "2",
        "--requests",
        "2",
        "--clients",
        "1",
        "--repeat",
        "1",
        "--out",
        str(out),
    ]
    done = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "SGLANG_BIN": sglang_bin}, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "sglang_compare.json").read_text())
    assert result["sglang_version"] == "0.5.23"
    row = result["rows"][0]
    for side in ("image-server (diffusers) img/s", "sglang direct img/s", "image-server -> sglang img/s"):
        assert row[side] > 0
