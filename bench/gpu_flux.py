"""GPU benchmark: FLUX.1-dev at full size, random weights, on every path this GPU supports.

No weights can be downloaded on the benchmark machines, and the compute does not
depend on the values: the pipeline is built from FLUX.1-dev's real configs
(written below: the 12B transformer, the VAE, CLIP-L and T5-XXL text encoders)
with random weights. Only the tokenizers are the demo model's small trained
ones: their token ids fit the real vocabularies and T5 still encodes the full
512 tokens, so the text encoders do the same work.

Each path runs in a child process (clean GPU memory, compile caches and
attention settings), as one row per variant:

  diffusers-bf16           plain FluxPipeline, no server; LoRAs as PEFT adapters (set_adapters)
  server-bf16              image-server through HTTP, no plugins
  server-bf16-lora         ... PLUGINS=lora (weights merged per set)
  server-fp8-compile       FP8=1 COMPILE=1 (compute capability >= 8.9)
  server-fp8-compile-lora  ... PLUGINS=lora (the hot-swapped LoRA slot)
  server-fp8-compile-model ... COMPILE_SCOPE=model (one graph of the whole transformer, not per block)
  server-nunchaku          NUNCHAKU_TRANSFORMER (Turing/Ampere/Ada/RTX 50xx, the real wheel, a real svdq file)
  server-nunchaku-lora     ... PLUGINS=lora (compose_lora)
  server-bf16-concurrency  1 and 4 closed-loop clients, MAX_BATCH=4 and 1: images/s, p50, p95

LoRA variants: the plugin enabled with no LoRA; 3 weighted LoRAs (random, rank
16, FLUX attention and MLP layers); the set switching between requests. The
server runs in the child process with the random pipeline handed to the
engine in place of reading MODEL_PATH (`DiffusersEngine(build=...)`); all the
rest (fast paths, LoRA plugin, HTTP, encoding) is the real server.

Figures: s/image = median wall time of a 1024x1024, 28-step request; ms/step =
(median at 28 steps - median at 8 steps) / 20, the marginal cost of a step;
peak GPU memory during the requests; ready = server start to /ready with the
weights already in memory (fast-path setup, compile and warm-up included).

Usage, on a GPU machine (on an H100 the first command takes 6 minutes; each FP8 one 6 to 10, most of it compiling):
  python bench/gpu_flux.py --paths diffusers-bf16,server-bf16,server-bf16-lora
  python bench/gpu_flux.py --paths server-fp8-compile
  python bench/gpu_flux.py --paths server-fp8-compile-lora
  python bench/gpu_flux.py --paths server-fp8-compile-model
  python bench/gpu_flux.py --paths server-nunchaku,server-nunchaku-lora --nunchaku-transformer /models/svdq-...
  python bench/gpu_flux.py --quick --compile-cache /tmp/cc   # the main paths in ~9 minutes (bench/gpu_carry.sh)
  python bench/gpu_flux.py --tiny --out /tmp/bench     # CPU smoke test at the demo model's size (CI runs it)
Results accumulate in OUT/gpu_flux.json (per GPU and path); the section "GPU (bench/gpu_flux.py)" of
OUT/BENCHMARKS.md is rewritten from it (OUT defaults to docs/). Each child's log and the LoRA files go to
--work (default /tmp/gpu_flux).
"""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTION = "## GPU (bench/gpu_flux.py)"
PATHS = (
    "diffusers-bf16",
    "server-bf16",
    "server-bf16-lora",
    "server-fp8-compile",
    "server-fp8-compile-lora",
    "server-fp8-compile-model",
    "server-nunchaku",
    "server-nunchaku-lora",
    "server-bf16-concurrency",
)
# --quick: the main paths in about 9 minutes on an H100/H200 (a 15-minute GPU window covers a rerun)
QUICK_PATHS = ("server-bf16-lora", "server-fp8-compile-lora", "server-bf16-concurrency")
LABELS = {
    "diffusers-bf16": "diffusers bf16",
    "server-bf16": "image-server bf16 (HTTP)",
    "server-bf16-lora": "image-server bf16 (HTTP)",
    "server-fp8-compile": "image-server FP8 + compile (HTTP)",
    "server-fp8-compile-lora": "image-server FP8 + compile (HTTP)",
    "server-fp8-compile-model": "image-server FP8 + compile of the whole model (HTTP)",
    "server-nunchaku": "image-server Nunchaku 4-bit (HTTP)",
    "server-nunchaku-lora": "image-server Nunchaku 4-bit (HTTP)",
    "server-bf16-concurrency": "image-server bf16, concurrent clients (HTTP)",
}
REFERENCES = [
    ("xDiT, torch.compile", "4.30 s"),
    ("Hugging Face LoRA recipe: hotswap + compile + FP8", "3.55 s"),
    ("Replicate", "3.03 s"),
    ("SGLang CI", "about 129 ms per step"),
]
PROMPT = "a lighthouse on a cliff at dawn, volumetric light, detailed photograph"

# FLUX.1-dev's configs (black-forest-labs/FLUX.1-dev: transformer/, vae/, text_encoder/, text_encoder_2/, scheduler/).
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_DEV_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
    force_upcast=True,
)
FLUX_DEV_CLIP = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    vocab_size=49408,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
FLUX_DEV_T5 = dict(
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    vocab_size=32128,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
)
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
)


class Scale:
    """The full benchmark, or the CPU smoke test at the demo model's size."""

    def __init__(self, tiny: bool, quick: bool = False) -> None:
        self.tiny = tiny
        self.size = 128 if tiny else 1024
        self.steps = 4 if tiny else 28
        self.short_steps = 2 if tiny else 8
        self.repeats = 1 if tiny else 2 if quick else 3
        self.lora_rank = 4 if tiny else 16
        self.per_client = 2 if tiny or quick else 4  # requests each concurrent client sends


# -- the model ---------------------------------------------------------------------------------


def build_pipeline(tiny: bool, dtype, device, **components):
    """FLUX.1-dev-shaped FluxPipeline with random weights (the demo model with --tiny); `components` replace parts."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from server.engines.demos import flux1
    from server.engines.demos.tokenizers import clip_tokenizer, t5_tokenizer

    if tiny:
        pipe = flux1.build()
        for name, component in components.items():
            setattr(pipe, name, component)
        return pipe.to(device=device, dtype=dtype)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16, on the GPU: fp32 first would need 2x the memory
    try:
        with torch.device(device):
            parts = {
                "transformer": lambda: FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER),
                "vae": lambda: AutoencoderKL(**FLUX_DEV_VAE),
                "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**FLUX_DEV_CLIP)),
                "text_encoder_2": lambda: T5EncoderModel(T5Config(**FLUX_DEV_T5)),
            }
            built = {name: components[name] if name in components else make() for name, make in parts.items()}
    finally:
        torch.set_default_dtype(previous)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        tokenizer=clip_tokenizer(),
        tokenizer_2=t5_tokenizer(),
        **built,
    )
    return pipe.to(device)


def write_loras(pipe, folder: Path, rank: int) -> list[Path]:
    """Three random LoRAs in diffusers' key format on FLUX's attention and MLP layers."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, name in enumerate(("style", "detail", "grain")):
        g = torch.Generator().manual_seed(seed)
        state = {}
        for module, layer in pipe.transformer.named_modules():
            if isinstance(layer, torch.nn.Linear) and module.endswith(LORA_TARGETS) and "blocks." in module:
                state[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.01
                state[f"transformer.{module}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.01
        path = folder / f"{name}.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path))
        paths.append(path)
    return paths


THREE = [("style", 1.0), ("detail", 0.7), ("grain", 0.5)]
SWITCHING = [THREE, [("detail", 0.8)], [], [("style", 0.6), ("grain", 1.0)]]


# -- measuring -----------------------------------------------------------------------------------


class Meter:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**30, 2)

    def time(self, run) -> float:
        self.sync()
        started = time.perf_counter()
        run()
        self.sync()
        return time.perf_counter() - started


def row(path: str, variant: str, long: list[float], short: list[float], scale: Scale, meter: Meter, **extra) -> dict:
    per_image = statistics.median(long)
    per_step = None
    if short:
        per_step = (per_image - statistics.median(short)) / (scale.steps - scale.short_steps)
    return {
        "path": path,
        "label": LABELS[path],
        "variant": variant,
        "s_per_image": round(per_image, 3),
        "ms_per_step": round(per_step * 1000, 1) if per_step is not None else None,
        "peak_gib": meter.peak_gib(),
        "images": len(long),
        **extra,
    }


def steady(run_at, scale: Scale) -> tuple[list[float], list[float]]:
    """Timed runs at full and short step counts, after one warm-up at full steps."""
    run_at(scale.steps)
    long = [run_at(scale.steps) for _ in range(scale.repeats)]
    short = [run_at(scale.short_steps) for _ in range(max(1, scale.repeats - 1))]
    return long, short


# -- path: plain diffusers ------------------------------------------------------------------------


def bench_diffusers(scale: Scale, device, dtype, meter: Meter, lora_dir: Path) -> list[dict]:
    import torch

    started = time.perf_counter()
    pipe = build_pipeline(scale.tiny, dtype, device)
    pipe.set_progress_bar_config(disable=True)
    ready = time.perf_counter() - started

    def run_at(steps: int) -> float:
        generator = torch.Generator("cpu").manual_seed(0)
        call = dict(prompt=PROMPT, height=scale.size, width=scale.size, num_inference_steps=steps, generator=generator)
        with torch.inference_mode():
            return meter.time(lambda: pipe(guidance_scale=3.5, **call))

    rows = []
    meter.reset_peak()
    long, short = steady(run_at, scale)
    rows.append(row("diffusers-bf16", "no LoRA", long, short, scale, meter, ready_s=round(ready, 1)))
    for name, _ in THREE:
        pipe.load_lora_weights(str(lora_dir / f"{name}.safetensors"), adapter_name=name)
    pipe.set_adapters([n for n, _ in THREE], adapter_weights=[w for _, w in THREE])
    meter.reset_peak()
    long, short = steady(run_at, scale)
    rows.append(row("diffusers-bf16", "3 LoRAs (PEFT adapters)", long, short, scale, meter))

    def switch_and_run(entries) -> float:
        def go():
            if entries:
                pipe.enable_lora()
                pipe.set_adapters([n for n, _ in entries], adapter_weights=[w for _, w in entries])
            else:
                pipe.disable_lora()
            run_at(scale.steps)

        return meter.time(go)

    for entries in SWITCHING:
        switch_and_run(entries)
    meter.reset_peak()
    long = [switch_and_run(entries) for entries in SWITCHING]
    rows.append(row("diffusers-bf16", "LoRA set switching (set_adapters)", long, [], scale, meter))
    return rows


# -- paths: the server through HTTP ------------------------------------------------------------------


def server_settings(path: str, scale: Scale, model_dir: Path, lora_dir: Path, args) -> dict:
    overrides = dict(
        model=str(model_dir),
        max_batch=1,
        default_size=f"{scale.size}x{scale.size}",
        max_pixels=max(2048 * 2048, scale.size * scale.size),
        cache_dir=Path(tempfile.mkdtemp(prefix="gpu-flux-cache-")),
    )
    if path.endswith("-lora"):
        overrides.update(plugins="lora", lora_dir=lora_dir)
    if "fp8-compile" in path:
        overrides.update(fp8=True, compile=True, compile_mode=args.compile_mode)
    if path.endswith("-model"):
        overrides.update(compile_scope="model")
    if "nunchaku" in path:
        overrides.update(nunchaku_transformer=args.nunchaku_transformer)
    if args.compile_cache:
        overrides.update(compile_cache_dir=Path(args.compile_cache))
    return overrides


class InProcessServer:
    """image-server in this process (uvicorn in a thread), its engine handed the prebuilt random pipeline."""

    def __init__(self, settings, build) -> None:
        import uvicorn

        from bench.harness import free_port
        from server.app import create_app
        from server.engines.diffusers import DiffusersEngine

        engine = DiffusersEngine(settings, build=lambda path, dtype, **components: build(dtype, **components))
        self.app = create_app(settings, engine=engine)
        self.failed: list[str] = []
        self.app.state.on_fatal = lambda: self.failed.append("the model failed to load (see the log above)")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_config=None, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 3000) -> float:
        import httpx

        started = time.perf_counter()
        self.thread.start()
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.failed:
                raise SystemExit(self.failed[0])
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"server not ready after {timeout}s")

    def engine_info(self) -> dict:
        import httpx

        return httpx.get(self.url + "/v1/models", timeout=30).json()["data"][0]["engine"]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(120)


def bench_server(path: str, scale: Scale, device, dtype, meter: Meter, lora_dir: Path, args) -> list[dict]:
    import httpx

    from server.config import from_env

    model_dir = Path(tempfile.mkdtemp(prefix="gpu-flux-model-"))
    (model_dir / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')  # MODEL_PATH must look like one
    settings = from_env(**server_settings(path, scale, model_dir, lora_dir, args))
    srv = InProcessServer(settings, lambda dt, **components: build_pipeline(scale.tiny, dt, device, **components))
    ready = srv.start()
    info = srv.engine_info()
    client = httpx.Client(base_url=srv.url, timeout=3600)

    def request(steps: int, loras=None) -> float:
        body = {"prompt": PROMPT, "size": f"{scale.size}x{scale.size}", "num_inference_steps": steps, "seed": 1}
        if loras is not None:
            body["loras"] = [{"name": n, "weight": w} for n, w in loras]

        def post():
            response = client.post("/v1/images/generations", json=body)
            response.raise_for_status()

        return meter.time(post)

    described = {k: info.get(k) for k in ("precision", "attention", "compile", "cache", "lora", "fallback")}
    rows = []
    try:
        if not path.endswith("-lora"):
            meter.reset_peak()
            long, short = steady(request, scale)
            return [row(path, "no LoRA", long, short, scale, meter, ready_s=round(ready, 1), engine=described)]
        meter.reset_peak()
        long, short = steady(lambda steps: request(steps, []), scale)
        rows.append(
            row(path, "LoRA plugin, no LoRA", long, short, scale, meter, ready_s=round(ready, 1), engine=described)
        )
        meter.reset_peak()
        long, short = steady(lambda steps: request(steps, THREE), scale)
        rows.append(row(path, "3 LoRAs", long, short, scale, meter))
        for entries in SWITCHING:  # first use of each set: files read and parsed once
            request(scale.steps, entries)
        meter.reset_peak()
        long = [request(scale.steps, entries) for entries in SWITCHING]
        rows.append(row(path, "LoRA set switching", long, [], scale, meter))
        return rows
    finally:
        client.close()
        srv.stop()


def bench_concurrency(scale: Scale, device, dtype, meter: Meter, lora_dir: Path, args) -> list[dict]:
    """images/s and latency percentiles with 1 and 4 closed-loop clients, batching on (MAX_BATCH=4) and off."""
    from server.config import from_env

    rows = []
    for batch in (4, 1):
        model_dir = Path(tempfile.mkdtemp(prefix="gpu-flux-model-"))
        (model_dir / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
        overrides = {**server_settings("server-bf16", scale, model_dir, lora_dir, args), "max_batch": batch}
        srv = InProcessServer(from_env(**overrides), lambda dt, **c: build_pipeline(scale.tiny, dt, device, **c))
        srv.start()
        try:
            for clients in (1, 4):
                rows.append(concurrent_row(srv.url, scale, clients, batch))
        finally:
            srv.stop()
    return rows


def concurrent_row(url: str, scale: Scale, clients: int, batch: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    body = {"prompt": PROMPT, "size": f"{scale.size}x{scale.size}", "num_inference_steps": scale.steps, "seed": 1}

    def client_loop(_) -> list[float]:
        with httpx.Client(base_url=url, timeout=3600) as client:
            times = []
            for _ in range(scale.per_client):
                started = time.perf_counter()
                client.post("/v1/images/generations", json=body).raise_for_status()
                times.append(time.perf_counter() - started)
            return times

    client_loop(0)  # warm-up at this size
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(t for times in pool.map(client_loop, range(clients)) for t in times)
    wall = time.perf_counter() - started
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    return {
        "path": "server-bf16-concurrency",
        "label": LABELS["server-bf16-concurrency"],
        "variant": f"{clients} client{'s' if clients > 1 else ''}, batching {'on' if batch > 1 else 'off'}",
        "s_per_image": round(statistics.median(latencies), 3),
        "ms_per_step": None,
        "peak_gib": None,
        "images_per_s": round(len(latencies) / wall, 3),
        "p95_s": round(p95, 3),
        "engine": {"MAX_BATCH": batch, "images/s": round(len(latencies) / wall, 3), "p95 s": round(p95, 3)},
    }


# -- which paths run here ------------------------------------------------------------------------------


def skip_reason(path: str, args, device) -> str | None:
    """Why this machine cannot run `path` (None: it can), by the server's own decisions."""
    import torch

    from plugins.nunchaku_flux.package import detect
    from plugins.nunchaku_flux.plan import Run, decide
    from server.config import from_env
    from server.engines.fastpath import detect_gpu, fp8_refusal

    gpu = detect_gpu(device)
    if "fp8-compile" in path:
        return fp8_refusal(gpu)
    if "nunchaku" in path:
        if not args.nunchaku_transformer:
            return "no Nunchaku transformer file given (--nunchaku-transformer); none can be downloaded here"
        settings = from_env(nunchaku_transformer=args.nunchaku_transformer)
        decision = decide(
            settings, settings.section("nunchaku"), gpu, detect(), torch.__version__, sys.version_info[:2]
        )
        return None if isinstance(decision, Run) else getattr(decision, "message", None) or decision.reason
    return None


# -- the child: one path ---------------------------------------------------------------------------------


def run_child(args) -> None:
    """One path in this process; writes {"machine", "rows"} to --result. The parent never touches the GPU."""
    import torch

    from server import logs

    logs.configure(False, "info")
    scale = Scale(args.tiny, args.quick)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    meter = Meter(cuda)
    lora_dir = Path(args.lora_dir)
    path = args.child
    reason = None if path == "machine" else skip_reason(path, args, device)
    if path == "machine":
        rows = []
    elif reason:
        rows = [{"path": path, "label": LABELS[path], "skipped": reason}]
    elif path == "diffusers-bf16":
        rows = bench_diffusers(scale, device, dtype, meter, lora_dir)
    elif path == "server-bf16-concurrency":
        rows = bench_concurrency(scale, device, dtype, meter, lora_dir, args)
    else:
        rows = bench_server(path, scale, device, dtype, meter, lora_dir, args)
    Path(args.result).write_text(json.dumps({"machine": machine(cuda, args.tiny), "rows": rows}))


def prepare_loras(scale: Scale, folder: Path) -> None:
    """The three LoRA files, written once (they need only the transformer's shapes)."""
    import torch

    if all((folder / f"{n}.safetensors").is_file() for n, _ in THREE):
        return
    from diffusers import FluxTransformer2DModel

    from server.engines.demos import flux1

    if scale.tiny:
        pipe = flux1.build()
    else:
        with torch.device("meta"):  # shapes only: no memory
            transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        pipe = type("Shapes", (), {"transformer": transformer})()
    write_loras(pipe, folder, scale.lora_rank)


# -- the parent: run paths, keep results, write the report ----------------------------------------------


def machine(cuda: bool, tiny: bool) -> dict:
    import diffusers
    import torch

    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    scale = Scale(tiny)
    return {
        "gpu": name + (", --tiny (demo-sized model)" if tiny else ""),
        "run": f"{scale.size}x{scale.size}, {scale.steps} steps, ms/step from {scale.short_steps}-step runs",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def run_paths(args) -> None:
    scale = Scale(args.tiny, args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lora_dir = work / ("loras-tiny" if args.tiny else "loras")
    prepare_loras(scale, lora_dir)
    where, _ = run_in_child("machine", args, lora_dir, work)
    everything = QUICK_PATHS if args.quick else PATHS
    wanted = everything if args.paths == "auto" else tuple(p.strip() for p in args.paths.split(",") if p.strip())
    unknown = [p for p in wanted if p not in PATHS]
    if unknown:
        raise SystemExit(f"unknown paths {unknown}; known: {', '.join(PATHS)}")
    results = load_results(out)
    for path in wanted:
        print(f"{path} ...", flush=True)
        _, rows = run_in_child(path, args, lora_dir, work)
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k != "log_tail"}), flush=True)
        record(results, where, path, rows)
        save(results, out)
    save(results, out)


def run_in_child(path: str, args, lora_dir: Path, work: Path) -> tuple[dict, list[dict]]:
    result = Path(tempfile.mkstemp(prefix="gpu-flux-", suffix=".json")[1])
    log = work / f"gpu_flux-{path}{'-tiny' if args.tiny else ''}.log"
    command = [sys.executable, __file__, "--child", path, "--result", str(result), "--lora-dir", str(lora_dir)]
    command += ["--compile-mode", args.compile_mode, "--compile-cache", args.compile_cache]
    if args.tiny:
        command.append("--tiny")
    if args.quick:
        command.append("--quick")
    if args.nunchaku_transformer:
        command += ["--nunchaku-transformer", args.nunchaku_transformer]
    with log.open("w") as sink:
        done = subprocess.run(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        if path == "machine":
            raise SystemExit(f"the machine probe failed:\n{tail}")
        return {}, [{"path": path, "label": LABELS[path], "failed": f"exit {done.returncode}", "log_tail": tail}]
    reported = json.loads(result.read_text())
    result.unlink()
    return reported["machine"], reported["rows"]


def load_results(out: Path) -> dict:
    path = out / "gpu_flux.json"
    return json.loads(path.read_text()) if path.is_file() else {"machines": {}}


def record(results: dict, where: dict, path: str, rows: list[dict]) -> None:
    entry = results["machines"].setdefault(where["gpu"], {"machine": where, "paths": {}})
    entry["machine"] = where
    entry["paths"][path] = {"measured": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}


def save(results: dict, out: Path) -> None:
    (out / "gpu_flux.json").write_text(json.dumps(results, indent=1) + "\n")
    report = out / "BENCHMARKS.md"
    if not report.is_file() and (ROOT / "docs" / "BENCHMARKS.md").is_file():
        report.write_text((ROOT / "docs" / "BENCHMARKS.md").read_text())
    text = report.read_text() if report.is_file() else "# Benchmarks\n"
    report.write_text(replace_section(text, markdown(results)))


def replace_section(text: str, section: str) -> str:
    start = text.find(SECTION)
    if start < 0:
        return text.rstrip() + "\n\n" + section
    end = text.find("\n## ", start + len(SECTION))
    return text[:start] + section + (text[end + 1 :] if end >= 0 else "")


def _cell(value, suffix: str = "") -> str:
    return "–" if value is None else f"{value}{suffix}"


def markdown(results: dict) -> str:
    lines = [
        SECTION,
        "",
        "FLUX.1-dev-shaped pipeline at full size with random weights (the real transformer, VAE, CLIP-L and T5-XXL "
        "configs; see the script's docstring), 1024x1024, 28 steps, one image per request. s/image: median wall "
        "time (through HTTP for the image-server rows, JPEG encoding included); ms/step: marginal cost of a step, "
        "(t28 - t8) / 20; peak: GPU memory during the requests; ready: start to ready with the weights in memory "
        "(compile and warm-up included).",
        "",
        "Reference points on one H100 at 1024x1024, 28 steps: "
        + "; ".join(f"{name} {value}" for name, value in REFERENCES)
        + ".",
        "",
    ]
    for gpu, entry in results.get("machines", {}).items():
        m = entry["machine"]
        lines += [
            f"### {gpu}" + (f" (compute capability {m['capability']})" if m.get("capability") else ""),
            "",
            f"{m['run']}; torch {m['torch']}, diffusers {m['diffusers']}, Python {m['python']}.",
            "",
            "| path | LoRAs | s/image | ms/step | peak GPU GiB | ready s | how it ran |",
            "|---|---|---|---|---|---|---|",
        ]
        for path in PATHS:
            for r in entry["paths"].get(path, {}).get("rows", []):
                lines.append(_table_row(r))
        lines.append("")
    return "\n".join(lines) + "\n"


def _table_row(r: dict) -> str:
    if "skipped" in r:
        return f"| {r['label']} ({r['path']}) | – | – | – | – | – | skipped: {r['skipped']} |"
    if "failed" in r:
        return f"| {r['label']} ({r['path']}) | – | – | – | – | – | failed ({r['failed']}), see gpu_flux.json |"
    engine = r.get("engine") or {}
    how = "; ".join(f"{k}: {v}" for k, v in engine.items() if v not in (None, False, ""))
    return (
        f"| {r['label']} | {r['variant']} | {r['s_per_image']} | {_cell(r['ms_per_step'])} | "
        f"{_cell(r['peak_gib'])} | {_cell(r.get('ready_s'))} | {how} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", default="auto", help=f"comma-separated, or auto (all): {', '.join(PATHS)}")
    parser.add_argument("--out", default="", help="where gpu_flux.json and BENCHMARKS.md go (default docs/)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "gpu_flux"), help="LoRA files and logs")
    parser.add_argument("--tiny", action="store_true", help="the demo-sized model on the CPU: a smoke test")
    parser.add_argument("--nunchaku-transformer", default="", help="a real svdq-{int4|fp4}_r32-flux.1-dev file")
    parser.add_argument("--compile-mode", default="default", help="COMPILE_MODE for the fp8-compile paths")
    parser.add_argument(
        "--quick", action="store_true", help=f"the main paths in about 9 minutes: {', '.join(QUICK_PATHS)}"
    )
    parser.add_argument(
        "--compile-cache", default="", help="COMPILE_CACHE_DIR for the compile paths (a rerun loads, not compiles)"
    )
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    parser.add_argument("--lora-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    if args.tiny and not args.out:
        raise SystemExit("--tiny writes a smoke-test report: give --out (not docs/)")
    args.out = args.out or str(ROOT / "docs")
    run_paths(args)
    gc.collect()


if __name__ == "__main__":
    main()
