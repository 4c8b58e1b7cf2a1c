"""The embedded demo models: a tiny random-weight model of each family, made of the family's real diffusers and
transformers classes, small enough to build in seconds and generate on a laptop CPU. Tokenizers are trained here
on a small corpus, so nothing is downloaded. Their images are noise; the point is to exercise the whole serving
stack exactly as a real checkpoint of the family would (`--model demo:FAMILY`; `demo` is `demo:flux1`).

Each is built once and saved under CACHE_DIR in a folder named by its version, atomically: concurrent instances
never see half a model, and a changed build (a new version) never reads an old one.
"""

import importlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# demo name -> the module in this package that builds it (its VERSION, FAMILY and build())
DEMOS = {
    "flux1": "flux1",
    "flux2": "flux2",
    "glm-image": "glm",
    "qwen-image": "qwen",
    "qwen-image-edit": "qwen_edit",
    "wan2.2": "wan",
    "z-image": "zimage",
}
DEFAULT = "flux1"


def demo_name(model: str) -> str | None:
    """`demo` -> flux1, `demo:NAME` -> NAME; None for anything else (a model folder)."""
    if model == "demo":
        return DEFAULT
    return model.removeprefix("demo:") if model.startswith("demo:") else None


def demo_model_path(cache_dir: Path, name: str = DEFAULT) -> Path:
    """The demo model's folder, built and saved on first use."""
    if name not in DEMOS:
        raise SystemExit(f"MODEL_PATH=demo:{name}: no such demo model; choose one of {', '.join(DEMOS)}.")
    module = importlib.import_module(f"{__name__}.{DEMOS[name]}")
    path = cache_dir / module.VERSION
    if (path / "model_index.json").exists():
        return path
    log.info("building the demo model %s in %s (first use)", name, path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".build-"))
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # a bar per shard, in the server's log
        module.build().save_pretrained(tmp)
        os.replace(tmp, path)  # atomic: concurrent instances never see half a model
    except OSError:
        if not (path / "model_index.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
