"""The GPU fast paths through the real server on a machine without a GPU: the refusals and the fallback a CPU
machine gets, and torch.compile with weighted LoRA sets switching. Their decisions and each path on its own
are tested in process (tests/unit/test_fastpath.py, test_nunchaku_*.py, test_lora_hotswap.py)."""

import re

import httpx
import numpy as np
import pytest
import torch

from server.engines.fastpath import FastOptions, accelerate
from tests.support.demo import demo_pipeline, lora_sets, render, slot, switch, write_loras
from tests.support.images import decode_b64, pixels
from tests.support.nunchaku import svdq_file, unrelated_package
from tests.support.server import ServerProcess


@pytest.fixture
def int4_file(tmp_path):
    return svdq_file(tmp_path / "svdq-int4_r32-flux.1-dev.safetensors", "int4")


@pytest.fixture
def lora_dir(tmp_path):
    return write_loras(tmp_path / "loras")


def exits_with(env: dict[str, str], *expected: str) -> str:
    srv = ServerProcess(env)
    srv.start(wait=False)
    try:
        assert srv.proc.wait(120) == 1
    finally:
        srv.stop()
    logs = srv.logs()
    for text in expected:
        assert text in logs, logs
    return logs


def test_fp8_on_a_cpu_machine_refuses_to_start_with_the_reason():
    exits_with({"FP8": "1"}, "FP8 needs an NVIDIA GPU of compute capability 8.9 or newer", "no CUDA GPU")


@pytest.mark.parametrize("backend", ["_flash_3", "flash"])
def test_an_attention_kernel_that_cannot_run_is_refused(backend):
    """FlashAttention 3 is not installed here, and flash (FlashAttention 4 or flash-attn 2) needs a GPU: refused with
    why."""
    exits_with({"ATTENTION": backend}, f"ATTENTION={backend} cannot run here")


def test_nunchaku_on_a_cpu_machine_refuses_and_names_the_unrelated_package(tmp_path, int4_file):
    site = unrelated_package(tmp_path / "site")
    exits_with(
        {"NUNCHAKU_TRANSFORMER": str(int4_file), "PYTHONPATH": str(site)},
        "this machine has no CUDA GPU",
        "unrelated PyPI library",
    )


def test_nunchaku_fallback_fp8_on_a_cpu_machine_is_refused_saying_why(int4_file):
    exits_with(
        {"NUNCHAKU_TRANSFORMER": str(int4_file), "NUNCHAKU_FALLBACK": "fp8"},
        "FP8 needs an NVIDIA GPU",
        "[fallback: fp8 (NUNCHAKU_FALLBACK): this machine has no CUDA GPU",
    )


def test_nunchaku_fallback_bf16_serves_and_says_so(make_server, int4_file):
    srv = make_server({"NUNCHAKU_TRANSFORMER": str(int4_file), "NUNCHAKU_FALLBACK": "bf16"})
    engine = httpx.get(srv.url + "/v1/models").json()["data"][0]["engine"]
    assert engine["fallback"].startswith("bf16 (NUNCHAKU_FALLBACK): this machine has no CUDA GPU")
    assert {"precision", "attention", "compile", "cache", "offload", "gpu"} <= set(engine)
    result = srv.client(max_retries=0).images.generate(
        prompt="x", size="256x256", extra_body={"num_inference_steps": 2}
    )
    assert decode_b64(result.data[0].b64_json).size == (256, 256)
    assert "NUNCHAKU_FALLBACK=bf16" in srv.logs() and "engine path:" in srv.logs()


@pytest.mark.slow
def test_compiled_transformer_switches_weighted_lora_sets_without_recompiling(make_server, lora_dir):
    """COMPILE=1 with the lora plugin: the hot-swapped slot, torch.compile(fullgraph). After the
    warm-up compiled the graph, five requests switch between sets of 0, 3 and 1 weighted LoRAs; torch logs no
    recompile (TORCH_LOGS=recompiles), and each image equals the one the eager merging server makes."""
    env = {"PLUGINS": "lora", "LORA_DIR": str(lora_dir), "DEFAULT_SIZE": "256x256", "LORA_HOTSWAP_RANK": "16"}
    compiled = make_server({**env, "COMPILE": "1", "TORCH_LOGS": "recompiles"})
    eager = make_server(env)
    engine = httpx.get(compiled.url + "/v1/models").json()["data"][0]["engine"]
    assert engine["compile"] == "torch.compile mode=default fullgraph=True blocks"  # QKV unfused under a LoRA slot
    assert engine["lora"] == "hot-swapped into a slot of rank 16"
    warm_logs = len(compiled.logs())

    def image(srv, entries):
        body = {"num_inference_steps": 2, "seed": 4, "loras": [{"name": p.stem, "weight": w} for p, w in entries]}
        result = srv.client(max_retries=0).images.generate(
            prompt="a fox", size="256x256", output_format="png", extra_body=body
        )
        return pixels(decode_b64(result.data[0].b64_json))

    base = None
    for entries in lora_sets(lora_dir):
        got, expected = image(compiled, entries), image(eager, entries)
        assert np.abs(got - expected).max() <= 2, entries
        base = got if base is None else base
        assert (np.abs(got - base).mean() > 1) == bool(entries)
    after_warmup = compiled.logs()[warm_logs:]
    assert "hot-swapped" in after_warmup
    assert not re.search(r"[Rr]ecompil", after_warmup), after_warmup
    # The detector is live: a new image size does recompile, and torch says so in the log.
    compiled.client(max_retries=0).images.generate(prompt="x", size="128x128", extra_body={"num_inference_steps": 2})
    assert "Recompiling function" in compiled.logs()[warm_logs:]


# -- torch.compile in this process (slow: each compiles graphs) ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_fp8_compile_and_lora_slot_switch_sets_without_recompiling(lora_dir, scope):
    """The Hopper recipe's order on the CPU: FP8 linears, the LoRA slot on top, torch.compile(fullgraph) per
    repeated block or of the whole model, then sets switching. Stand-in as above: Float8WeightOnlyConfig for the
    dynamic FP8 config torchao refuses here. Counted by dynamo itself: no new graph through any switch."""
    pytest.importorskip("torchao")
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torchao.quantization import Float8WeightOnlyConfig

    torch._dynamo.reset()
    counters.clear()
    pipe = demo_pipeline(torch.bfloat16)
    options = FastOptions(fp8=True, compile=True, compile_scope=scope)
    info, applier = accelerate(pipe, options, None, torch.bfloat16, slot(pipe), Float8WeightOnlyConfig())
    suffix = " blocks" if scope == "blocks" else ""
    assert info["compile"] == "torch.compile mode=default fullgraph=True" + suffix
    try:
        base = render(pipe)
        graphs = counters["stats"]["unique_graphs"]
        # The whole model: one graph. Per block: one per block class (at most one more for the first single
        # block's input strides), however many blocks of each class there are.
        assert graphs == 1 if scope == "model" else 2 <= graphs <= 3
        for entries in lora_sets(lora_dir)[1:]:
            switch(applier, entries)
            assert (np.abs(render(pipe) - base).mean() > 1) == bool(entries), entries
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_first_block_cache_under_per_block_compile_matches_eager():
    """CACHE_THRESHOLD with COMPILE (per block, the default): the cache's hooks graph-break, and the image is the
    eager cache's, not the uncached one."""
    plain, eager, compiled = demo_pipeline(), demo_pipeline(), demo_pipeline()
    accelerate(eager, FastOptions(cache_threshold=0.9), None, torch.float32)
    info, _ = accelerate(compiled, FastOptions(compile=True, cache_threshold=0.9), None, torch.float32)
    assert info["compile"] == "torch.compile mode=default fullgraph=False blocks fused-qkv"
    try:
        got = render(compiled, steps=4).astype(float)
        assert np.abs(got - render(eager, steps=4)).mean() < 0.05
        assert np.abs(got - render(plain, steps=4)).mean() > 0.2
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_a_restart_with_the_compile_cache_compiles_nothing(make_server, tmp_path):
    """COMPILE_CACHE_DIR (a volume that outlives the pod): the first start compiles and saves the artefacts; the
    next, in a new pod whose own caches are empty (a fresh TORCHINDUCTOR_CACHE_DIR), loads them and compiles
    nothing: Inductor's own counters, shown in /v1/models."""

    def start() -> dict:
        env = {"COMPILE": "1", "COMPILE_CACHE_DIR": str(tmp_path / "volume"), "DEFAULT_SIZE": "64x64",
               "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"pod-{len(list(tmp_path.iterdir()))}")}  # fmt: skip
        srv = make_server(env)
        engine = httpx.get(srv.url + "/v1/models").json()["data"][0]["engine"]
        srv.stop()
        return engine["compile_cache"]

    first, second = start(), start()
    assert first["compiled"] > 0 and first["from_cache"] == 0
    assert second["compiled"] == 0 and second["from_cache"] == first["compiled"]
