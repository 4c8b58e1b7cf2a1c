"""Stand-ins for the `nunchaku` packages a machine may have, built as files in a folder to put on sys.path.

Neither runs: the detection under test must find out what they are from their
files, without importing them, so both make any import fail loudly.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

_REFUSE_IMPORT = 'raise RuntimeError("the detection imported nunchaku")\n'


def _dist_info(site: Path, version: str, summary: str, requires: list[str]) -> None:
    dist = site / f"nunchaku-{version}.dist-info"
    dist.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", "Name: nunchaku", f"Version: {version}", f"Summary: {summary}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (dist / "METADATA").write_text("\n".join(lines) + "\n")
    (dist / "RECORD").write_text("")


def unrelated_package(site: Path) -> Path:
    """The layout of PyPI's nunchaku 0.16.1 (a change-point library): nunchaku.py, gibbs_sampler.py, no models/."""
    package = site / "nunchaku"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import scipy  # noqa\n" + _REFUSE_IMPORT)
    for name in ("nunchaku.py", "gibbs_sampler.py", "_models.py", "_example_data.py"):
        (package / name).write_text("")
    _dist_info(
        site,
        "0.16.1",
        "Optimally partitioning data into piece-wise linear segments.",
        ["matplotlib", "numpy>=2", "pandas", "scipy", "tqdm"],
    )
    return site


def real_shaped_package(site: Path, version: str = "1.2.1+cu12.8torch2.10") -> Path:
    """The layout of a Nunchaku wheel: the CUDA extension _C.*.so, models/transformers/transformer_flux.py, lora/."""
    package = site / "nunchaku"
    (package / "models" / "transformers").mkdir(parents=True)
    (package / "lora" / "flux").mkdir(parents=True)
    (package / "__init__.py").write_text(_REFUSE_IMPORT)
    (package / "models" / "transformers" / "transformer_flux.py").write_text("")
    (package / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    _dist_info(site, version, "Nunchaku: SVDQuant 4-bit diffusion models", ["diffusers>=0.36", "peft>=0.17"])
    return site


def svdq_file(path: Path, precision: str, with_metadata: bool = True) -> Path:
    """A transformer file as Nunchaku ships them: the quantization config in the safetensors metadata."""
    dtype = {"int4": "int4", "fp4": "fp4_e2m1_all"}[precision]
    metadata = {"quantization_config": json.dumps({"weight": {"dtype": dtype, "group_size": 64}})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"placeholder": torch.zeros(1)}, str(path), metadata=metadata if with_metadata else None)
    return path
