"""Stand-In with VACE control on tiny random WanVACETransformer3DModel pipelines built here."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import WanVACEPipeline, WanVACETransformer3DModel

from conftest import randomize_lora_up, reference_image, relative_error
from reference_impl import standin_forward
from standin.models.adapter import StandInAdapter
from standin.models.reference import StandInSelfAttention
from standin.pipeline import standin_scheduler
from standin.tiny import TRANSFORMER_CONFIGS, byte_tokenizer, tiny_text_encoder, tiny_vae
from standin.vace import (ControlVideoError, StandInVACEPipeline, prepare_control_video, read_control_video,
                          standin_timesteps, vace_reference_count)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vace(seed=0, num_layers=3, vace_layers=(0, 2)):
    torch.manual_seed(seed)
    config = dict(TRANSFORMER_CONFIGS["tiny"], num_layers=num_layers)
    return WanVACETransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, cross_attn_norm=True,
                                     eps=1e-6, vace_layers=list(vace_layers), vace_in_channels=96, **config).eval()


def components(seed=0):
    return dict(tokenizer=byte_tokenizer(), text_encoder=tiny_text_encoder(seed=seed), vae=tiny_vae(seed),
                scheduler=standin_scheduler(), transformer=tiny_vace(seed))


def standin_vace(seed=0, parts=None):
    pipe = StandInVACEPipeline(**(parts or components(seed)), reference_size=32)
    adapter = randomize_lora_up(StandInAdapter.for_transformer(pipe.transformer, rank=4), seed=seed)
    pipe.set_standin_adapter(adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control(frames=5, size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(frames)]


def call_args(**extra):
    noise = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    args = dict(prompt="a man waves", negative_prompt="blurry", video=control(), conditioning_scale=0.7, height=32,
                width=32, num_frames=5, num_inference_steps=3, guidance_scale=4.0, latents=noise,
                output_type="latent")
    return {**args, **extra}


def test_without_a_reference_it_is_wan_vace_pipeline_bit_for_bit():
    parts = components()
    ours = standin_vace(parts=parts)
    theirs = WanVACEPipeline(**parts)
    theirs.set_progress_bar_config(disable=True)
    with standin_timesteps(theirs.scheduler):
        expected = theirs(**call_args()).frames
    assert torch.equal(ours(**call_args()).frames, expected)
    # diffusers' own schedule on request; the scheduler's method is back afterwards.
    assert "set_timesteps" not in vars(theirs.scheduler)
    assert torch.equal(ours(**call_args(), sampler="diffusers").frames, theirs(**call_args()).frames)


def test_with_a_reference_cached_equals_uncached_and_vace_blocks_never_see_it():
    pipe = standin_vace()
    assert all(isinstance(block.attn1.processor, StandInSelfAttention) for block in pipe.transformer.blocks)
    assert not any(isinstance(block.attn1.processor, StandInSelfAttention) for block in pipe.transformer.vace_blocks)
    hints = []
    for block in pipe.transformer.vace_blocks:
        block.register_forward_hook(lambda module, args, output: hints.append(output[0].clone()))
    plain = pipe(**call_args()).frames
    plain_hints, hints[:] = list(hints), []
    cached = pipe(**call_args(), reference_image=reference_image(), preprocess_reference=False).frames
    first_hints = hints[: len(pipe.transformer.vace_blocks)]
    uncached = pipe(**call_args(), reference_image=reference_image(), preprocess_reference=False,
                    cache_reference=False).frames
    assert torch.equal(cached, uncached)
    assert not torch.allclose(cached, plain, atol=1e-4)  # the reference acts
    # The first forward's control hints (same latents, same control) are the same with and without a reference:
    # the VACE blocks run on the video tokens only.
    for with_reference, without in zip(first_hints, plain_hints):
        assert torch.equal(with_reference, without)
    # The reference's tokens never enter a VACE block: every hint has exactly the video's tokens.
    assert all(h.shape[1] == 2 * 2 * 2 for h in plain_hints)  # latents [1, 16, 2, 4, 4], patch (1, 2, 2)


def test_control_video_sizes_and_bad_files(tmp_path):
    frames = np.zeros((12, 50, 70, 3), np.uint8)
    assert prepare_control_video(frames).shape == (9, 48, 64, 3)
    assert prepare_control_video(frames, num_frames=6).shape == (5, 48, 64, 3)
    with pytest.raises(ControlVideoError, match="12 frames, fewer than the 17 asked"):
        prepare_control_video(frames, num_frames=17)
    wide = np.zeros((5, 48, 81, 3), np.uint8)
    assert prepare_control_video(wide, size=(48, 80)).shape == (5, 48, 80, 3)  # aspects 1.69 and 1.67: within 2%
    with pytest.raises(ControlVideoError, match="another aspect"):
        prepare_control_video(wide, size=(48, 48))
    with pytest.raises(ControlVideoError, match="multiples of 16"):
        prepare_control_video(wide, size=(36, 64))
    with pytest.raises(ControlVideoError, match="shape"):
        prepare_control_video(np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(ControlVideoError, match="at least 16x16"):
        prepare_control_video(np.zeros((5, 10, 40, 3), np.uint8))
    (tmp_path / "pose.mp4").write_text("not a video")
    with pytest.raises(ControlVideoError) as error:
        read_control_video(tmp_path / "pose.mp4")
    assert "\n" not in str(error.value) and "pose.mp4" in str(error.value)
    with pytest.raises(ControlVideoError, match="pose2.mp4"):
        read_control_video(tmp_path / "pose2.mp4")


# ---- standin generate --control ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vace_folder(tmp_path_factory):
    from standin.checkpoint import save_adapter
    from standin.tiny import tiny_pipeline
    from standin.video import save_video

    folder = tmp_path_factory.mktemp("vace")
    pipe = standin_vace()
    pipe.save_pretrained(folder / "base")
    save_adapter(pipe.adapters["transformer"], folder / "adapter.safetensors")
    tiny_pipeline(with_adapter=False).save_pretrained(folder / "plain_base")
    rng = np.random.default_rng(0)
    save_video(rng.integers(0, 256, (7, 36, 40, 3), dtype=np.uint8), folder / "pose.mp4", fps=8)
    PIL.Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "face.png")
    (folder / "broken.mp4").write_text("not a video")
    return folder


def generate_control(folder, output, *extra, base="base", control="pose.mp4"):
    from standin.cli import main

    return main(["generate", "--base", str(folder / base), "--adapter", str(folder / "adapter.safetensors"),
                 "--reference", str(folder / "face.png"), "--prompt", "a person raises both hands", "-o",
                 str(output), "--control", str(folder / control), "--control-scale", "0.5", "--steps", "2",
                 "--no-preprocess", "--device", "cpu", *extra])


def test_generate_with_control(vace_folder, tmp_path, capsys):
    import json

    from standin.video import read_video

    assert generate_control(vace_folder, tmp_path / "out.mp4") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    frames = read_video(tmp_path / "out.mp4")
    assert report["frames"] == 5 and frames.shape[:3] == (5, 32, 32)  # 7 frames -> 5 (4k+1); 36x40 -> 32x32
    assert (tmp_path / "out.reference.png").is_file()
    # VACE's own reference frame in front: the video keeps the control's length (the extra latent frame is
    # dropped); a size of the control's aspect resizes it.
    assert generate_control(vace_folder, tmp_path / "vace_ref.mp4", "--control-reference",
                            str(vace_folder / "face.png"), "--height", "144", "--width", "160", "--frames", "5") == 0
    assert read_video(tmp_path / "vace_ref.mp4").shape[:3] == (5, 144, 160)  # 40x36 is 160x144's aspect


@pytest.mark.parametrize("extra, kwargs, message", [
    ((), {"control": "broken.mp4"}, "broken.mp4"),
    ((), {"control": "missing.mp4"}, "missing.mp4"),
    ((), {"base": "plain_base"}, "not a Wan VACE model"),
    (("--height", "32"), {}, "both --height and --width"),
    (("--height", "32", "--width", "64"), {}, "another aspect"),
    (("--frames", "9"), {}, "7 frames, fewer than the 9 asked"),
    (("--control-reference", "nowhere.png"), {}, "nowhere.png"),
    (("--reference-guidance", "2"), {}, "--reference-guidance"),
])
def test_bad_control_inputs_fail_in_one_line_and_write_nothing(vace_folder, tmp_path, capsys, extra, kwargs,
                                                               message):
    assert generate_control(vace_folder, tmp_path / "out.mp4", *extra, **kwargs) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_a_lora_on_the_vace_base_composes(tmp_path):
    from standin.lora import load_loras, set_scales
    from test_lora import lora_weights, write_lora

    pipe, plain = standin_vace(), standin_vace()
    path = write_lora(lora_weights(pipe.transformer), tmp_path / "style.safetensors", "community")
    names = load_loras(pipe, [(path, 0.0)])
    args = call_args(reference_image=reference_image(), preprocess_reference=False)
    assert torch.equal(pipe(**args).frames, plain(**args).frames)
    set_scales(pipe, {names[0]: 1.0})
    assert not torch.equal(pipe(**args).frames, plain(**args).frames)
    assert not any(type(block.attn1.to_q).__module__.startswith("peft") for block in pipe.transformer.vace_blocks)


def test_two_experts_each_with_its_adapter_and_cache():
    parts = components()
    parts["transformer_2"] = tiny_vace(seed=5)
    pipe = StandInVACEPipeline(**parts, boundary_ratio=0.875, reference_size=32)
    pipe.set_progress_bar_config(disable=True)
    for seed, expert in enumerate(("transformer", "transformer_2")):
        adapter = StandInAdapter.for_transformer(getattr(pipe, expert), rank=4)
        pipe.set_standin_adapter(randomize_lora_up(adapter, seed=seed), expert)
    calls = []
    for name in ("transformer", "transformer_2"):
        getattr(pipe, name).register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
    args = call_args(reference_image=reference_image(), preprocess_reference=False, num_inference_steps=4)
    cached = pipe(**args).frames
    assert {"transformer", "transformer_2"} <= set(calls)
    assert torch.equal(cached, pipe(**args, cache_reference=False).frames)


def first_forward(pipe, **args):
    """The transformer's inputs and output at the first forward of a pipeline call."""
    seen = {}

    def keep_inputs(module, args, kwargs):
        seen.setdefault("inputs", {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    def keep_output(module, args, kwargs, output):
        seen.setdefault("output", output[0].clone())

    hooks = [pipe.transformer.register_forward_pre_hook(keep_inputs, with_kwargs=True),
             pipe.transformer.register_forward_hook(keep_output, with_kwargs=True)]
    try:
        pipe(**args)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["inputs"], seen["output"]


def independent(pipe, inputs, reference_latents):
    """tests/reference_impl.py on the transformer's weights and the captured inputs."""
    return standin_forward(pipe.transformer.state_dict(), dict(pipe.transformer.config),
                           pipe.adapters["transformer"].state_dict(), inputs["hidden_states"], inputs["timestep"],
                           inputs["encoder_hidden_states"], reference_latents,
                           control=inputs["control_hidden_states"],
                           control_scale=inputs["control_hidden_states_scale"][0])


@pytest.mark.parametrize("vace_references", [0, 1, 2])
def test_with_a_reference_it_matches_the_independent_implementation(vace_references):
    # VACE's own reference images are latent frames in front of the video; the Stand-In reference sits at time -1
    # before the first of them (the published implementation's positions), which the independent implementation
    # computes on the captured latents' own grid.
    pipe = standin_vace()

    def args(**extra):
        if vace_references:  # the latents (with the extra frames) drawn by the pipeline, from one seed
            extra.update(reference_images=[reference_image(seed=4 + k, size=(32, 32)) for k in range(vace_references)],
                         latents=None, generator=torch.Generator().manual_seed(0))
        return call_args(reference_image=reference_image(), preprocess_reference=False, **extra)

    inputs, output = first_forward(pipe, **args())
    assert inputs["hidden_states"].shape[2] == 2 + vace_references
    latents = pipe.encode_reference_image(pipe.prepare_reference_image(reference_image(), False))
    assert relative_error(output, independent(pipe, inputs, latents)) <= 1e-5
    assert relative_error(output, independent(pipe, inputs, None)) > 1e-3  # the reference acts
    assert torch.equal(pipe(**args()).frames, pipe(**args(cache_reference=False)).frames)


def test_vace_reference_count():
    image = reference_image()
    assert [vace_reference_count(x) for x in (None, image, [image, image], [[image, image]])] == [0, 1, 2, 2]


def test_control_reference_needs_control(vace_folder, tmp_path, capsys):
    from standin.cli import main

    assert main(["generate", "--base", str(vace_folder / "base"), "--prompt", "x", "-o", str(tmp_path / "o.mp4"),
                 "--control-reference", str(vace_folder / "face.png")]) == 1
    assert "--control-reference needs --control" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_vace_folder_loads_with_an_official_ckpt(vace_folder, tmp_path):
    """A diffusers-layout VACE folder with the official .ckpt (official key names, one LoRA triple per MAIN block:
    the VACE blocks get none) is the pipeline with those numbers set by hand."""
    from test_checkpoint import official_state_dict

    from standin.vace import load_vace_pipeline

    by_hand = load_vace_pipeline(vace_folder / "base", device="cpu")
    assert by_hand.config.default_guidance_scale == 5.0  # the folder records none: Wan's published text guidance
    state = official_state_dict(by_hand.transformer, seed=3)
    torch.save(state, tmp_path / "Stand-In_wan2.1_T2V_14B_ver1.0.ckpt")
    loaded = load_vace_pipeline(vace_folder / "base", tmp_path / "Stand-In_wan2.1_T2V_14B_ver1.0.ckpt", device="cpu")
    adapter = loaded.adapters["transformer"]
    assert len(adapter.blocks) == len(loaded.transformer.blocks) != len(loaded.transformer.vace_blocks)
    assert set(adapter.state_dict()) == set(state)
    hand = StandInAdapter.for_transformer(by_hand.transformer, rank=4)
    hand.load_state_dict(state)
    by_hand.set_standin_adapter(hand)
    for pipe in (loaded, by_hand):
        pipe.set_progress_bar_config(disable=True)
    args = call_args(reference_image=reference_image(), preprocess_reference=False, num_inference_steps=2)
    assert torch.equal(loaded(**args).frames, by_hand(**args).frames)
