"""plugins/lora/__init__.py in process: the real app and LoRA plugin around the fake engine, whose LoRA sets go
into a real demo pipeline through `LoRAMerger` (the fake's images ignore them): where files are read, what a
caller learns when one disappears, names."""

import asyncio
import threading

import pytest
from starlette.requests import Request

from plugins.lora import LoRAPlugin
from plugins.lora.merge import LoRAMerger
from server import lora
from server.config import from_env
from server.errors import APIError
from tests.support.demo import demo_pipeline, write_loras
from tests.support.fakes import FakeEngine, InProcess
from tests.support.images import assert_openai_shape
from tests.support.loras import dtype_lora, metadata_lora, peft_lora
from tests.support.waiting import until


@pytest.fixture
def folder(tmp_path):
    return write_loras(tmp_path / "loras")


@pytest.fixture
def app(folder):
    engine = FakeEngine()
    engine.lora_applier = LoRAMerger(demo_pipeline())
    with InProcess(engine, plugins="lora", lora_dir=folder, max_batch=1) as running:
        yield running


def generate(app, loras, prompt="a fox"):
    return app.http.post("/v1/images/generations", json={"prompt": prompt, "size": "64x64", "loras": loras})


def upload(app, source, filename=None, name=None):
    files = {"file": (filename or source.name, source.read_bytes())}
    return app.http.post("/v1/loras", files=files, data={"name": name} if name else {})


def test_the_engine_thread_reads_no_lora_file(app, tmp_path, monkeypatch):
    """Rule 1: every file of a request is read and checked in a worker before the request queues (and an
    upload's in a worker too); the engine thread only takes what was parsed. Before: all on the engine thread."""
    readers: list[str] = []
    real = lora.load_file
    monkeypatch.setattr(lora, "load_file", lambda path: readers.append(threading.current_thread().name) or real(path))
    assert generate(app, [{"name": "style"}, {"name": "detail", "weight": 0.5}]).status_code == 200
    assert generate(app, [{"name": "grain"}]).status_code == 200
    assert upload(app, peft_lora(tmp_path / "new.safetensors", seed=4)).status_code == 200
    assert len(readers) == 4 and not [name for name in readers if name.startswith("engine")]
    assert app.engine.lora_applier.applied  # the sets were applied, from what the workers parsed


def test_a_lora_deleted_while_its_request_waits_is_a_400_naming_it_not_its_path(app, folder):
    """Before: `[Errno 2] No such file or directory: '/.../loras/victim.safetensors'`."""
    peft_lora(folder / "victim.safetensors", seed=5)
    app.engine.gate.clear()
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", generate(app, [], "hold")))
    first.start()
    app.engine.entered.acquire(timeout=10)
    queued = threading.Thread(target=lambda: results.setdefault("queued", generate(app, [{"name": "victim"}])))
    queued.start()
    until(lambda: app.service.scheduler.depth == 1)
    assert app.http.delete("/v1/loras/victim").json()["deleted"] is True
    app.engine.gate.set()
    first.join(10)
    queued.join(10)
    error = assert_openai_shape(results["queued"].json())
    assert results["queued"].status_code == 400 and error["code"] == "lora_invalid" and error["param"] == "loras"
    assert "'victim' was deleted" in error["message"] and str(folder) not in error["message"]
    assert generate(app, [{"name": "style"}]).status_code == 200  # the server goes on


@pytest.mark.parametrize(
    ("filename", "name", "status", "said"),
    [
        ("a.safetensors", "Style", 409, "named 'style' exists (names are unique ignoring case)"),
        ("a.safetensors", "STYLE", 409, "named 'style' exists"),
        ("a.safetensors", "style.", 400, "not ending in '.'"),
        ("a.safetensors", "x.safetensors.safetensors", 400, "not a valid LoRA name"),
        ("Shiny.SafeTensors", None, 200, "Shiny"),
        ("a.bin", "calm.safetensors", 200, "calm"),
    ],
)
def test_lora_names_are_unambiguous(app, folder, filename, name, status, said):
    """Before: `Style`, `STYLE` and `style.` sat beside `style`, and `x.SAFETENSORS` became
    `x.SAFETENSORS.safetensors`."""
    response = upload(app, folder / "grain.safetensors", filename, name)
    assert response.status_code == status, response.text
    if status == 200:
        assert response.json()["id"] == said and (folder / f"{said}.safetensors").is_file()
        return
    assert said in assert_openai_shape(response.json())["message"]
    assert sorted(p.name for p in folder.iterdir()) == ["detail.safetensors", "grain.safetensors", "style.safetensors"]


def test_an_upload_past_the_header_bounds_or_of_integers_is_a_400_naming_why(app, tmp_path):
    for path, why in [
        (metadata_lora(tmp_path / "chatty.safetensors", 3 * 2**20), "more than the 2 MiB this server reads"),
        (dtype_lora(tmp_path / "ints.safetensors", "I32"), "holds I32 values"),
    ]:
        response = upload(app, path)
        error = assert_openai_shape(response.json())
        assert response.status_code == 400 and error["code"] == "lora_invalid" and why in error["message"]


def test_an_upload_while_the_model_loads_is_a_503(tmp_path):
    """The routes are up before the engine has loaded: an upload then is refused, not a 500."""
    plugin = LoRAPlugin(from_env(lora_dir=tmp_path))
    request = Request({"type": "http", "method": "POST", "path": "/v1/loras", "headers": []})
    with pytest.raises(APIError) as refused:
        asyncio.run(plugin.upload(request))
    assert (refused.value.status, refused.value.code) == (503, "model_loading")
