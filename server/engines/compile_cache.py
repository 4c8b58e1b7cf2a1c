"""torch.compile paid once: its artefacts (Inductor's graphs and kernels, Triton's, AOTAutograd's, the autotuning
results) saved after the warm-up and loaded before the next start compiles, in COMPILE_CACHE_DIR, a volume
that outlives the pod.

One file per (torch, GPU, compile settings, model): another configuration never reads, or overwrites, the wrong
artefacts. What the warm-up took from the cache and what it compiled is logged and shown in /v1/models, so an
operator can see a warm start compile nothing.
"""

import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {"from_cache": int(inductor["fxgraph_cache_hit"]), "compiled": int(inductor["fxgraph_cache_miss"])}


class CompileCache:
    def __init__(self, folder: Path, *identity: str) -> None:
        key = hashlib.sha256("|".join((torch.__version__, *identity)).encode()).hexdigest()[:16]
        self.path = folder / f"torch-compile-{key}.bin"
        self.loaded = False

    def load(self) -> None:
        """Before compiling: the artefacts of an earlier start with this configuration, if any."""
        if not self.path.is_file():
            log.info("compile cache %s is empty: this start compiles (minutes)", self.path)
            return
        try:
            self.loaded = torch.compiler.load_cache_artifacts(self.path.read_bytes()) is not None
        except Exception as exc:  # a file from another build of torch, or damaged: compile, and overwrite it
            log.warning("compile cache %s could not be loaded (%s); compiling", self.path, exc)
        log.info("compile cache %s loaded: %s", self.path, self.loaded)

    def save(self) -> dict[str, int]:
        """After the warm-up compiled everything: write the artefacts; returns what came from the cache."""
        counts = _counters()
        artefacts = torch.compiler.save_cache_artifacts()
        if artefacts is not None and counts["compiled"]:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(f".{os.getpid()}.partial")
            partial.write_bytes(artefacts[0])
            os.replace(partial, self.path)
        log.info("compile cache: %d graphs from the cache, %d compiled", counts["from_cache"], counts["compiled"])
        return counts
