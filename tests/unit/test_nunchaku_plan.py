"""plugins/nunchaku_flux (plan.py, package.py): what the Nunchaku path does on a machine, decided without a GPU.

Fake GPUs (name + compute capability, what torch.cuda would report) stand in for the machines; fake packages
laid out as files stand in for the `nunchaku` packages a machine may have (neither can run here).
"""

from pathlib import Path

import pytest

from plugins.nunchaku_flux.package import Package, problem
from plugins.nunchaku_flux.plan import Fallback, Refusal, Run, decide, precision_for
from server.config import from_env
from server.hooks import GPU
from tests.support.nunchaku import svdq_file

# Fake GPUs: what torch.cuda would report (name, compute capability) on each machine.
H100 = GPU("NVIDIA H100 80GB HBM3", (9, 0))
B200 = GPU("NVIDIA B200", (10, 0))
RTX5090 = GPU("NVIDIA GeForce RTX 5090", (12, 0))
RTX4090 = GPU("NVIDIA GeForce RTX 4090", (8, 9))
A100 = GPU("NVIDIA A100-SXM4-80GB", (8, 0))
T4 = GPU("Tesla T4", (7, 5))
V100 = GPU("Tesla V100-SXM2-32GB", (7, 0))

TORCH = "2.13.0"
PY = (3, 11)
REAL = Package("real", "1.2.1+cu12.8torch2.13", "/site/nunchaku")  # a wheel built for the torch in use
ABSENT = Package("absent")
UNRELATED = Package("unrelated", "0.16.1", "/site/nunchaku")


def decide_for(path, gpu, package=None, **overrides):
    settings = from_env(nunchaku_transformer=str(path), **overrides)
    return decide(settings, settings.section("nunchaku"), gpu, package or REAL, TORCH, PY)


@pytest.fixture
def int4_file(tmp_path) -> Path:
    return svdq_file(tmp_path / "svdq-int4_r32-flux.1-dev.safetensors", "int4")


@pytest.fixture
def both(tmp_path) -> Path:
    folder = tmp_path / "nunchaku-flux.1-dev"
    svdq_file(folder / "svdq-int4_r32-flux.1-dev.safetensors", "int4")
    svdq_file(folder / "svdq-fp4_r32-flux.1-dev.safetensors", "fp4")
    return folder


# -- compute capability -> precision -----------------------------------------


@pytest.mark.parametrize(
    ("capability", "precision"),
    [
        ((7, 5), "int4"),
        ((8, 0), "int4"),
        ((8, 6), "int4"),
        ((8, 9), "int4"),
        ((12, 0), "fp4"),
        ((12, 1), "fp4"),
        ((9, 0), None),
        ((10, 0), None),
        ((10, 3), None),
        ((8, 7), None),
        ((7, 0), None),
        ((6, 1), None),
    ],
)
def test_precision_follows_compute_capability(capability, precision):
    assert precision_for(GPU("some GPU", capability)) == precision


def test_no_gpu_has_no_precision():
    assert precision_for(None) is None


# -- refusals and fallback -----------------------------------------------------


@pytest.mark.parametrize("gpu", [H100, B200], ids=["hopper", "b200"])
def test_hopper_and_b200_are_refused_naming_the_gpu_and_the_fp8_path(int4_file, gpu):
    decision = decide_for(int4_file, gpu, REAL)
    assert isinstance(decision, Refusal)
    message = decision.message
    assert gpu.name in message
    assert f"compute capability {gpu.capability[0]}.{gpu.capability[1]}" in message
    assert "FP8=1 COMPILE=1" in message and "bf16" in message
    assert "NUNCHAKU_FALLBACK=fp8" in message


def test_an_old_gpu_is_refused_with_bf16_as_the_way_out(int4_file):
    message = decide_for(int4_file, V100, REAL).message
    assert "Tesla V100" in message and "7.0" in message
    assert "NUNCHAKU_FALLBACK=bf16" in message and "FP8=1" not in message  # no FP8 on a V100 either


@pytest.mark.parametrize(
    ("package", "aside"),
    [
        (ABSENT, "the Nunchaku package is not installed either"),
        (UNRELATED, "unrelated PyPI library"),
        (REAL, None),
    ],
    ids=["absent", "unrelated", "real"],
)
def test_without_a_gpu_the_refusal_says_so_whatever_the_package(int4_file, package, aside):
    message = decide_for(int4_file, None, package).message
    assert message.startswith("NUNCHAKU_TRANSFORMER is set, but this machine has no CUDA GPU")
    assert "NUNCHAKU_FALLBACK=bf16" in message
    if aside:
        assert aside in message
    else:
        assert "Besides" not in message


@pytest.mark.parametrize(
    ("gpu", "to"), [(H100, "fp8"), (B200, "fp8"), (None, "bf16"), (H100, "bf16")], ids=["h100", "b200", "cpu", "bf16"]
)
def test_fallback_is_taken_and_carries_the_reason(int4_file, gpu, to):
    decision = decide_for(int4_file, gpu, ABSENT, nunchaku_fallback=to)
    assert isinstance(decision, Fallback)
    assert decision.to == to
    assert (gpu.name if gpu else "no CUDA GPU") in decision.reason


def test_a_missing_package_falls_back_too_but_configuration_mistakes_never_do(tmp_path, int4_file):
    decision = decide_for(int4_file, RTX4090, ABSENT, nunchaku_fallback="bf16")
    assert isinstance(decision, Fallback) and "not installed" in decision.reason
    missing = decide_for(tmp_path / "nope.safetensors", H100, REAL, nunchaku_fallback="bf16")
    assert isinstance(missing, Refusal) and "does not exist" in missing.message
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "without svdq-" in decide_for(empty, None, REAL, nunchaku_fallback="fp8").message


def test_fp8_or_compile_together_with_nunchaku_is_refused(int4_file):
    for option in ({"fp8": True}, {"compile": True}):
        decided = decide_for(int4_file, RTX4090, REAL, **option)
        assert isinstance(decided, Refusal) and "NUNCHAKU_FALLBACK=fp8" in decided.message


# -- which file -----------------------------------------------------------------


def test_the_int4_file_on_blackwell_is_refused_naming_the_fp4_file(int4_file):
    message = decide_for(int4_file, RTX5090, REAL).message
    assert "svdq-int4_r32-flux.1-dev.safetensors is INT4" in message
    assert "NVIDIA GeForce RTX 5090 (compute capability 12.0) needs FP4" in message
    assert "use svdq-fp4_r32-flux.1-dev.safetensors" in message
    assert "nunchaku-tech/nunchaku-flux.1-dev" in message


def test_the_fp4_file_on_ada_is_refused_naming_the_int4_file(tmp_path):
    fp4 = svdq_file(tmp_path / "svdq-fp4_r32-flux.1-schnell.safetensors", "fp4")
    message = decide_for(fp4, RTX4090, REAL).message
    assert "is FP4" in message and "use svdq-int4_r32-flux.1-schnell.safetensors" in message


def test_the_precision_comes_from_the_files_metadata_not_its_name(tmp_path):
    renamed = svdq_file(tmp_path / "flux-dev-4bit.safetensors", "fp4")
    assert isinstance(decide_for(renamed, RTX5090, REAL), Run)
    assert "is FP4" in decide_for(renamed, A100, REAL).message
    by_name = svdq_file(tmp_path / "svdq-int4_r32-flux.1-dev.safetensors", "int4", with_metadata=False)
    assert decide_for(by_name, A100, REAL).file == by_name


@pytest.mark.parametrize(("gpu", "precision"), [(RTX5090, "fp4"), (A100, "int4"), (RTX4090, "int4"), (T4, "int4")])
def test_a_folder_with_both_files_gives_the_gpus_precision(both, gpu, precision):
    run = decide_for(both, gpu, REAL)
    assert isinstance(run, Run)
    assert run.precision == precision
    assert run.file == both / f"svdq-{precision}_r32-flux.1-dev.safetensors"


def test_turing_runs_fp16_with_nunchakus_fp16_attention(both):
    plan = decide_for(both, T4, REAL)
    assert (plan.dtype, plan.fp16_attention) == ("fp16", True)
    assert plan.notes
    ampere = decide_for(both, A100, REAL)
    assert (ampere.dtype, ampere.fp16_attention) == ("bf16", False)


def test_a_folder_without_the_needed_precision_names_the_missing_file(tmp_path):
    folder = tmp_path / "only-int4"
    svdq_file(folder / "svdq-int4_r32-flux.1-krea-dev.safetensors", "int4")
    message = decide_for(folder, RTX5090, REAL).message
    assert "holds no FP4 file" in message and "svdq-fp4_r32-flux.1-krea-dev.safetensors" in message


def test_the_plan_carries_the_options(both, tmp_path):
    t5 = svdq_file(tmp_path / "awq-int4-flux.1-t5xxl.safetensors", "int4")
    plan = decide_for(
        both, RTX4090, REAL, cache_threshold=0.12, nunchaku_t5=str(t5), cpu_offload=True, nunchaku_fp16_attention=True
    )
    assert (plan.cache_threshold, plan.t5, plan.offload, plan.fp16_attention) == (0.12, t5, True, True)
    assert "NUNCHAKU_T5" in decide_for(both, A100, REAL, nunchaku_t5=str(tmp_path / "x")).message


# -- the package ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("package", "expected"),
    [
        (ABSENT, "not on PyPI"),
        (UNRELATED, "not MIT HAN Lab's Nunchaku"),
        (Package("real", "1.2.1+cu12.8torch2.10", "/site/nunchaku"), "built for torch 2.10, but torch 2.13.0"),
    ],
    ids=["absent", "unrelated", "other-torch"],
)
def test_package_problems_on_a_supported_gpu_are_refused_with_the_way_to_the_wheel(int4_file, package, expected):
    message = decide_for(int4_file, A100, package).message
    assert expected in message
    assert "https://github.com/nunchaku-ai/nunchaku/releases" in message and "cp311" in message
    assert problem(REAL, TORCH, PY) is None
