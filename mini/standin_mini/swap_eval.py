"""Face swap measured in the mini world (docs/swap.md): identity A's clip, identity B's reference, `standin swap`.

For N held-out clips (held-out identity A acting out a held-out prompt combination) and another held-out identity
B, the swap runs at every strength, with and without background consistency, from the same noise, with the
prompt of the clip told for B's kind of person. Measured on each output, with the world's face model through
standin.eval as for any video:
- FaceSim to B (the reference given; should rise over the input's) and to A (the person replaced; should fall),
  each against a reference photo of that identity, with the fraction of frames where a face is found;
- PSNR against the input outside the swap mask (pixels the mask leaves at exactly zero): how much of the rest of
  the video survives;
- motion: the mean optical-flow magnitude (standin.eval) of input and output, and the flow difference, the mean
  end-point distance between the input's and the output's Farneback flows, both in percent of the frame diagonal
  per frame: how much of the input's motion the output keeps (0 = all of it).
Each output is measured as it is and composited (`--composite`: the output inside the feathered mask, the
input's pixels outside). Rows for the input itself, the input through the model's VAE (the best any output can
be outside the mask: the mini VAE is lossy) and the pasted video (step 2 alone, no denoising) bound what the swap
can reach.

    python -m standin_mini.swap_eval --count 12 --guidance 5 --guidance 1 --out docs/swap_results --sheet docs/swap.png
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from standin.eval import evaluate_video
from standin.io import save_image, save_text
from standin.swap.pipeline import StandInSwapPipeline
from standin.swap.run import composite, denoise, prepare
from standin_mini.data import make_clip, make_reference, split_identity
from standin_mini.evaluate import held_out_cases, through_vae
from standin_mini.identity import MiniFaceBackend
from standin_mini.model import load_mini_pipeline
from standin_mini.sheet import stack_rows
from standin_mini.world import identity as world_identity

STRENGTHS = (0.7, 0.85, 1.0)


def face_sims(frames: np.ndarray, reference: np.ndarray, backend) -> dict:
    scores = evaluate_video(list(frames), Image.fromarray(reference), backend=backend, num_frames=len(frames))
    return {"face_sim": scores.face_sim, "face_rate": scores.face_rate, "motion": scores.motion}


def psnr_outside(output: np.ndarray, original: np.ndarray, masks: np.ndarray) -> float | None:
    outside = masks <= 0.0
    if not outside.any():
        return None
    error = (output.astype(np.float64) - original.astype(np.float64)) ** 2
    mse = error[outside].mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in (a, b)]
    return cv2.calcOpticalFlowFarneback(gray[0], gray[1], None, 0.5, 3, 15, 3, 5, 1.2, 0)


def flow_difference(output: np.ndarray, original: np.ndarray) -> float:
    """Mean end-point distance between the two videos' consecutive-frame flows, % of the frame diagonal."""
    diagonal = np.hypot(*original.shape[1:3])
    distances = [np.linalg.norm(_flow(output[i], output[i + 1]) - _flow(original[i], original[i + 1]), axis=2).mean()
                 for i in range(len(original) - 1)]
    return float(100.0 * np.mean(distances) / diagonal)


def measure(frames, original, masks, reference_a, reference_b, backend) -> dict:
    to_b, to_a = face_sims(frames, reference_b, backend), face_sims(frames, reference_a, backend)
    return {"face_sim_b": to_b["face_sim"], "face_sim_a": to_a["face_sim"], "face_rate": to_b["face_rate"],
            "psnr_outside": psnr_outside(frames, original, masks), "motion": to_b["motion"],
            "flow_difference": flow_difference(frames, original)}


def _mean(values):
    values = [v for v in values if v is not None]
    if values and not np.isfinite(values).all():
        return float("inf"), None, len(values)  # PSNR of the input against itself
    return (float(np.mean(values)), float(1.96 * np.std(values, ddof=1) / np.sqrt(len(values)))
            if len(values) > 1 else 0.0, len(values)) if values else (None, None, 0)


def summarize(rows: list[dict]) -> dict:
    summary = {}
    for key in ("face_sim_b", "face_sim_a", "face_rate", "psnr_outside", "motion", "flow_difference"):
        mean, half, count = _mean([row[key] for row in rows])
        summary[key] = mean
        summary[key + "_ci95"] = half
        summary[key + "_n"] = count
    return summary


def _cell(value, digits=3, ci=None):
    if value is None:
        return "-"
    if value == float("inf"):
        return "identical"
    return f"{value:.{digits}f}" + (f" +- {ci:.{digits}f}" if ci else "")


def markdown_table(summary: dict) -> str:
    lines = ["| variant | FaceSim to B (reference), 95% CI | FaceSim to A (replaced) | face rate "
             "| PSNR outside mask (dB) | motion | flow difference |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in summary.items():
        lines.append(f"| {name} | {_cell(s['face_sim_b'], 3, s['face_sim_b_ci95'])} | {_cell(s['face_sim_a'])} | "
                     f"{_cell(s['face_rate'], 2)} | {_cell(s['psnr_outside'], 1)} | {_cell(s['motion'])} | "
                     f"{_cell(s['flow_difference'])} |")
    return "\n".join(lines)


def variant_name(strength: float, keep: bool, guidance: float) -> str:
    return f"strength {strength}{', keep background' if keep else ''}, guidance {guidance:g}"


def contact_sheet(examples: list[dict], frames_shown: int = 6, zoom: int = 2) -> Image.Image:
    """Per example: the reference B, then rows input / pasted / outputs, labelled; pixels zoomed `zoom` x."""
    rows = []
    for example in examples:
        for label, frames in example["rows"].items():
            height, width = frames.shape[1:3]
            first = Image.new("RGB", (width, height), "white")
            if label == "input":
                first = Image.fromarray(example["reference"]).resize((width, height))
            row = Image.new("RGB", ((frames_shown + 1) * width, height), "white")
            row.paste(first)
            for slot, index in enumerate(np.linspace(0, len(frames) - 1, frames_shown).round().astype(int), 1):
                row.paste(Image.fromarray(frames[index]), (slot * width, 0))
            row = row.resize((row.width * zoom, row.height * zoom), Image.NEAREST)
            labelled = Image.new("RGB", (row.width + 150, row.height), "white")
            labelled.paste(row, (150, 0))
            ImageDraw.Draw(labelled).text((4, row.height // 2 - 6), label, fill=(0, 0, 0))
            rows.append(labelled)
        rows.append(Image.new("RGB", (rows[-1].width, 6), "white"))
    return stack_rows(rows)


def evaluate(count: int, out: str, sheet: str | None, guidances=(5.0,), strengths=STRENGTHS, steps: int = 20,
             seed: int = 0, examples: int = 3) -> dict:
    torch.set_num_threads(1)  # the mini model is small: one thread beats several on a shared CPU
    pipe = StandInSwapPipeline.from_standin(load_mini_pipeline())
    pipe.set_progress_bar_config(disable=True)
    backend = MiniFaceBackend()
    size = pipe.config.reference_size
    frames_count, height, width = pipe.config.default_num_frames, pipe.config.default_height, pipe.config.default_width
    rng = np.random.default_rng(seed + 1)
    rows: dict[str, list] = {"input (identity A)": [], "input through the VAE": [], "pasted (no denoising)": []}
    shown, started = [], time.perf_counter()
    for index, identity_a, prompt, reference_a in tqdm(list(held_out_cases(count, size, seed)), desc="held-out clips"):
        identity_b = identity_a
        while identity_b == identity_a:
            identity_b = split_identity("test", int(rng.integers(0, 10_000)))
        reference_b = make_reference(identity_b, size, seed=int(rng.integers(0, 2**31)))
        clip = make_clip(identity_a, prompt, frames_count, (height, width), seed=index)
        told = str(dataclasses.replace(prompt, who=world_identity(identity_b).who))
        prepared = prepare(clip.frames, Image.fromarray(reference_b), backend, progress=False)
        masks = prepared.pasted.masks
        common = {"identity_a": identity_a, "identity_b": identity_b, "prompt": told,
                  "frames_with_face": sum(f is not None for f in prepared.pasted.faces)}
        measured = lambda frames: {**common, **measure(frames, clip.frames, masks, reference_a, reference_b, backend)}
        rows["input (identity A)"].append(measured(clip.frames))
        rows["input through the VAE"].append(measured(through_vae(pipe.vae, clip.frames)))
        rows["pasted (no denoising)"].append(measured(prepared.pasted.frames))
        example = {"reference": reference_b, "rows": {"input": clip.frames, "pasted": prepared.pasted.frames}}
        for guidance in guidances:
            for strength in strengths:
                for keep in (False, True):
                    frames = denoise(pipe, prepared, Image.fromarray(reference_b), told, strength=strength,
                                     keep_background=keep, seed=seed + index, num_inference_steps=steps,
                                     guidance_scale=guidance, progress=False)
                    rows.setdefault(variant_name(strength, keep, guidance), []).append(measured(frames))
                    pasted_back = composite(frames, clip.frames, masks)
                    rows.setdefault(variant_name(strength, keep, guidance) + ", composite", []).append(
                        measured(pasted_back))
                    if guidance == guidances[0] and strength == 0.85:
                        example["rows"][f"output 0.85{' keep bg' if keep else ''}"] = frames
                        if keep:
                            example["rows"]["0.85 keep bg composite"] = pasted_back
        if len(shown) < examples:
            shown.append(example)
    summary = {name: summarize(values) for name, values in rows.items()}
    report = {"count": count, "steps": steps, "guidances": list(guidances), "strengths": list(strengths),
              "seed": seed, "seconds": round(time.perf_counter() - started, 1), "summary": summary, "clips": rows}
    text = markdown_table(summary)
    out = Path(out)
    save_text(json.dumps(report, indent=2), out.with_suffix(".json"))
    save_text(text + "\n", out.with_suffix(".md"))
    if sheet:
        save_image(contact_sheet(shown), sheet)
    print(text)
    print(f"{report['seconds']} s")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=12, help="held-out clips")
    parser.add_argument("--guidance", type=float, action="append", help="text guidance scale(s) (default: 5)")
    parser.add_argument("--strength", type=float, action="append", help="strengths (default: 0.7, 0.85, 1.0)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output stem: writes STEM.md and STEM.json")
    parser.add_argument("--sheet", help="contact sheet PNG: input / pasted / output rows of the first clips")
    args = parser.parse_args(argv)
    evaluate(args.count, args.out, args.sheet, tuple(args.guidance or (5.0,)), tuple(args.strength or STRENGTHS),
             args.steps, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
