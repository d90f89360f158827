"""Validation during training: generate with the adapter as it is now, save the videos, measure FaceSim.
(A Wan2.2 expert run measures its expert's loss on the same cases' clips instead: Trainer.validation_loss.)

Generation is the inference pipeline itself (StandInPipeline.__call__ with the live adapter), so a validation
video is exactly what `standin generate` would make from the checkpoint written at the same step.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from standin.io import save_image, save_text
from standin.pipeline import WAN_NEGATIVE_PROMPT
from standin.train.data import MINI, PreparedDataset, is_named_dataset, named_dataset, tensor_to_image
from standin.video import companion_paths, contact_sheet, save_video

logger = logging.getLogger(__name__)


@dataclass
class ValidationCase:
    reference: PIL.Image.Image  # square, already preprocessed (face crop on white)
    prompt: str
    prompt_embeds: torch.Tensor | None = None  # [1, L, D], encoded once when the run starts
    negative_prompt_embeds: torch.Tensor | None = None


def validation_dataset(data: str, count: int, reference_size: int, clip_size: tuple[int, int, int]):
    """(dataset, n): validation uses the first n clips of a prepared dataset, or of an installed dataset's held-out
    split (e.g. "mini": the mini world's held-out identities)."""
    if is_named_dataset(data):
        num_frames, height, width = clip_size
        return named_dataset(data, "test", count, num_frames, height, width, reference_size), count
    dataset = PreparedDataset(data, reference_size, use_latents=False)
    return dataset, min(count, len(dataset))


def validation_cases(data: str, count: int, reference_size: int,
                     clip_size: tuple[int, int, int]) -> list[ValidationCase]:
    """The validation clips' references and prompts (validation_dataset)."""
    dataset, n = validation_dataset(data, count, reference_size, clip_size)
    if is_named_dataset(data):
        items = [dataset[i] for i in range(n)]
        return [ValidationCase(tensor_to_image(item["reference"]), item["prompt"]) for item in items]
    return [ValidationCase(dataset.reference_image(i), dataset.clips[i]["caption"]) for i in range(n)]


def validation_clips(data: str, count: int, reference_size: int, clip_size: tuple[int, int, int]) -> list[dict]:
    """The same clips as pixel samples (video, reference, prompt): what an expert run measures its loss on."""
    dataset, n = validation_dataset(data, count, reference_size, clip_size)
    return [dataset[i] for i in range(n)]


def encode_case_prompts(cases: list[ValidationCase], prompts) -> None:
    """Text embeddings of every case (and of Wan's negative prompt) up front: the text encoder may leave after."""
    negative = prompts.encode(WAN_NEGATIVE_PROMPT)[None]
    for case in cases:
        case.prompt_embeds, case.negative_prompt_embeds = prompts.encode(case.prompt)[None], negative


def face_backend(name: str | None, data: str):
    """None (no FaceSim), or a standin.faces backend. "auto" is the mini world's recogniser for mini data (the
    backend named "mini", a `standin.face_backends` entry point) and the offline dlib default otherwise, or None
    with a warning when that one is not installed; a backend asked for by name must load."""
    if name in (None, "none"):
        return None
    try:
        from standin.faces import get_backend

        if name == "auto":
            return get_backend("mini" if data == MINI else None)
        return get_backend(name)
    except (ImportError, OSError, RuntimeError) as error:
        if name != "auto":
            raise
        logger.warning("validation without FaceSim: no face backend (%s)", error)
        return None


def validation_face_scores(frames: np.ndarray, reference: PIL.Image.Image, backend) -> dict:
    """FaceSim and face rate of one video (standin.eval), or why it could not be measured."""
    try:
        from standin.eval import evaluate_video

        scores = evaluate_video(frames, reference, backend=backend)
    except Exception as error:  # a metric must never end a training run (no face in the reference, model missing)
        return {"face_sim": None, "error": f"{type(error).__name__}: {error}"}
    return {"face_sim": scores.face_sim, "face_rate": scores.face_rate}


def run_validation(pipe, cases: list[ValidationCase], folder: Path | None, *, height: int, width: int,
                   num_frames: int, steps: int, guidance: float, seed: int, fps: int, backend) -> list[dict]:
    """Generate every case (every process must call this when the model is sharded); the main process passes
    the output `folder` and gets the results, the others pass None and only take part in the computation."""
    results = []
    for number, case in enumerate(cases):
        frames = pipe(
            prompt_embeds=case.prompt_embeds, negative_prompt_embeds=case.negative_prompt_embeds,
            reference_image=case.reference, preprocess_reference=False, height=height, width=width,
            num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance,
            reference_guidance=1.0,  # the adapter as the published sampler uses it, whatever the base's default
            generator=torch.Generator().manual_seed(seed + number), output_type="np",
        ).frames[0]
        if folder is None:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        video = folder / f"case-{number:02d}.mp4"
        reference_path, sheet_path = companion_paths(video)  # as `standin generate` names them
        save_video(frames, video, fps=fps)
        save_image(contact_sheet(frames), sheet_path)
        save_image(case.reference, reference_path)
        result = {"case": number, "prompt": case.prompt, "video": str(video)}
        if backend is not None:
            result.update(validation_face_scores((np.clip(frames, 0, 1) * 255).round().astype(np.uint8), case.reference,
                                          backend))
        results.append(result)
    if folder is not None:
        save_text(json.dumps(results, indent=2), folder / "results.json")
    return results
