"""Partial images (stream=true, `partial_images`): the predicted clean image of an image still being denoised.

A flow-matching model's step is x_next = x + (sigma_next - sigma) * v, so two consecutive latents give the
velocity v and the prediction of the finished latent, x0 = x_next - sigma_next * v. Decoding that prediction
shows a recognisable image that sharpens step by step (what ComfyUI and AUTOMATIC1111 show as previews); the
noisy latent itself would show noise. The engine thread only takes the latents (a copy per partial image);
decoding and encoding run on the preview thread (server/service.py), with the pipeline's VAE (or a decoder of
its own): the one thing off the engine thread that uses the pipeline's weights, read-only.

Each family holds its latents its own way while it denoises (server/families.py, `latents`): FLUX.1 and
Qwen-Image pack 2x2 patches into tokens, FLUX.2 packs them as channels and normalizes them, Z-Image and GLM-Image
keep them as images. `_vae_input` undoes what the pipeline itself undoes before its VAE decodes.

The preview decoder (PREVIEW_DECODER): `vae`, the pipeline's own (exact, a full decode per partial image); for
FLUX.1 also
`linear`, a 16-channel-to-RGB projection fitted to that VAE when the engine loads (nearly free, blurry: upsampled
from the latent grid), and `tiny:PATH`, a tiny autoencoder for the model's latent space from a local folder
(TAEF1).
"""

import logging
from collections.abc import Callable
from functools import partial

import torch
from PIL import Image

from server.families import FLUX2_PACKED, FLUX_PACKED, PLAIN, PLAIN_NORMALIZED, QWEN_PACKED

log = logging.getLogger(__name__)

FIRST_STEP = 2  # the estimate needs the latents before and after a step; the first step has no before


def partial_image_steps(steps: int, count: int) -> list[int]:
    """The steps after which `count` partial images are taken, spread evenly; fewer when the run is too short."""
    if count <= 0 or steps <= FIRST_STEP:
        return []
    spread = {round(steps * (j + 1) / (count + 1)) for j in range(count)}
    return sorted({min(steps - 1, max(FIRST_STEP, s)) for s in spread})


def predicted_clean(scheduler, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """x0 from the latents before and after the step just taken (flow matching); the latents themselves when
    the scheduler is not one."""
    sigmas, index = getattr(scheduler, "sigmas", None), getattr(scheduler, "step_index", None)
    if sigmas is None or index is None or index < 1:
        return after
    sigma_before, sigma_after = float(sigmas[index - 1]), float(sigmas[index])
    if sigma_before == sigma_after:
        return after
    velocity = (after.float() - before.float()) / (sigma_after - sigma_before)
    return (after.float() - sigma_after * velocity).to(after.dtype)


def decoder_problem(kind: str, layout: str) -> str | None:
    """Why PREVIEW_DECODER=`kind` cannot decode this family's latents, or None when it can."""
    if kind != "vae" and layout != FLUX_PACKED:
        return f"PREVIEW_DECODER={kind} is made for FLUX.1's latent space; this model previews with 'vae' only."
    return None


class PreviewDecoder:
    """One image's latents, as the pipeline holds them while it denoises -> an RGB image of the generation's size."""

    def __init__(self, pipe, kind: str, layout: str) -> None:
        self.pipe = pipe
        self.vae = pipe.vae
        self.kind = kind
        self.layout = layout
        self._project: Callable[[torch.Tensor], torch.Tensor] | None = None
        if kind == "linear":
            self._project = _fit_projection(pipe.vae)
        elif kind.startswith("tiny:"):
            self._project = _tiny_decoder(kind.removeprefix("tiny:"), pipe.vae)

    def render(self, latents: torch.Tensor, width: int, height: int) -> Callable[[], Image.Image]:
        """What the preview thread calls; the engine thread only hands over a copy of the latents."""
        return partial(self._decode, latents, width, height)

    @torch.inference_mode()
    def _decode(self, latents: torch.Tensor, width: int, height: int) -> Image.Image:
        if self._project is None:
            vae_input = _vae_input(self.pipe, self.layout, latents[None], width, height)
            image = self.vae.decode(vae_input.to(self.vae.dtype), return_dict=False)[0]
            if self.layout == QWEN_PACKED:  # a video VAE: the one frame
                image = image[:, :, 0]
            return self.pipe.image_processor.postprocess(image, output_type="pil")[0]
        unpacked = self.pipe._unpack_latents(latents[None], height, width, self.pipe.vae_scale_factor)
        rgb = self._project(unpacked.float()).clamp(-1, 1)
        picture = self.pipe.image_processor.postprocess(rgb, output_type="pil")[0]
        return picture if picture.size == (width, height) else picture.resize((width, height), Image.BILINEAR)


def _vae_input(pipe, layout: str, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """A batch of one image's latents as the family's pipeline hands them to its VAE."""
    config = pipe.vae.config
    if layout == FLUX_PACKED:
        return _vae_space(pipe.vae, pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor))
    if layout == QWEN_PACKED:
        unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        return unpacked * _per_channel(config.latents_std, unpacked) + _per_channel(config.latents_mean, unpacked)
    if layout == FLUX2_PACKED:
        return _flux2_vae_input(pipe, latents, width, height)
    if layout == PLAIN:
        return _vae_space(pipe.vae, latents)
    if layout == PLAIN_NORMALIZED:
        return latents * _per_channel(config.latents_std, latents) + _per_channel(config.latents_mean, latents)
    raise ValueError(f"no partial image for latents laid out as {layout!r}")


def _per_channel(values, like: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (like.ndim - 2)
    return torch.tensor(values, device=like.device, dtype=like.dtype).view(shape)


def _flux2_vae_input(pipe, tokens: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """FLUX.2: one token per 2x2 patch, in rows; batch-normalized patch channels."""
    side = pipe.vae_scale_factor * 2
    grid = tokens.permute(0, 2, 1).reshape(tokens.shape[0], tokens.shape[2], height // side, width // side)
    norm = pipe.vae.bn
    std = torch.sqrt(norm.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    patches = grid * std.to(grid) + norm.running_mean.view(1, -1, 1, 1).to(grid)
    return pipe._unpatchify_latents(patches)


def _vae_space(vae, latents: torch.Tensor) -> torch.Tensor:
    """The model's latents (about unit variance) as the VAE decodes them."""
    return latents / vae.config.scaling_factor + vae.config.shift_factor


def _fit_projection(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """A per-pixel linear map from the model's latents to RGB, fitted by least squares to what the VAE
    decodes from random latents."""
    channels = vae.config.latent_channels
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4, channels, 32, 32, generator=generator)
    with torch.inference_mode():
        decoded = vae.decode(_vae_space(vae, latents).to(vae.device, vae.dtype), return_dict=False)[0].float().cpu()
    target = torch.nn.functional.adaptive_avg_pool2d(decoded, latents.shape[-2:])  # RGB at the latent grid
    x = torch.cat([latents.permute(0, 2, 3, 1).reshape(-1, channels), torch.ones(4 * 32 * 32, 1)], dim=1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    weights = torch.linalg.lstsq(x, y).solution  # (channels + 1, 3)

    def project(z: torch.Tensor) -> torch.Tensor:
        flat = z.permute(0, 2, 3, 1) @ weights[:-1].to(z.device) + weights[-1].to(z.device)
        return flat.permute(0, 3, 1, 2)

    return project


def _tiny_decoder(path: str, vae) -> Callable[[torch.Tensor], torch.Tensor]:
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny.from_pretrained(path).to(vae.device).eval()
    log.info("partial images decoded by the tiny autoencoder in %s", path)

    def decode(z: torch.Tensor) -> torch.Tensor:  # a tiny autoencoder decodes the model's latents as they are
        return tiny.decode(_vae_space(tiny, z).to(tiny.dtype), return_dict=False)[0].float()

    return decode
