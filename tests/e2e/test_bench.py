"""The bench tools run and report. Tiny runs only: no timing is asserted, figures belong in docs/BENCHMARKS.md."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.server import CACHE_DIR, ROOT
from tests.support.tools import BENCH, bench_tool

TINY = {"prompt": "a cat", "size": "256x256", "num_inference_steps": 2}


def run_tool(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """A bench tool as a user runs it; it shares the test run's demo model."""
    full_env = {**os.environ, "CACHE_DIR": str(CACHE_DIR), **(env or {})}
    proc = subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def write_mix(path: Path, *entries: dict) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def test_pressure_reports_latency_errors_split_and_plot(make_server, tmp_path):
    srv = make_server({"MAX_QUEUE": "1", "MAX_BATCH": "1"})  # a short queue: some requests get 429
    mix = write_mix(
        tmp_path / "mix.jsonl",
        {"name": "ok", **TINY, "n": 2},
        {"name": "bad-size", "prompt": "x", "size": "100x100"},  # a 400, counted by status
    )
    out = tmp_path / "out"
    proc = run_tool(
        sys.executable, "bench/pressure.py", "--url", srv.url, "--rps", "20", "--count", "12",
        "--arrivals", "constant", "--mix", str(mix), "--out", str(out), "--no-progress",
    )  # fmt: skip
    report = json.loads((out / "pressure.json").read_text())
    summary = report["summary"]
    assert summary["requests"] == 12 == len(report["records"]) == sum(summary["by_status"].values())
    assert summary["ok"] >= 1 and summary["images"] == 2 * summary["ok"]
    assert summary["by_status"].get("400", 0) >= 1
    assert summary["rejected_429"] == summary["by_status"].get("429", 0)
    assert {"p50", "p95", "p99"} <= set(summary["latency_s"])
    assert {"queue", "gen", "post"} <= set(summary["server_ms"])
    assert summary["server_ms"]["gen"]["count"] == summary["ok"]
    assert (out / "pressure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "images/s" in proc.stdout


def test_run_pressure_test_wrapper_stops_by_itself(server, tmp_path):
    mix = write_mix(tmp_path / "mix.jsonl", TINY)
    out = tmp_path / "out"
    env = {"URL": server.url, "MIX": str(mix), "DURATION": "2"}
    run_tool("./run_pressure_test.sh", "2", "--no-progress", "--out", str(out), env=env)
    summary = json.loads((out / "pressure.json").read_text())["summary"]
    assert summary["requests"] >= 1 and summary["ok"] == summary["requests"]


def test_wrapper_picks_the_cpu_mix_and_prints_progress_lines_in_a_log(server, tmp_path):
    """A first run as the README has it: no MIX, output to a log (not a terminal)."""
    out = tmp_path / "out"
    env = {"URL": server.url, "DURATION": "3"}
    proc = run_tool("./run_pressure_test.sh", "2", "--progress-every", "0.5", "--out", str(out), env=env)
    assert proc.stdout.startswith("mix: bench/mix-cpu.jsonl (the server runs on the CPU;"), proc.stdout
    assert json.loads((out / "pressure.json").read_text())["config"]["mix"].endswith("bench/mix-cpu.jsonl")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("progress: ")]
    assert lines and lines[-1].split()[1].split("/")[1].isdigit(), proc.stderr
    assert "\r" not in proc.stderr  # no tqdm bar redrawn in place


def test_pressure_without_matplotlib_reports_and_says_how_to_get_the_plot(server, tmp_path):
    stub = tmp_path / "stub/matplotlib"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    mix = write_mix(tmp_path / "mix.jsonl", TINY)
    out = tmp_path / "out"
    args = ("--url", server.url, "--rps", "2", "--count", "2", "--mix", str(mix), "--out", str(out), "--no-progress")
    proc = run_tool(sys.executable, "bench/pressure.py", *args, env={"PYTHONPATH": str(tmp_path / "stub")})
    assert "images/s" in proc.stdout and "no plot: matplotlib is not installed" in proc.stdout
    assert (out / "pressure.json").exists() and not (out / "pressure.png").exists()


def test_example_mixes_parse():
    pressure = bench_tool("pressure")
    for path in sorted(BENCH.glob("mix-*.json*")):
        entries = pressure.load_mix(path)
        assert entries and all(e.weight > 0 and e.body["prompt"] for e in entries), path


def test_overhead_reports_the_ratio(tmp_path):
    out = tmp_path / "out"
    args = ("--size", "256x256", "--steps", "2", "--pairs", "2", "--threads", "1", "--out", str(out))
    proc = run_tool(sys.executable, "bench/overhead.py", "--model", "demo:z-image", *args)
    report = json.loads((out / "overhead.json").read_text())
    assert len(report["pairs"]) == 2 and report["env"]["MODEL_PATH"] == "demo:z-image"
    summary = report["summary"]
    assert summary["ratio_of_medians"] > 0 and summary["raw_ratio_of_medians"] > 0
    assert summary["server_split_s"]["gen"] > 0
    assert summary["pair_ratio_range"] == sorted(p["ratio"] for p in report["pairs"])
    assert "target <= 1.05: inconclusive: too few pairs" in proc.stdout  # two pairs conclude nothing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "256"], "argument --size: '256': expected a size WIDTHxHEIGHT"),
        (["--size", "100x100"], "multiples of 16"),
        (["--pairs", "0"], "argument --pairs: '0': expected an integer >= 1"),
        (["--body", "{nope"], "argument --body: '{nope': not JSON"),
        (["--n", "11"], "argument --n: invalid choice"),
    ],
)
def test_overhead_refuses_bad_arguments_before_loading_anything(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "bench/overhead.py", *args, "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_overhead_concludes_only_when_the_pairs_agree():
    """The verdict is on the median pair ratio's 95% interval; a noisy machine's pairs (0.44 to 1.51, as seen once)
    conclude nothing, where the old report said "target met"."""
    overhead = bench_tool("overhead")
    assert overhead.median_interval([1.0] * 5) is None  # too few pairs for 95%
    assert overhead.median_interval([float(i) for i in range(6)]) == (0.0, 5.0)  # 6 pairs: the extremes
    assert overhead.median_interval([float(i) for i in range(20)]) == (5.0, 14.0)  # 20 pairs: the 6th and 15th
    noisy = [0.44, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 1.0, 1.01, 1.02, 1.05, 1.1, 1.2, 1.3, 1.35, 1.4, 1.45]
    assert overhead.verdict(overhead.median_interval([*noisy, 1.51])).startswith("inconclusive: the median pair")
    quiet = [0.99 + i / 1000 for i in range(20)]  # 0.990 to 1.009
    assert overhead.verdict(overhead.median_interval(quiet)) == "met"
    assert overhead.verdict(overhead.median_interval([r + 0.1 for r in quiet])) == "NOT met"
    assert overhead.verdict(overhead.median_interval(quiet[:5])).startswith("inconclusive: too few pairs")


def test_throughput_sweeps_and_reports_targets(tmp_path):
    out = tmp_path / "out"
    args = ("--size", "256x256", "--steps", "2", "--requests", "4", "--concurrency", "1,2", "--threads", "1")
    lora = ("--lora-requests", "8", "--lora-clients", "4")  # a tiny run of the LoRA mode
    run_tool(sys.executable, "bench/throughput.py", *args, *lora, "--out", str(out))
    report = json.loads((out / "throughput.json").read_text())
    assert report["serial"]["images_per_s"] > 0
    assert [(r["batching"], r["clients"]) for r in report["sweep"]] == [("off", 1), ("off", 2), ("on", 1), ("on", 2)]
    assert all(r["errors"] == 0 and r["images"] >= 4 for r in report["sweep"])
    assert "most_clients_no_lower_than_serial" in report["verdicts"]
    lora = report["lora"]
    assert set(lora["rows"]) == {"set-aware", "arrival order"}
    assert all(row["errors"] == 0 and row["switches"] >= 1 for row in lora["rows"].values())
    assert "switch_ratio" in lora and "set_aware_switches_at_most_a_quarter" in report["verdicts"]


def test_encode_compares_pillow_and_simplejpeg(tmp_path):
    out = tmp_path / "out"
    run_tool(sys.executable, "bench/encode.py", "--size", "256", "--repeat", "2", "--out", str(out))
    rows = json.loads((out / "encode.json").read_text())["rows"]
    for content in ("noise", "smooth"):
        encoders = {r["encoder"] for r in rows if r["content"] == content}
        assert {"pillow (server)", "simplejpeg 4:2:0"} <= encoders
    assert all(r["median_ms"] > 0 and r["bytes"] > 0 for r in rows)


def test_gpu_benchmark_builds_flux_dev_at_its_real_size():
    """The benchmark's configs give FLUX.1-dev's parameter counts (built on the meta device: shapes, no memory)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    bench = bench_tool("gpu_flux")
    with torch.device("meta"):
        parts = {
            "transformer": FluxTransformer2DModel(**bench.FLUX_DEV_TRANSFORMER),
            "vae": AutoencoderKL(**bench.FLUX_DEV_VAE),
            "clip": CLIPTextModel(CLIPTextConfig(**bench.FLUX_DEV_CLIP)),
            "t5": T5EncoderModel(T5Config(**bench.FLUX_DEV_T5)),
        }
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    assert counts == {"transformer": 11_901_408_320, "vae": 83_819_683, "clip": 123_060_480, "t5": 4_762_310_656}


@pytest.mark.slow
def test_gpu_benchmark_script_runs_at_tiny_scale_on_cpu(tmp_path):
    """bench/gpu_flux.py --tiny: the demo-sized FLUX on the CPU, through the same code as the GPU run."""
    out = tmp_path / "bench"
    done = subprocess.run(
        [
            sys.executable,
            "bench/gpu_flux.py",
            "--tiny",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
            "--paths",
            "diffusers-bf16,server-bf16-lora,server-bf16-concurrency",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / "BENCHMARKS.md").read_text()
    assert "## GPU (bench/gpu_flux.py)" in report
    assert "diffusers bf16" in report and "image-server bf16 (HTTP)" in report
    assert "LoRA set switching" in report and "4 clients, batching on" in report
    assert (out / "gpu_flux.json").is_file()


def test_gpu_carry_prepares_what_an_air_gapped_gpu_host_lacks(tmp_path):
    """bench/gpu_carry.sh: the missing packages at the lock's versions and image-server with its entry points,
    within the 64 MiB such a host takes; installed with --no-index --target as there, the plugins are found."""
    import zipfile

    done = subprocess.run(["bash", str(BENCH / "gpu_carry.sh"), str(tmp_path / "whl")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = {p.name.split("-")[0] for p in (tmp_path / "whl").glob("*.whl")}
    assert {"diffusers", "fastapi", "pydantic_core", "uvicorn", "torchao", "image_server"} <= wheels
    assert sum(p.stat().st_size for p in (tmp_path / "whl").iterdir()) < 64 * 2**20
    (project,) = (tmp_path / "whl").glob("image_server-*.whl")
    with zipfile.ZipFile(project) as wheel:
        entry_points = next(wheel.read(n).decode() for n in wheel.namelist() if n.endswith("entry_points.txt"))
    assert "[image_server.plugins]" in entry_points and "lora = plugins.lora:LoRAPlugin" in entry_points


def test_previews_cost_tool_runs_and_reports(tmp_path):
    out = tmp_path / "previews"
    run_tool(sys.executable, str(BENCH / "previews.py"), "--size", "128x128", "--steps", "6", "--pairs", "1",
             "--threads", "1", "--out", str(out))  # fmt: skip
    rows = json.loads((out / "previews.json").read_text())["rows"]
    assert [r["decoder"] for r in rows] == ["vae", "linear"] and all(r["ratio"] > 0 for r in rows)


def test_memory_tool_reports_the_bomb_and_the_largest_edit(tmp_path):
    out = tmp_path / "memory"
    run_tool(sys.executable, str(BENCH / "memory.py"), "--out", str(out), timeout=600)
    rows = json.loads((out / "memory.json").read_text())["rows"]
    assert [r["status"] for r in rows] == [400, 200]


def test_lora_switch_tool_times_both_appliers(tmp_path):
    out = tmp_path / "lora_switch"
    args = ["--heads", "1", "--double", "1", "--single", "1", "--cycles", "1", "--slot-rank", "8", "--out", str(out)]
    run_tool(sys.executable, str(BENCH / "lora_switch.py"), *args)
    rows = json.loads((out / "lora_switch.json").read_text())["rows"]
    assert [r["path"] for r in rows] == ["merged", "slot"]
    assert all(r["switches"] == 3 and r["median_ms"] > 0 for r in rows)
