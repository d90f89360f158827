"""The whole face swap on frames in memory: paste (no model needed), then denoise window by window, then put the
result back into the full frames. `standin swap` (standin.swap.cli) wraps it with files; tests and the mini-world
measurement (standin_mini.swap_eval) call it directly."""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from standin.swap.paste import PastedVideo, ReferenceFace, crop_to_multiple, paste_video, reference_face
from standin.swap.pipeline import DEFAULT_STRENGTH, StandInSwapPipeline
from standin.swap.windows import WindowPlan, blend, pad_frames, plan_windows

# Frame sides the model accepts are multiples of the VAE's spatial factor (8) x the patch size (2), for every Wan
# model Stand-In supports; checked against the loaded pipeline in `denoise`.
SIZE_MULTIPLE = 16


def prepare_reference(image, size: int, preprocess: bool) -> PIL.Image.Image:
    """The reference as the model sees it, without loading the model: what StandInPipeline.prepare_reference_image
    gives for a base with this reference_size and preprocess_reference (face crop on white, or only squared)."""
    from standin.preprocess import load_image, preprocess_reference
    from standin.preprocess.crop import pad_to_square

    if preprocess:
        return preprocess_reference(image, size=size).image
    square = PIL.Image.fromarray(pad_to_square(np.asarray(load_image(image))).image)
    return square if square.size == (size, size) else square.resize((size, size), PIL.Image.BOX)


@dataclass
class Prepared:
    """Steps 1-2 on the centred crop of the frames whose sides are multiples of 16."""

    crop: tuple  # top, left, height, width in the input frames
    reference: ReferenceFace
    pasted: PastedVideo


def prepare(frames: np.ndarray, reference: PIL.Image.Image, backend=None, progress: bool = True) -> Prepared:
    """Crop the frames to multiples of 16, find the reference face and paste it onto every frame's face.
    NoReferenceFaceError / NoFaceInVideoError (ValueErrors) when there is nothing to swap."""
    face = reference_face(reference, backend)
    top, left, height, width = crop = crop_to_multiple(frames.shape[1], frames.shape[2], SIZE_MULTIPLE)
    cropped = frames[:, top:top + height, left:left + width]
    # On a terminal only (disable=None): piped stderr keeps an error to its one line.
    with tqdm(total=len(cropped), desc="pasting the face", unit="frame", disable=None if progress else True) as bar:
        pasted = paste_video(cropped, face, backend, progress=bar.update)
    return Prepared(crop=crop, reference=face, pasted=pasted)


def window_plan(pipe: StandInSwapPipeline, frames: int, window: int | None = None,
                stride: int | None = None) -> WindowPlan:
    return plan_windows(frames, window or pipe.config.default_num_frames, pipe.vae_scale_factor_temporal, stride)


@torch.no_grad()
def denoise(pipe: StandInSwapPipeline, prepared: Prepared, reference: PIL.Image.Image, prompt: str = "",
            strength: float = DEFAULT_STRENGTH, keep_background: bool = False, seed: int = 0,
            num_inference_steps: int = 20, window: int | None = None, stride: int | None = None,
            progress: bool = True, output_type: str = "np", **kwargs):
    """Step 3-4 window by window; uint8 frames [T, h, w, 3] of the crop (output_type "np"), or each window's
    final latents (output_type "latent", a list, for tests). kwargs go to StandInPipeline.__call__."""
    multiple = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
    if multiple != SIZE_MULTIPLE:
        raise ValueError(f"this model needs sides in multiples of {multiple}, not {SIZE_MULTIPLE}")
    pasted, masks = prepared.pasted.frames, prepared.pasted.masks
    plan = window_plan(pipe, len(pasted), window, stride)
    pasted, masks = pad_frames(pasted, plan.padded), pad_frames(masks, plan.padded)
    vae_factor = pipe.vae_scale_factor_spatial
    channels = pipe.transformer.config.in_channels
    shape = (1, channels, plan.latent_frames(plan.padded), pasted.shape[1] // vae_factor, pasted.shape[2] // vae_factor)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    outputs = []
    before = dict(getattr(pipe, "_progress_bar_config", {}))
    try:
        for k, start in enumerate(plan.starts):
            part = slice(start, start + plan.length)
            label = {"desc": f"denoising window {k + 1}/{len(plan.starts)}"} if progress else {"disable": True}
            pipe.set_progress_bar_config(**{**before, **label})
            result = pipe.swap(pasted[part], masks[part], reference, prompt=prompt, strength=strength,
                               keep_background=keep_background, noise=noise[:, :, plan.latent_slice(k)],
                               num_inference_steps=num_inference_steps, output_type=output_type,
                               preprocess_reference=False, **kwargs)
            outputs.append(result.frames[0])
    finally:
        pipe._progress_bar_config = before
    if output_type == "latent":
        return outputs
    frames = blend(plan, [np.asarray(frames, dtype=np.float64) for frames in outputs])
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def composite(generated: np.ndarray, original: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The generated frames inside the (feathered) mask, the original's pixels outside: out m + in (1 - m). The
    decoder spreads every latent over many pixels (on the mini model's 8x8 latents, over most of the frame), so
    background consistency in latent space alone cannot keep the pixels outside the mask; this does, exactly."""
    weight = masks[..., None].astype(np.float32)
    mixed = generated.astype(np.float32) * weight + original.astype(np.float32) * (1.0 - weight)
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def place(original: np.ndarray, crop: tuple, inner: np.ndarray) -> np.ndarray:
    """`inner` (frames of the crop) put back into copies of the full frames, cut to even sides (H.264)."""
    top, left, height, width = crop
    if inner.ndim == 3:  # masks: zero outside the crop
        full = np.zeros(original.shape[:3], dtype=inner.dtype)
    else:
        full = original.copy()
    full[:, top:top + height, left:left + width] = inner
    return full[:, :full.shape[1] // 2 * 2, :full.shape[2] // 2 * 2]


@dataclass
class SwapResult:
    frames: np.ndarray  # [T, H, W, 3] uint8: the input's frames with the swapped crop (sides cut to even)
    pasted: np.ndarray  # [T, H, W, 3] uint8: the pasted video
    masks: np.ndarray  # [T, H, W] float32 in [0, 1]
    reference: PIL.Image.Image  # as the model saw it
    frames_with_face: int
    windows: int


def swap_frames(pipe: StandInSwapPipeline, frames: np.ndarray, reference_image, backend=None, prompt: str = "",
                preprocess_reference: bool | None = None, progress: bool = True, composite: bool = False,
                **kwargs) -> SwapResult:
    """The whole swap on uint8 frames [T, H, W, 3] in memory (kwargs: see `denoise`)."""
    if preprocess_reference is None:
        preprocess_reference = pipe.config.preprocess_reference
    reference = prepare_reference(reference_image, pipe.config.reference_size, preprocess_reference)
    prepared = prepare(frames, reference, backend, progress)
    inner = denoise(pipe, prepared, reference, prompt, progress=progress, **kwargs)
    plan = window_plan(pipe, len(frames), kwargs.get("window"), kwargs.get("stride"))
    return finish(frames, prepared, reference, inner, plan, composite)


def finish(frames: np.ndarray, prepared: Prepared, reference, inner: np.ndarray, plan: WindowPlan,
           composite_result: bool = False) -> SwapResult:
    if composite_result:
        top, left, height, width = prepared.crop
        inner = composite(inner, frames[:, top:top + height, left:left + width], prepared.pasted.masks)
    return SwapResult(frames=place(frames, prepared.crop, inner), pasted=place(frames, prepared.crop,
                                                                               prepared.pasted.frames),
                      masks=place(frames, prepared.crop, prepared.pasted.masks), reference=reference,
                      frames_with_face=sum(face is not None for face in prepared.pasted.faces),
                      windows=len(plan.starts))
