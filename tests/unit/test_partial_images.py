"""server/engines/partial_images.py: when partial images are taken, the predicted clean latent, and the decoders."""

import pytest
import torch
from diffusers import AutoencoderTiny, FlowMatchEulerDiscreteScheduler

from server.engines.partial_images import PreviewDecoder, decoder_problem, partial_image_steps, predicted_clean
from server.families import FLUX_PACKED, PLAIN, QWEN_PACKED
from tests.support.demo import demo_pipeline


@pytest.mark.parametrize(
    ("steps", "count", "expected"),
    [(28, 3, [7, 14, 21]), (8, 2, [3, 5]), (8, 1, [4]), (4, 3, [2, 3]), (2, 3, []), (28, 0, []), (3, 2, [2])],
)
def test_partial_images_are_spread_over_the_run_and_never_the_first_or_last_step(steps, count, expected):
    assert partial_image_steps(steps, count) == expected


def test_the_clean_latent_is_predicted_exactly_from_two_steps_of_a_flow_matching_model():
    """x_t = (1 - sigma) x0 + sigma noise, and a model that predicts v = noise - x0 exactly: one Euler step, and
    the prediction from the latents before and after it is x0 itself."""
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 16, 8, generator=generator), torch.randn(2, 16, 8, generator=generator)
    sigma = float(scheduler.sigmas[3])
    scheduler._step_index = 3
    before = (1 - sigma) * clean + sigma * noise
    after = scheduler.step(noise - clean, scheduler.timesteps[3], before, return_dict=False)[0]
    assert torch.allclose(predicted_clean(scheduler, before, after), clean, atol=1e-4)
    assert not torch.allclose(after, clean, atol=1e-2)  # the latent itself is still noisy


@pytest.fixture(scope="module")
def pipe():
    return demo_pipeline()


@pytest.mark.parametrize("kind", ["vae", "linear", "tiny"])
def test_every_decoder_gives_an_image_of_the_generation_size(pipe, kind, tmp_path_factory):
    if kind == "tiny":  # a tiny autoencoder for FLUX's 16 latent channels, random weights (TAEF1's shape)
        folder = tmp_path_factory.mktemp("taef1")
        with torch.random.fork_rng():  # seeded: some draws of its weights saturate every pixel (two black images)
            torch.manual_seed(0)
            AutoencoderTiny(latent_channels=16, encoder_block_out_channels=(8, 8, 8, 8),
                            decoder_block_out_channels=(8, 8, 8, 8)).save_pretrained(folder)  # fmt: skip
        kind = f"tiny:{folder}"
    decoder = PreviewDecoder(pipe, kind, FLUX_PACKED)
    generator = torch.Generator().manual_seed(1)
    packed = torch.randn(2, (96 // 16) * (64 // 16), 64, generator=generator)  # FLUX packs 2x2 latent patches
    first, second = (decoder.render(packed[i], 64, 96)() for i in range(2))
    assert first.size == second.size == (64, 96) and first.mode == "RGB"
    assert first.tobytes() != second.tobytes()


def test_the_fitted_and_tiny_decoders_are_flux_1_s_and_refused_for_another_family():
    assert decoder_problem("linear", FLUX_PACKED) is None and decoder_problem("tiny:/taef1", FLUX_PACKED) is None
    assert decoder_problem("vae", QWEN_PACKED) is None
    assert "'vae' only" in decoder_problem("linear", PLAIN)
