"""Nunchaku 4-bit FLUX (SVDQuant): a backend of the diffusers engine, not a request plugin.

With NUNCHAKU_TRANSFORMER set, `DiffusersEngine.load` calls, in order:

  choose(settings, gpu)            Plan, or Fallback (NUNCHAKU_FALLBACK), or SystemExit with the reason
  build_pipeline(plan, ...)        Nunchaku's transformer (and 4-bit T5) inside the FLUX pipeline of MODEL_PATH
  finish(plan, pipelines)          first-block cache on every pipeline; the LoRA applier; the /v1/models info

The decisions live in plan.py and package.py and need neither a GPU nor the
package; only `build_pipeline` and `finish` import Nunchaku.
"""

import dataclasses
import logging
import sys
from pathlib import Path

import torch

from plugins.nunchaku_flux.lora import NunchakuLoRA
from plugins.nunchaku_flux.package import detect
from plugins.nunchaku_flux.plan import Fallback, Plan, Refusal, decide
from server.engines.fastpath import GPU

log = logging.getLogger(__name__)

__all__ = ["Fallback", "NunchakuLoRA", "Plan", "build_pipeline", "choose", "fallback_settings", "finish"]


def choose(settings, gpu: GPU | None) -> Plan | Fallback:
    decision = decide(settings, gpu, detect(), torch.__version__, sys.version_info[:2])
    if isinstance(decision, Refusal):
        raise SystemExit(decision.message)
    if isinstance(decision, Fallback):
        log.warning(
            "Nunchaku cannot run here: %s. NUNCHAKU_FALLBACK=%s: serving that instead", decision.reason, decision.to
        )
    return decision


def fallback_settings(settings, fallback: Fallback):
    """fp8 is the Hopper fast path, FP8 + compile; bf16 is the plain pipeline."""
    if fallback.to == "fp8":
        return dataclasses.replace(settings, fp8=True, compile=True)
    return settings


def build_pipeline(plan: Plan, base: Path, device: torch.device, load_pipeline):
    """The FLUX pipeline of `base` around Nunchaku's transformer. Needs the real package and a supported GPU."""
    try:
        from nunchaku import NunchakuFluxTransformer2dModel, NunchakuT5EncoderModel
    except (ImportError, OSError) as exc:  # an extension built for another torch or CUDA fails here
        raise SystemExit(
            f"Nunchaku failed to import ({type(exc).__name__}: {exc}); see README, GPU fast paths."
        ) from None
    dtype = torch.float16 if plan.dtype == "fp16" else torch.bfloat16
    log.info("Nunchaku %s transformer %s (offload %s)", plan.precision, plan.file, plan.offload)
    transformer = NunchakuFluxTransformer2dModel.from_pretrained(
        str(plan.file), device=str(device), offload=plan.offload, torch_dtype=dtype
    )
    if plan.fp16_attention:
        transformer.set_attention_impl("nunchaku-fp16")
    components = {"transformer": transformer}
    if plan.t5 is not None:
        components["text_encoder_2"] = NunchakuT5EncoderModel.from_pretrained(
            str(plan.t5), torch_dtype=dtype, device=str(device)
        )
    return load_pipeline(base, dtype, **components)


def finish(plan: Plan, pipelines: dict) -> tuple[dict, NunchakuLoRA]:
    """After the engine adopted the pipeline: cache on every mode's pipeline; the LoRA applier; the info."""
    if plan.cache_threshold > 0:
        from nunchaku.caching.diffusers_adapters import apply_cache_on_pipe

        # It wraps each pipeline class's __call__ in a cache context; img2img and inpaint are other classes.
        for pipe in pipelines.values():
            apply_cache_on_pipe(pipe, residual_diff_threshold=plan.cache_threshold)
    transformer = pipelines["text2img"].transformer
    return describe(plan), NunchakuLoRA(transformer)


def describe(plan: Plan) -> dict:
    return {
        "precision": f"{plan.precision} (Nunchaku SVDQuant, {plan.file.name})",
        "attention": "nunchaku-fp16" if plan.fp16_attention else "flashattn2 (Nunchaku)",
        "compile": False,
        "cache": f"first-block (Nunchaku), threshold {plan.cache_threshold:g}" if plan.cache_threshold > 0 else None,
        "offload": "Nunchaku per-layer + sequential" if plan.offload else None,
        "text_encoder_2": f"Nunchaku int4 T5 ({plan.t5.name})" if plan.t5 else "as in the model folder",
        "lora": "Nunchaku compose_lora + update_lora_params",
        "notes": list(plan.notes),
    }
