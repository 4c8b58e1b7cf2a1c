"""LoRA files as untrusted input, through the real server (issue 20: rules 1 and 7; issue 21: names).

One fp16 server (the dtype where a finite LoRA overflows soonest) with a LORA_DIR holding what an admin may put
there: a file with megabytes of training metadata, one whose merged weights leave fp16, one deleted while its
request waits. Each is answered with a 400 naming the LoRA, never a path, a stall or a black image.
"""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.lora import FLOAT_DTYPES
from tests.support.images import assert_openai_shape, decode_b64, pixels
from tests.support.loras import SAFETENSORS_DTYPES, dtype_lora, metadata_lora, peft_lora, scaled_lora
from tests.support.waiting import until

SMALL = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 2, "seed": 4, "output_format": "png"}
LONG = {"prompt": "long", "size": "1024x1024", "num_inference_steps": 28}  # ~7 s on the 2-core demo


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    peft_lora(d / "style.safetensors", seed=1)
    metadata_lora(d / "chatty.safetensors", 3 * 2**20)  # parsed on the engine thread before (90 MB froze it 22 s)
    scaled_lora(d / "loud.safetensors", 200)  # finite; at weight 10 its fp16 merge was inf: a black image
    return d


@pytest.fixture(scope="module")
def srv(folder):
    from tests.support.server import ServerProcess

    proc = ServerProcess({"PLUGINS": "lora", "LORA_DIR": str(folder), "DTYPE": "fp16", "MAX_BATCH": "1"}).start()
    yield proc
    proc.stop()


def post(srv, body: dict, loras: list) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/images/generations", json={**body, "loras": loras}, timeout=120)


def refusal(response: httpx.Response, folder) -> str:
    error = assert_openai_shape(response.json())
    assert response.status_code == 400 and error["code"] == "lora_invalid", response.text
    assert str(folder) not in error["message"] and "Errno" not in error["message"]
    return error["message"]


def test_while_a_generation_runs_bad_files_are_refused_at_once_and_a_deleted_one_names_no_path(srv, folder):
    """Before: `chatty` queued behind the running generation and was parsed on the engine thread (the whole
    server stalled while safetensors read its header); `victim`, deleted while it waited, answered
    `[Errno 2] No such file or directory: '/.../victim.safetensors'`."""
    peft_lora(folder / "victim.safetensors", seed=2)
    before = pixels(decode_b64(post(srv, SMALL, []).json()["data"][0]["b64_json"]))
    health: list[float] = []
    with ThreadPoolExecutor(3) as pool:
        long = pool.submit(post, srv, LONG, [{"name": "style"}])
        until(lambda: srv.metric("image_server_in_flight") >= 1)
        chatty = post(srv, SMALL, [{"name": "chatty"}])
        assert not long.done()  # refused while the generation still runs: nothing waited for the engine
        assert "'chatty' cannot be applied" in refusal(chatty, folder) and "more than the 2 MiB" in chatty.text
        victim = pool.submit(post, srv, SMALL, [{"name": "victim"}])
        until(lambda: srv.metric("image_server_queue_depth") >= 1)
        assert httpx.delete(f"{srv.url}/v1/loras/victim").status_code == 200
        while not long.done():
            started = time.monotonic()
            assert httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
            health.append(time.monotonic() - started)
        assert long.result().status_code == 200
        assert "'victim' was deleted" in refusal(victim.result(), folder)
    after = pixels(decode_b64(post(srv, SMALL, []).json()["data"][0]["b64_json"]))
    assert (before == after).all()  # the model exact: same seed, same bytes
    print(f"/health during the run: worst {max(health) * 1000:.0f} ms of {len(health)}")


def test_a_lora_that_would_merge_to_inf_is_a_400_naming_it_not_a_black_image(srv, folder):
    message = refusal(post(srv, SMALL, [{"name": "loud", "weight": 10}]), folder)
    assert "'loud' cannot be applied" in message and "float16 weights would overflow" in message
    assert post(srv, SMALL, [{"name": "style", "weight": 0.5}]).status_code == 200


def test_uploads_of_every_dtype_are_read_or_refused_by_name_never_a_500(srv, tmp_path):
    for dtype in SAFETENSORS_DTYPES:
        path = dtype_lora(tmp_path / f"dt-{dtype.lower().replace('_', '-')}.safetensors", dtype)
        response = httpx.post(f"{srv.url}/v1/loras", files={"file": (path.name, path.read_bytes())}, timeout=60)
        if dtype in FLOAT_DTYPES:
            assert response.status_code == 200, (dtype, response.text)
        else:
            assert response.status_code == 400 and f"holds {dtype} values" in response.text, (dtype, response.text)


def test_upload_names_are_unambiguous(srv, folder):
    source = (folder / "style.safetensors").read_bytes()

    def upload(filename: str) -> httpx.Response:
        return httpx.post(f"{srv.url}/v1/loras", files={"file": (filename, source)}, timeout=60)

    assert upload("Mood.SAFETENSORS").json()["id"] == "Mood"  # was 'Mood.SAFETENSORS.safetensors'
    assert upload("MOOD.safetensors").status_code == 409  # differs only by case
    assert upload("mood..safetensors").status_code == 400  # 'mood.': a trailing dot
    assert sorted(p.name for p in folder.glob("*ood*")) == ["Mood.safetensors"]
