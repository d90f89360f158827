"""StandInPipeline: base equivalence, cache lifecycle, guidance batching, defaults, Wan2.2 experts, loading."""

import inspect

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import (
    SIZES,
    noise,
    randomize_lora_up,
    reference_image,
    relative_error,
    run,
)
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from standin.models import StandInAdapter, reference_stream, video_grid
from standin.pipeline import StandInPipeline, standin_scheduler, standin_sigmas
from standin.tiny import tiny_pipeline, tiny_transformer

TOLERANCE = 1e-5  # see test_reference_stream.py


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


class FixedSigmasScheduler(FlowMatchEulerDiscreteScheduler):
    """Lets diffusers' WanPipeline, which calls set_timesteps(N), sample on Stand-In's sigma schedule."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, **kwargs):
        sigmas = standin_sigmas(num_inference_steps).tolist() if sigmas is None else sigmas
        super().set_timesteps(sigmas=sigmas, device=device, **kwargs)


def test_without_reference_the_pipeline_is_diffusers_wan(pipe):
    """Bit for bit where the same kernels run: diffusers' WanPipeline (which runs the guidance branches one after
    the other) on Stand-In's sampler schedule == ours with sequential guidance. Our default batches the branches
    (one forward of batch 2), which changes the matrix shapes and so the float rounding: within TOLERANCE."""
    components = {name: getattr(pipe, name) for name in ("tokenizer", "text_encoder", "vae", "transformer")}
    wan = WanPipeline(**components, scheduler=FixedSigmasScheduler(shift=5.0))
    wan.set_progress_bar_config(disable=True)
    common = dict(prompt="a woman jumps on the beach", **SIZES, num_inference_steps=3, guidance_scale=5.0,
                  negative_prompt="blurry", latents=noise(3), output_type="np")
    expected = wan(**common).frames
    assert np.array_equal(pipe(**common, batch_guidance=False).frames, expected)
    assert np.abs(pipe(**common).frames - expected).max() <= TOLERANCE


def test_cached_and_uncached_generation_are_identical(pipe):
    reference = reference_image()
    assert torch.equal(run(pipe, reference), run(pipe, reference, cache_reference=False))


def test_vanilla_ablation_adapter_generates_without_a_cache():
    pipe = tiny_pipeline()
    restricted = pipe.adapters["transformer"]
    vanilla = StandInAdapter.for_transformer(pipe.transformer, rank=4, attention="vanilla")
    vanilla.load_state_dict(restricted.state_dict())
    reference = reference_image()
    expected = run(pipe, reference)
    pipe.set_standin_adapter(vanilla)
    ablated = run(pipe, reference)
    assert torch.equal(ablated, run(pipe, reference, cache_reference=False))
    assert relative_error(ablated, expected) > 1e-4


def test_batched_guidance_equals_sequential(pipe):
    reference = reference_image()
    batched, sequential = run(pipe, reference, batch_guidance=True), run(pipe, reference, batch_guidance=False)
    assert relative_error(batched, sequential) <= TOLERANCE
    assert relative_error(run(pipe, reference, batch_guidance="auto"), sequential) <= TOLERANCE


@pytest.mark.slow
def test_the_reference_changes_the_video_and_identities_never_leak(pipe):
    base = run(pipe)
    first, second = reference_image(1), reference_image(2)
    with_first = run(pipe, first)
    assert relative_error(with_first, base) > 1e-3
    assert torch.equal(run(pipe), base)  # the previous identity is gone
    assert torch.equal(run(pipe, second), run(tiny_pipeline(), second))  # nothing of the first one either


def test_cache_is_released_when_a_generation_fails(pipe):
    def explode(*args):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        run(pipe, reference_image(), callback_on_step_end=explode)
    assert all(block.attn1.processor.stream is None for block in pipe.transformer.blocks)
    assert torch.equal(run(pipe), run(tiny_pipeline()))


def test_defaults_are_the_published_ones():
    parameters = inspect.signature(StandInPipeline.__call__).parameters
    assert parameters["num_inference_steps"].default == 20
    # Sizes, playback rate and guidance follow the base's config; a Wan folder (which records none) gets the
    # published ones.
    config = tiny_pipeline().config
    assert (config.default_height, config.default_width, config.default_num_frames, config.default_fps) == (
        480, 832, 81, 25)
    assert (config.default_guidance_scale, config.default_reference_guidance) == (5.0, 1.0)
    assert parameters["negative_prompt"].default.startswith("色调艳丽")
    scheduler = standin_scheduler()
    scheduler.set_timesteps(sigmas=standin_sigmas(20).tolist())
    sigma = 1 - np.arange(20) / 20
    shifted = 5 * sigma / (1 + 4 * sigma)
    assert np.allclose(scheduler.timesteps.numpy(), 1000 * shifted, rtol=1e-6)
    assert scheduler.sigmas[-1] == 0


@torch.no_grad()
def test_one_step_is_euler_on_the_guided_velocity(pipe):
    """x_1 = x_0 + v * (sigma'_1 - sigma'_0), v = v_neg + 5 (v_pos - v_neg), at timestep 1000 sigma'_0."""
    seen = {}

    def capture(pipeline, step, timestep, tensors):
        seen.setdefault(step, tensors["latents"].clone())
        return {}

    run(pipe, num_inference_steps=2, negative_prompt="blurry", callback_on_step_end=capture)
    positive, negative = pipe.encode_prompt("a man waves in the snow", "blurry", True, 1, max_sequence_length=512,
                                            device="cpu")
    x0, t0 = noise(), torch.tensor([1000.0])
    v_pos = pipe.transformer(x0, t0, positive, return_dict=False)[0]
    v_neg = pipe.transformer(x0, t0, negative, return_dict=False)[0]
    sigma = np.array([1.0, 0.5])
    shifted = 5 * sigma / (1 + 4 * sigma)
    expected = x0 + (v_neg + 5.0 * (v_pos - v_neg)) * float(shifted[1] - shifted[0])
    assert relative_error(seen[0], expected) <= TOLERANCE


@pytest.mark.parametrize("sizes, message", [
    (dict(height=30, width=32, num_frames=5), "multiples of 16"),
    (dict(height=32, width=0, num_frames=5), "multiples of 16"),
    (dict(height=32, width=32, num_frames=6), "4k\\+1"),
])
def test_impossible_sizes_are_refused(pipe, sizes, message):
    with pytest.raises(ValueError, match=message):
        pipe(prompt="x", **sizes, num_inference_steps=1)


def test_a_reference_without_adapter_is_refused():
    pipe = tiny_pipeline(with_adapter=False)
    with pytest.raises(ValueError, match="adapter"):
        run(pipe, reference_image())


def test_wan22_switches_experts_at_875_and_each_has_its_own_cache():
    pipe = tiny_pipeline()
    pipe.transformer_2 = tiny_transformer(seed=7)
    pipe.register_to_config(boundary_ratio=0.875)
    adapter_2 = randomize_lora_up(StandInAdapter.for_transformer(pipe.transformer_2, rank=4), seed=9)
    pipe.set_standin_adapter(adapter_2, "transformer_2")
    calls = []
    for name in ("transformer", "transformer_2"):
        getattr(pipe, name).register_forward_pre_hook(
            lambda module, args, kwargs, name=name: calls.append((name, float(args[1][0]))), with_kwargs=True)
    reference = reference_image()
    cached = run(pipe, reference, num_inference_steps=4)
    high = [t for name, t in calls if name == "transformer"]
    low = [t for name, t in calls if name == "transformer_2"]
    assert high and low and min(high) >= 875 > max(low)
    assert torch.equal(cached, run(pipe, reference, num_inference_steps=4, cache_reference=False))
    with pytest.raises(ValueError, match="two experts"):
        pipe.load_standin_adapter("only_one.ckpt")


def test_loads_a_local_wan_diffusers_folder(tmp_path):
    source = tiny_pipeline(with_adapter=False)
    components = {name: getattr(source, name) for name in ("tokenizer", "text_encoder", "vae", "transformer")}
    WanPipeline(**components, scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(tmp_path)

    from standin.loading import load_pipeline

    loaded = load_pipeline(tmp_path, device="cpu")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.shift == 5.0  # Stand-In's sampler, whatever the folder ships
    assert loaded.config.reference_size == 512
    assert torch.equal(run(loaded), run(source))


def test_a_real_photo_is_preprocessed_as_standin_preprocess_does():
    import skimage.data

    from standin.preprocess import preprocess_reference

    photo = PIL.Image.fromarray(skimage.data.astronaut())
    pipe = tiny_pipeline(reference_size=64)
    out = pipe(prompt="a woman nods", reference_image=photo, **SIZES, num_inference_steps=1, latents=noise(),
               output_type="latent")
    expected = preprocess_reference(photo, size=64).image
    assert np.array_equal(np.asarray(out.reference), np.asarray(expected))
    assert (np.asarray(out.reference)[:3, :3] == 255).all()  # the white background the checkpoints expect


@pytest.mark.parametrize("reference", [None, 0])
def test_diffusers_caching_hooks_work_with_and_without_a_reference(reference):
    """pipe.transformer.enable_cache(...) as on WanPipeline. FirstBlockCache with threshold 0 never skips (the
    result must equal the plain run); a large threshold skips blocks after the first step (it must change), and so
    does TaylorSeer (benchmarks/caching_hooks.py measures speed and drift on the mini model)."""
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    reference = None if reference is None else reference_image(reference)
    pipe = tiny_pipeline()
    expected = run(pipe, reference, num_inference_steps=4)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    assert torch.equal(run(pipe, reference, num_inference_steps=4), expected)
    pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))
    skipped = run(pipe, reference, num_inference_steps=4)
    assert not torch.equal(skipped, expected) and torch.isfinite(skipped).all()
    pipe.transformer.disable_cache()
    # TaylorSeer predicts the blocks' outputs in between full steps (its default selection hooks nothing in Wan).
    pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                        cache_identifiers=[r"^blocks\.\d+$"]))
    predicted = run(pipe, reference, num_inference_steps=4)
    assert not torch.equal(predicted, expected) and relative_error(predicted, expected) < 0.5


def test_expand_timesteps_is_refused():
    pipe = tiny_pipeline()
    pipe.register_to_config(expand_timesteps=True)
    with pytest.raises(NotImplementedError, match="expand_timesteps"):
        run(pipe)


def test_several_references_in_one_generation(pipe):
    first, second = reference_image(1), reference_image(2)
    both = run(pipe, [first, second])
    assert torch.equal(both, run(pipe, [first, second], cache_reference=False))
    assert relative_error(both, run(pipe, first)) > 1e-3 and relative_error(both, run(pipe, second)) > 1e-3
    assert torch.equal(run(pipe, [first]), run(pipe, first))
    out = pipe(prompt="x", reference_image=[first, second], **SIZES, num_inference_steps=1, latents=noise(),
               output_type="latent", preprocess_reference=False)
    assert isinstance(out.reference, list) and len(out.reference) == 2


# ---- reference guidance -------------------------------------------------------------------------------------
def test_reference_guidance_1_is_the_published_sampler_and_0_steps_too(pipe):
    reference = reference_image()
    expected = run(pipe, reference, negative_prompt="blurry")
    assert torch.equal(run(pipe, reference, negative_prompt="blurry", reference_guidance=1.0), expected)
    assert torch.equal(run(pipe, reference, negative_prompt="blurry", reference_guidance=3.0,
                           reference_guidance_steps=0), expected)
    windowed = run(pipe, reference, negative_prompt="blurry", reference_guidance=3.0, reference_guidance_steps=1)
    everywhere = run(pipe, reference, negative_prompt="blurry", reference_guidance=3.0)
    assert relative_error(windowed, expected) > 1e-4 and relative_error(everywhere, windowed) > 1e-4


def test_reference_guidance_defaults_to_the_base_s_own(pipe):
    # Wan's default is the published sampler (g_ref 1, above); a base may record another (the mini model: 4).
    reference = reference_image()
    asked = run(pipe, reference, negative_prompt="blurry", reference_guidance=2.0, reference_guidance_steps=1)
    pipe.register_to_config(default_reference_guidance=2.0)
    try:
        assert torch.equal(run(pipe, reference, negative_prompt="blurry", reference_guidance_steps=1), asked)
    finally:
        pipe.register_to_config(default_reference_guidance=1.0)


def test_text_guidance_defaults_to_the_base_s_own(pipe):
    # Wan's is 5 (above); a base may record another (the mini model: 2).
    reference = reference_image()
    asked = run(pipe, reference, negative_prompt="blurry", guidance_scale=2.0)
    assert not torch.equal(asked, run(pipe, reference, negative_prompt="blurry"))
    pipe.register_to_config(default_guidance_scale=2.0)
    try:
        assert torch.equal(run(pipe, reference, negative_prompt="blurry"), asked)
    finally:
        pipe.register_to_config(default_guidance_scale=5.0)


@torch.no_grad()
def test_reference_guidance_is_a_third_branch_without_the_reference(pipe):
    """v = v(noref, uncond) + g_ref (v(ref, uncond) - v(noref, uncond)) + g_text (v(ref, cond) - v(ref, uncond)),
    and the reference pass still runs once per generation (the branch without it shares the stream)."""
    reference, seen, lora_calls = reference_image(), {}, []
    handles = [m.register_forward_hook(lambda *a: lora_calls.append(1))
               for m in pipe.adapters["transformer"].modules() if hasattr(m, "up")]

    def capture(pipeline, step, timestep, tensors):
        seen.setdefault(step, tensors["latents"].clone())
        return {}

    run(pipe, reference, num_inference_steps=2, negative_prompt="blurry", reference_guidance=2.0,
        callback_on_step_end=capture)
    for handle in handles:
        handle.remove()
    assert len(lora_calls) == 3 * len(pipe.transformer.blocks)
    positive, negative = pipe.encode_prompt("a man waves in the snow", "blurry", True, 1, max_sequence_length=512,
                                            device="cpu")
    x0, t0 = noise(), torch.tensor([1000.0])
    latents = pipe.encode_reference_image(pipe.prepare_reference_image(reference, preprocess=False))
    no_reference = pipe.transformer(x0, t0, negative, return_dict=False)[0]
    with reference_stream(pipe.transformer, pipe.adapters["transformer"], latents,
                          video_grid(pipe.transformer, x0.shape)):
        cond = pipe.transformer(x0, t0, positive, return_dict=False)[0]
        uncond = pipe.transformer(x0, t0, negative, return_dict=False)[0]
    velocity = no_reference + 2.0 * (uncond - no_reference) + 5.0 * (cond - uncond)
    sigma = np.array([1.0, 0.5])
    shifted = 5 * sigma / (1 + 4 * sigma)
    assert relative_error(seen[0], x0 + velocity * float(shifted[1] - shifted[0])) <= TOLERANCE


def test_bad_reference_guidance_is_refused(pipe):
    for value in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="reference_guidance"):
            run(pipe, reference_image(), reference_guidance=value)
