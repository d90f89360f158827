"""Two people in one clip, measured in the mini world (docs/mini_pairs.md): does each reference's identity land on
the person the prompt puts it on?

For N held-out cases -- two distinct held-out identities A and B, and a held-out (action, place, time) combination
told for both, A named first ("A man and a woman wave on a beach at noon."; the world draws the first named on the
left) -- every variant generates from the same noise: (a) the base, no reference; (b) Stand-In with A's reference
alone and (c) with B's alone; (d) Stand-In with both, [A, B] (StandInPipeline's several references, zero-shot: the
adapter was trained on one person a clip), and (e) both in the other order, [B, A], which tells whether the order
of the references or the prompt decides who lands where. The mini model was never shown two people either, and its
tokenizer knows neither "and" nor the plural verbs (standin_mini.prompts). The world's own render of the case, and
that render through the model's VAE, are measured as ceilings.

Measured in every frame with the world's face model: all faces are detected and embedded, and the references A and B
are matched to them by the Hungarian algorithm on cosine similarity (the assignment with the largest total
similarity; each reference gets at most one face, each face at most one reference). Per identity X:
- FaceSim X: the mean similarity of X's matched face to X's reference, over the frames where X got a face;
- face rate X: the fraction of frames where X got a face.
Swap rate: over the frames where both got a face, the fraction where A's matched face is to the right of B's, i.e.
A's identity sits on the person the prompt and the world put on the right (0 = always where told, 0.5 = chance).
Two faces: the fraction of frames with at least two detected faces. Every number is a mean over cases with its 95%
interval (normal approximation over cases), and FaceSim's gain over the base on the same case and noise.

    python -m standin_mini.pair_eval --count 48 --guidance 5 --guidance 1 --examples 2 --out docs/mini_pairs_results
"""

import argparse
import json
import sys
import time
from itertools import permutations
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from standin.eval.metrics import reference_embedding
from standin.io import save_image, save_text
from standin.video import to_uint8
from standin_mini.data import make_pair_clip, make_reference, split_identity
from standin_mini.evaluate import through_vae
from standin_mini.identity import MiniFaceBackend
from standin_mini.model import load_mini_pipeline
from standin_mini.prompts import sample_pair_prompt
from standin_mini.sheet import stack_rows
from standin_mini.world import identity as world_identity

# What each generated variant is given as its reference(s): "A", "B" index the case's two references.
GENERATED = {"base": (), "A only": ("A",), "B only": ("B",), "A + B": ("A", "B"), "B + A": ("B", "A")}
VARIANT_NAMES = {"world": "world render (ceiling)", "vae": "world render through the VAE",
                 "base": "(a) base, no reference", "A only": "(b) Stand-In, reference A only",
                 "B only": "(c) Stand-In, reference B only", "A + B": "(d) Stand-In, references [A, B]",
                 "B + A": "(e) Stand-In, references [B, A]"}


def held_out_pairs(count: int, reference_size: int, seed: int = 0):
    """(index, identity A, identity B, two-person prompt, reference A, reference B): distinct held-out identities,
    held-out (action, place, time) combinations."""
    rng = np.random.default_rng([seed, 5])
    for index in range(count):
        identity_a = split_identity("test", int(rng.integers(0, 10_000)))
        identity_b = identity_a
        while identity_b == identity_a:
            identity_b = split_identity("test", int(rng.integers(0, 10_000)))
        prompt = sample_pair_prompt(int(rng.integers(0, 2**31)), world_identity(identity_a),
                                    world_identity(identity_b), "test")
        references = [make_reference(i, reference_size, seed=int(rng.integers(0, 2**31)))
                      for i in (identity_a, identity_b)]
        yield index, identity_a, identity_b, prompt, references[0], references[1]


def match_faces(similarity: np.ndarray) -> list[int | None]:
    """The Hungarian assignment on a [faces, references] similarity matrix: for each reference the index of its
    face, or None. With at most a few faces and two references, trying every one-to-one pairing of min(faces,
    references) faces and references is exact, and plainer than an assignment solver."""
    faces, references = similarity.shape
    k = min(faces, references)
    best, best_total = [None] * references, -np.inf
    for rows in permutations(range(faces), k):
        for columns in permutations(range(references), k):
            total = similarity[list(rows), list(columns)].sum()
            if total > best_total:
                best_total, best = total, [None] * references
                for row, column in zip(rows, columns):
                    best[column] = row
    return best


def frame_matches(frames: np.ndarray, references: np.ndarray, backend) -> tuple[list[list], list[int]]:
    """Per frame, per reference (rows of `references`, [2, 128] embeddings): (similarity, face centre x) of the
    face matched to it, or None; and the number of faces detected in each frame."""
    faces, _, _ = backend.analyse(frames)
    found = [(t, face) for t, frame_faces in enumerate(faces) for face in frame_faces]
    embeddings = backend.describe([frames[t] for t, _ in found], [face for _, face in found])[0] if found else None
    matches, start = [], 0
    for frame_faces in faces:
        similarity = (embeddings[start:start + len(frame_faces)] @ references.T if frame_faces
                      else np.zeros((0, len(references))))
        start += len(frame_faces)
        matches.append([None if row is None else
                        (float(similarity[row, column]), (frame_faces[row].box[0] + frame_faces[row].box[2]) / 2)
                        for column, row in enumerate(match_faces(similarity))])
    return matches, [len(frame_faces) for frame_faces in faces]


def clip_scores(matches: list[list], faces_per_frame: list[int]) -> dict:
    """One clip's FaceSim and face rate per identity, swap rate and two-face rate (see the module docstring)."""
    scores = {}
    for column, name in enumerate("AB"):
        found = [frame[column][0] for frame in matches if frame[column] is not None]
        scores[f"face_sim_{name}"] = float(np.mean(found)) if found else None
        scores[f"face_rate_{name}"] = len(found) / len(matches)
    both = [frame for frame in matches if frame[0] is not None and frame[1] is not None]
    scores["swap"] = float(np.mean([a[1] > b[1] for a, b in both])) if both else None
    scores["both_frames"] = len(both)
    scores["two_faces"] = float(np.mean([n >= 2 for n in faces_per_frame]))
    return scores


KEYS = ("face_sim_A", "face_sim_B", "face_rate_A", "face_rate_B", "two_faces", "swap")


def _mean(values: list) -> tuple[float | None, float | None, int]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    half = float(1.96 * np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
    return float(np.mean(values)), half, len(values)


def summarize(rows: list[dict], base_rows: list[dict] | None) -> dict:
    """Means over cases with 95% intervals; with base_rows (the same cases from the base), the paired FaceSim gain
    per identity over cases where both found that identity's face."""
    summary = {}
    for key in KEYS:
        summary[key], summary[key + "_ci95"], summary[key + "_n"] = _mean([row[key] for row in rows])
    for name in "AB":
        key = f"face_sim_{name}"
        gains = None if base_rows is None else [
            None if row[key] is None or base[key] is None else row[key] - base[key]
            for row, base in zip(rows, base_rows)]
        summary[f"gain_{name}"], summary[f"gain_{name}_ci95"], _ = _mean(gains or [])
    summary["swap_frames"] = int(sum(row["both_frames"] for row in rows))
    return summary


def _cell(value, ci=None, digits=3, signed=False) -> str:
    if value is None:
        return "-"
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return text + (f" +- {ci:.{digits}f}" if ci is not None else "")


def markdown_table(summary: dict) -> str:
    lines = ["| variant | FaceSim A (left) | FaceSim B (right) | gain A over (a) | gain B over (a) | face rate A | "
             "face rate B | two faces | swap rate (frames) | s / video |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in summary.items():
        seconds = s.get("seconds_per_video")
        lines.append(
            f"| {name} | {_cell(s['face_sim_A'], s['face_sim_A_ci95'])}"
            f" | {_cell(s['face_sim_B'], s['face_sim_B_ci95'])}"
            f" | {_cell(s['gain_A'], s['gain_A_ci95'], signed=True) if s['gain_A'] is not None else ''}"
            f" | {_cell(s['gain_B'], s['gain_B_ci95'], signed=True) if s['gain_B'] is not None else ''}"
            f" | {_cell(s['face_rate_A'], digits=2)} | {_cell(s['face_rate_B'], digits=2)}"
            f" | {_cell(s['two_faces'], digits=2)} | {_cell(s['swap'], s['swap_ci95'], digits=2)} ({s['swap_frames']})"
            f" | {'' if seconds is None else f'{seconds:.2f}'} |")
    return "\n".join(lines)


MATCH_COLOURS = ((230, 30, 30), (30, 90, 240))  # A red, B blue


def contact_sheet(examples: list[dict], frames_shown: int = 6, zoom: int = 2, label_width: int = 90) -> Image.Image:
    """Per example: the two references and the prompt, then one row of frames per variant, with a red tick above
    the face matched to A and a blue one above the face matched to B; pixels zoomed `zoom` x, labels on the left."""
    rows = []
    for example in examples:
        height, width = example["rows"]["world"][0].shape[1:3]
        head = Image.new("RGB", (label_width + frames_shown * width * zoom, height * zoom), "white")
        for slot, reference in enumerate((example["reference_a"], example["reference_b"])):
            head.paste(Image.fromarray(reference).resize((width * zoom, height * zoom), Image.NEAREST),
                       (label_width + slot * width * zoom, 0))
        draw = ImageDraw.Draw(head)
        draw.text((4, head.height // 2 - 6), "references A, B", fill=(0, 0, 0))
        draw.text((label_width + 2 * width * zoom + 6, head.height // 2 - 6), example["prompt"], fill=(0, 0, 0))
        rows.append(head)
        for label, (frames, matches) in example["rows"].items():
            row = Image.new("RGB", (frames_shown * width, height), "white")
            shown = np.linspace(0, len(frames) - 1, frames_shown).round().astype(int)
            for slot, index in enumerate(shown):
                row.paste(Image.fromarray(frames[index]), (slot * width, 0))
            row = row.resize((row.width * zoom, row.height * zoom), Image.NEAREST)
            draw = ImageDraw.Draw(row)
            for slot, index in enumerate(shown):
                for match, colour in zip(matches[index], MATCH_COLOURS):
                    if match is not None:
                        x = (slot * width + match[1]) * zoom
                        draw.rectangle((x - 2, 0, x + 2, 4), fill=colour)
            labelled = Image.new("RGB", (row.width + label_width, row.height), "white")
            labelled.paste(row, (label_width, 0))
            ImageDraw.Draw(labelled).text((4, row.height // 2 - 6), label, fill=(0, 0, 0))
            rows.append(labelled)
        rows.append(Image.new("RGB", (rows[-1].width, 8), "white"))
    return stack_rows(rows)


def evaluate(count: int, out: str, guidances=(5.0,), steps: int = 20, seed: int = 0, examples: int = 3,
             reference_guidance: float = 1.0) -> dict:
    torch.set_num_threads(1)  # the mini model is small: one thread beats several on a shared CPU
    pipe = load_mini_pipeline()
    pipe.set_progress_bar_config(disable=True)
    backend = MiniFaceBackend()
    frames_count, height, width = pipe.config.default_num_frames, pipe.config.default_height, pipe.config.default_width
    variants = {(v, g): f"{VARIANT_NAMES[v]}, guidance {g:g}" for g in guidances for v in GENERATED}
    rows = {name: [] for name in (VARIANT_NAMES["world"], VARIANT_NAMES["vae"], *variants.values())}
    seconds = dict.fromkeys(variants.values(), 0.0)
    shown, started = [], time.perf_counter()
    for index, identity_a, identity_b, prompt, reference_a, reference_b in tqdm(
            list(held_out_pairs(count, pipe.config.reference_size, seed)), desc="held-out pairs"):
        references = {"A": reference_a, "B": reference_b}
        embedded = np.stack([reference_embedding(references[k], backend) for k in "AB"])
        clip = make_pair_clip(identity_a, identity_b, prompt, frames_count, (height, width), seed=index)
        videos = {("world", None): clip.frames, ("vae", None): through_vae(pipe.vae, clip.frames)}
        for (variant, guidance), name in variants.items():
            images = [Image.fromarray(references[k]) for k in GENERATED[variant]]
            tick = time.perf_counter()
            result = pipe(prompt=str(prompt), reference_image=images or None, preprocess_reference=False,
                          height=height, width=width, num_frames=frames_count, num_inference_steps=steps,
                          guidance_scale=guidance, reference_guidance=reference_guidance,
                          generator=torch.Generator().manual_seed(seed + index))
            seconds[name] += time.perf_counter() - tick
            videos[variant, guidance] = to_uint8(result.frames[0])
        example = {"reference_a": reference_a, "reference_b": reference_b, "prompt": str(prompt), "rows": {}}
        for (variant, guidance), frames in videos.items():
            matches, faces_per_frame = frame_matches(frames, embedded, backend)
            rows[variants.get((variant, guidance), VARIANT_NAMES[variant])].append(
                {"identity_a": identity_a, "identity_b": identity_b, "prompt": str(prompt),
                 **clip_scores(matches, faces_per_frame)})
            if guidance in (None, guidances[0]):
                example["rows"][variant] = (frames, matches)
        if len(shown) < examples:
            shown.append(example)
    summary = {name: summarize(rows[name], None) for name in (VARIANT_NAMES["world"], VARIANT_NAMES["vae"])}
    for (variant, guidance), name in variants.items():
        base = None if variant == "base" else rows[variants["base", guidance]]
        summary[name] = {**summarize(rows[name], base), "seconds_per_video": seconds[name] / count}
    report = {"count": count, "steps": steps, "guidances": list(guidances), "reference_guidance": reference_guidance,
              "seed": seed,
              "size": [frames_count, height, width], "seconds": round(time.perf_counter() - started, 1),
              "summary": summary, "clips": rows}
    text = markdown_table(summary)
    out = Path(out)
    save_text(json.dumps(report, indent=2), out.with_suffix(".json"))
    save_text(text + "\n", out.with_suffix(".md"))
    save_image(contact_sheet(shown), out.with_suffix(".png"))
    print(text)
    print(f"{report['seconds']} s")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=12, help="held-out cases (pairs of identities)")
    parser.add_argument("--guidance", type=float, action="append", help="text guidance scale(s) (default: 5)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=3, help="cases shown on the contact sheet")
    parser.add_argument("--reference-guidance", type=float, default=1.0,
                        help="identity guidance g_ref of the rows with references (1: the published sampler)")
    parser.add_argument("--out", required=True, help="output stem: writes STEM.md, STEM.json and STEM.png")
    args = parser.parse_args(argv)
    evaluate(args.count, args.out, tuple(args.guidance or (5.0,)), args.steps, args.seed, args.examples,
             args.reference_guidance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
