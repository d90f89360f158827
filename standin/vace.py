"""Pose / depth control with VACE, composed with Stand-In (docs/compositions.md).

StandInVACEPipeline is diffusers' WanVACEPipeline with a reference identity. The published implementation
(infer_with_vace.py, models/wan_video_vace.py) computes the VACE hints from the video tokens alone, before the main
blocks, and adds them after the main blocks it names; the reference tokens live only in the main blocks. diffusers'
WanVACETransformer3DModel has the same structure: its `vace_blocks` run first on the video tokens (their own
attention modules and processors) and their hints are added after `blocks[i]` for i in `vace_layers`. Stand-In's
processors are installed on `transformer.blocks` only, so the VACE blocks never see the reference, and the hints
are added as before. Everything else is diffusers' own WanVACEPipeline.__call__, run inside one reference stream
per expert (the stream's cache records the reference keys/values in the first forward and reuses them).

Without a reference image the call IS WanVACEPipeline's. With `sampler="standin"` (the default, the published
sampler: sigma_i = 1 - i/N shifted) the scheduler's timesteps are Stand-In's; `sampler="diffusers"` keeps
diffusers' own schedule.

The control video fixes the video's size and length: frames are centre-cropped to multiples of 16 pixels (VAE
stride 8 x patch 2) and trimmed to 4k+1 frames; or resized to a size asked, of the same aspect.
"""

import contextlib
import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import WanVACEPipeline

from standin.models.reference import reference_stream
from standin.pipeline import (REFERENCE_SIZE, SAMPLER_SHIFT, StandInPipeline, StandInPipelineOutput,
                              standin_sigmas)


class ControlVideoError(ValueError):
    """A control video that cannot be used; the message is one line."""


def prepare_control_video(frames, multiple: int = 16, temporal: int = 4, num_frames: int | None = None,
                          size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 frames [F, H, W, 3] -> the control video the model takes: the first `num_frames` frames (default: all)
    trimmed to temporal*k+1, and centre-cropped to multiples of `multiple`; or, with size=(height, width), resized
    to that size, which must be multiples of `multiple` and have the video's aspect ratio (within 2%, about what
    the crop to multiples of 16 changes anyway): a different aspect would stretch the poses."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ControlVideoError(f"a control video is frames [F, H, W, 3], got shape {tuple(frames.shape)}")
    count, height, width = frames.shape[:3]
    if num_frames is not None:
        if num_frames > count:
            raise ControlVideoError(f"the control video has {count} frames, fewer than the {num_frames} asked")
        count = num_frames
    count = (count - 1) // temporal * temporal + 1
    if size is not None:
        asked_h, asked_w = size
        if asked_h % multiple or asked_w % multiple or asked_h <= 0 or asked_w <= 0:
            raise ControlVideoError(f"the size asked, {asked_w}x{asked_h}, must be positive multiples of {multiple}")
        if abs(asked_w / asked_h / (width / height) - 1) > 0.02:
            raise ControlVideoError(f"the control video is {width}x{height} px, another aspect than the {asked_w}x"
                                    f"{asked_h} asked: crop it, or drop --height/--width to follow the video")
        resized = [np.asarray(PIL.Image.fromarray(frame).resize((asked_w, asked_h), PIL.Image.BICUBIC))
                   for frame in frames[:count]]
        return np.stack(resized)
    crop_h, crop_w = height // multiple * multiple, width // multiple * multiple
    if crop_h == 0 or crop_w == 0:
        raise ControlVideoError(f"the control video is {width}x{height} px: at least {multiple}x{multiple} needed")
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return np.ascontiguousarray(frames[:count, top:top + crop_h, left:left + crop_w])


def read_control_video(path, multiple: int = 16, temporal: int = 4, num_frames: int | None = None,
                       size: tuple[int, int] | None = None) -> np.ndarray:
    from standin.video import VideoReadError, read_video

    try:
        frames = read_video(path)
    except (VideoReadError, OSError, ValueError) as error:
        raise ControlVideoError(f"control video: {error}".splitlines()[0]) from None
    try:
        return prepare_control_video(frames, multiple, temporal, num_frames, size)
    except ControlVideoError as error:
        raise ControlVideoError(f"{path}: {error}") from None


@contextlib.contextmanager
def standin_timesteps(scheduler):
    """Inside, scheduler.set_timesteps(N) sets Stand-In's schedule (sigma_i = 1 - i/N before the shift), as the
    published pipelines sample; restored on exit."""
    original = scheduler.set_timesteps

    def set_timesteps(num_inference_steps=None, device=None, **kwargs):
        if kwargs.get("sigmas") is None and kwargs.get("timesteps") is None and num_inference_steps is not None:
            kwargs["sigmas"] = standin_sigmas(num_inference_steps).tolist()
            num_inference_steps = None
        return original(num_inference_steps, device=device, **kwargs)

    scheduler.set_timesteps = set_timesteps
    try:
        yield scheduler
    finally:
        del scheduler.set_timesteps  # back to the class's method


class StandInVACEPipeline(WanVACEPipeline):
    """diffusers' WanVACEPipeline with a Stand-In reference (see the module docstring)."""

    def __init__(self, tokenizer, text_encoder, vae, scheduler, transformer=None, transformer_2=None,
                 boundary_ratio: float | None = None, reference_size: int = REFERENCE_SIZE,
                 sampler_shift: float = SAMPLER_SHIFT, preprocess_reference: bool = True, default_fps: int = 25,
                 default_guidance_scale: float = 5.0):
        super().__init__(tokenizer, text_encoder, vae, scheduler, transformer, transformer_2, boundary_ratio)
        self.register_to_config(reference_size=reference_size, sampler_shift=sampler_shift,
                                preprocess_reference=preprocess_reference, default_fps=default_fps,
                                default_guidance_scale=default_guidance_scale)
        self.adapters = {}

    # The adapter and reference handling is StandInPipeline's, shared as is.
    _experts = StandInPipeline._experts
    set_standin_adapter = StandInPipeline.set_standin_adapter
    load_standin_adapter = StandInPipeline.load_standin_adapter
    prepare_reference_image = StandInPipeline.prepare_reference_image
    encode_reference_image = StandInPipeline.encode_reference_image

    def to(self, *args, **kwargs):
        """Move the pipeline as diffusers does, and each adapter with its expert (adapters stay float32)."""
        super().to(*args, **kwargs)
        for name, adapter in self.adapters.items():
            adapter.to(self._experts()[name].patch_embedding.weight.device)
        return self

    def control_multiple(self) -> int:
        transformer = self.transformer if self.transformer is not None else self.transformer_2
        return self.vae_scale_factor_spatial * transformer.config.patch_size[1]

    @torch.no_grad()
    def __call__(self, *args, reference_image=None, preprocess_reference: bool | None = None,
                 cache_reference: bool = True, sampler: str = "standin", **kwargs):
        """WanVACEPipeline.__call__ (video= the control video, conditioning_scale= its strength, ...), with
        `reference_image` the identity (None: exactly WanVACEPipeline). Returns StandInPipelineOutput."""
        if sampler not in ("standin", "diffusers"):
            raise ValueError(f"sampler must be 'standin' or 'diffusers', got {sampler!r}")
        if args:
            raise TypeError("give StandInVACEPipeline's arguments by name")
        experts = self._experts()
        if reference_image is not None and set(self.adapters) != set(experts):
            raise ValueError(f"a reference image needs a Stand-In adapter for each expert {sorted(experts)}; "
                             f"loaded: {sorted(self.adapters)} (call load_standin_adapter)")
        reference = None
        with contextlib.ExitStack() as stack:
            if sampler == "standin":
                stack.enter_context(standin_timesteps(self.scheduler))
            if reference_image is not None:
                if preprocess_reference is None:
                    preprocess_reference = self.config.preprocess_reference
                reference = self.prepare_reference_image(reference_image, preprocess_reference)
                latents = self.encode_reference_image(reference)
                height, width = kwargs.get("height", 480), kwargs.get("width", 832)
                num_frames = kwargs.get("num_frames", 81)
                # VACE's own reference images are latent frames in front of the video: the transformer's grid
                # counts them, and the Stand-In reference sits at time -1 before the first of them, as in the
                # published implementation (docs/compositions.md).
                frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1 + vace_reference_count(
                    kwargs.get("reference_images"))
                for name, model in experts.items():
                    p_t, p_h, p_w = model.config.patch_size
                    spatial = self.vae_scale_factor_spatial
                    grid = (frames // p_t, height // spatial // p_h, width // spatial // p_w)
                    adapter = self.adapters[name].to(model.patch_embedding.weight.device)
                    cache = cache_reference and adapter.attention == "restricted"
                    stack.enter_context(reference_stream(model, adapter, latents.to(model.device), grid, cache))
            output = super().__call__(**kwargs)
        frames = output[0] if isinstance(output, tuple) else output.frames
        if not kwargs.get("return_dict", True):
            return frames, reference
        return StandInPipelineOutput(frames=frames, reference=reference)


def vace_reference_count(reference_images) -> int:
    """How many latent frames VACE's `reference_images` put in front of the video (one per image; a list of lists
    is per batch sample, each of the same length, as WanVACEPipeline requires)."""
    if reference_images is None:
        return 0
    if isinstance(reference_images, PIL.Image.Image):
        return 1
    first = next(iter(reference_images), None)
    return len(first) if isinstance(first, (list, tuple)) else len(reference_images)


def load_vace_pipeline(base: str | os.PathLike, adapter=None, adapter_2=None, device=None,
                       dtype=None) -> StandInVACEPipeline:
    """A Wan VACE diffusers folder (model_index.json naming WanVACEPipeline, a WanVACETransformer3DModel) as a
    StandInVACEPipeline on `device`, with Stand-In's sampler (shift 5) and the adapter file(s) if given."""
    from standin.loading import load_pipeline

    path = Path(base)
    index = path / "model_index.json"
    if path.exists() and not index.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers folder (no model_index.json): --control needs a Wan "
                                "VACE diffusers folder as --base")
    if index.is_file():
        import json

        config = json.loads(index.read_text())
        transformer_class = (config.get("transformer") or [None, None])[1]
        if transformer_class != "WanVACETransformer3DModel":
            raise ValueError(f"{path} is not a Wan VACE model (its transformer is {transformer_class}): --control "
                             "needs a VACE base such as Wan2.1-VACE-14B-diffusers")
    return load_pipeline(base, adapter, adapter_2, device, dtype, pipeline_class=StandInVACEPipeline)


def control_frames_as_images(frames: np.ndarray) -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray(frame) for frame in frames]
