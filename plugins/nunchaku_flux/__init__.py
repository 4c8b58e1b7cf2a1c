"""Nunchaku 4-bit FLUX (SVDQuant): a pipeline provider for the diffusers engine.

On when NUNCHAKU_TRANSFORMER is set (or PLUGINS names it). While the engine loads, `provide_pipeline`:

  decide(...)                      Run, Fallback (NUNCHAKU_FALLBACK: the engine's own path) or SystemExit with
                                   the reason
  build_pipeline(run, ...)         Nunchaku's transformer (and 4-bit T5) inside the FLUX pipeline of MODEL_PATH
  finish(pipelines)                first-block cache on every mode's pipeline, once the engine built them

and hands the engine Nunchaku's LoRA applier. The decisions live in plan.py and package.py and need neither
a GPU nor the package; only `build_pipeline` and `finish` import Nunchaku.
"""

import logging
import sys
from pathlib import Path

import torch

from plugins.nunchaku_flux.lora import NunchakuLoRA
from plugins.nunchaku_flux.package import detect
from plugins.nunchaku_flux.plan import Fallback, Refusal, Run, decide
from server.hooks import GPU, EnginePath, PipelineContext, ProvidedPipeline
from server.plugins import Plugin

log = logging.getLogger(__name__)


class NunchakuPlugin(Plugin):
    name = "nunchaku"

    @classmethod
    def enabled(cls, settings) -> bool:
        return super().enabled(settings) or bool(settings.section(cls.name).nunchaku_transformer)

    def provide_pipeline(self, context: PipelineContext) -> ProvidedPipeline | EnginePath:
        if not context.family.name.startswith("FLUX.1"):
            raise SystemExit(
                f"NUNCHAKU_TRANSFORMER is a 4-bit FLUX.1 transformer; this model is {context.family.name}. "
                "Unset NUNCHAKU_TRANSFORMER (and take nunchaku out of PLUGINS) to serve it."
            )
        choice = self.choose(context.gpu)
        if isinstance(choice, Fallback):
            reason = f"{choice.to} (NUNCHAKU_FALLBACK): {choice.reason}"
            return EnginePath(fp8=choice.to == "fp8", compile=choice.to == "fp8", reason=reason)
        pipe = build_pipeline(choice, context)
        return ProvidedPipeline(
            pipe=pipe,
            dtype=_dtype(choice),
            offload="sequential" if choice.offload else "",
            info=describe(choice),
            lora_applier=NunchakuLoRA(pipe.transformer, _dtype(choice)),
            finish=lambda pipelines: finish(choice, pipelines),
        )

    def choose(self, gpu: GPU | None) -> Run | Fallback:
        decision = decide(self.settings, self.config, gpu, detect(), torch.__version__, sys.version_info[:2])
        if isinstance(decision, Refusal):
            raise SystemExit(decision.message)
        if isinstance(decision, Fallback):
            log.warning(
                "Nunchaku cannot run here: %s. NUNCHAKU_FALLBACK=%s: serving that instead", decision.reason, decision.to
            )
        return decision


def _dtype(run: Run) -> torch.dtype:
    return torch.float16 if run.dtype == "fp16" else torch.bfloat16


def build_pipeline(run: Run, context: PipelineContext):
    """The FLUX pipeline of MODEL_PATH around Nunchaku's transformer. Needs the real package and a supported GPU."""
    try:
        from nunchaku import NunchakuFluxTransformer2dModel, NunchakuT5EncoderModel
    except (ImportError, OSError) as exc:  # an extension built for another torch or CUDA fails here
        raise SystemExit(
            f"Nunchaku failed to import ({type(exc).__name__}: {exc}); see README, GPU fast paths."
        ) from None
    dtype, device = _dtype(run), str(context.device)
    log.info("Nunchaku %s transformer %s (offload %s)", run.precision, run.file, run.offload)
    transformer = NunchakuFluxTransformer2dModel.from_pretrained(
        str(run.file), device=device, offload=run.offload, torch_dtype=dtype
    )
    if run.fp16_attention:
        transformer.set_attention_impl("nunchaku-fp16")
    components = {"transformer": transformer}
    if run.t5 is not None:
        components["text_encoder_2"] = NunchakuT5EncoderModel.from_pretrained(
            str(run.t5), torch_dtype=dtype, device=device
        )
    return context.load_pipeline(context.path, dtype, **components)


def finish(run: Run, pipelines: dict) -> None:
    """Nunchaku's cache wraps each pipeline class's __call__; img2img and inpaint are other classes."""
    if run.cache_threshold > 0:
        from nunchaku.caching.diffusers_adapters import apply_cache_on_pipe

        for pipe in pipelines.values():
            apply_cache_on_pipe(pipe, residual_diff_threshold=run.cache_threshold)


def describe(run: Run) -> dict:
    return {
        "precision": f"{run.precision} (Nunchaku SVDQuant, {Path(run.file).name})",
        "attention": "nunchaku-fp16" if run.fp16_attention else "flashattn2 (Nunchaku)",
        "compile": False,
        "cache": f"first-block (Nunchaku), threshold {run.cache_threshold:g}" if run.cache_threshold > 0 else None,
        "offload": "Nunchaku per-layer + sequential" if run.offload else None,
        "text_encoder_2": f"Nunchaku int4 T5 ({run.t5.name})" if run.t5 else "as in the model folder",
        "lora": "Nunchaku compose_lora + update_lora_params",
        "notes": list(run.notes),
    }
