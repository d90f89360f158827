"""The mini world's results table: identity, motion and prompt accuracy of generated clips on held-out data.

For N held-out (identity, prompt) pairs -- identities and prompt combinations never seen in training -- every
variant generates from the same noise: (a) the base model without reference, (b) Stand-In, and, when given,
(c) Stand-In trained with vanilla self-attention and (d) with shared positions (the paper's ablations). The
world's own render of the same identity and prompt is measured too, as the ceiling the metrics can reach, and
that render encoded and decoded by the model's VAE, the ceiling of any generator that works through it.
FaceSim uses the world's identity model through the same code path as real videos (standin.eval), motion is
the mean optical flow, and the prompt checks are the world's rules (standin_mini.identity.check_prompt).
Two loss diagnostics on held-out clips follow (--reference-clips): whether each adapter uses the reference, and
which parts of the prompt the base reads at which noise level.

    python -m standin_mini.evaluate --base mini/standin_mini/weights/base \
        --adapter standin=mini/standin_mini/weights/standin_adapter.safetensors \
        --adapter vanilla=RUN/adapter.safetensors --adapter shared=RUN2/adapter.safetensors \
        --count 24 --out docs/mini_results
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from standin.checkpoint import load_adapter
from standin.eval import evaluate_video
from standin.io import save_image, save_text
from standin.loading import load_pipeline
from standin.video import to_uint8
from standin_mini.data import make_clip, make_reference, split_identity
from standin_mini.identity import MiniFaceBackend, check_prompt
from standin_mini.prompts import ACTIONS, PLACE_PHRASES, TIME_PHRASES, Prompt, parse_prompt, sample_prompt
from standin_mini.sheet import stack_rows
from standin_mini.world import identity as world_identity

VARIANT_NAMES = {
    "world": "world render (ceiling)",
    "vae": "world render through the VAE (ceiling of any generator on it)",
    "base": "(a) base, no reference",
    "standin": "(b) Stand-In",
    "vanilla": "(c) Stand-In, vanilla attention",
    "shared": "(d) Stand-In, shared positions",
}


def held_out_cases(count: int, reference_size: int, seed: int = 0):
    """(identity, prompt, reference image) for held-out identities and held-out prompt combinations."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        identity_id = split_identity("test", int(rng.integers(0, 10_000)))
        prompt = sample_prompt(int(rng.integers(0, 2**31)), world_identity(identity_id), "test")
        reference = make_reference(identity_id, reference_size, seed=int(rng.integers(0, 2**31)))
        yield index, identity_id, prompt, reference


def measure(frames: np.ndarray, reference: np.ndarray, prompt, backend) -> dict:
    scores = evaluate_video(list(frames), Image.fromarray(reference), backend=backend, num_frames=len(frames))
    checks = check_prompt(frames, prompt, backend)
    return {"face_sim": scores.face_sim, "face_rate": scores.face_rate, "motion": scores.motion,
            "copy_paste": scores.copy_paste_score, "action_ok": checks["action_ok"],
            "place_ok": checks["place_ok"], "time_ok": checks["time_ok"]}


LOSS_SIGMAS = (0.5, 0.8, 0.95)
PROMPT_PARTS = {"action": ACTIONS, "place": PLACE_PHRASES, "time": TIME_PHRASES}


def held_out_latents(pipe, count: int, seed: int, size) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """(items, clean latents, noise) of `count` held-out training-style clips, the loss diagnostics' data."""
    from standin.train.data import vae_latents
    from standin_mini.data import MiniClipDataset

    frames, height, width = size
    dataset = MiniClipDataset("test", count, frames, (height, width), pipe.config.reference_size, seed=seed)
    items = [dataset[i] for i in range(count)]
    clean = vae_latents(pipe.vae, torch.stack([item["video"] for item in items]))
    return items, clean, torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))


def velocities(model, noisy, sigma: float, prompts, reference=None, batch: int = 8) -> torch.Tensor:
    """The model's velocity predictions for clips at noise level sigma, a batch at a time."""
    predictions = []
    for start in range(0, len(noisy), batch):
        part = slice(start, start + batch)
        timestep = torch.full((noisy[part].shape[0],), sigma * 1000)
        extra = {} if reference is None else {"reference_latents": reference[part]}
        predictions.append(model(noisy[part], timestep, prompts[part], return_dict=False, **extra)[0])
    return torch.cat(predictions)


def clip_losses(velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each clip's flow-matching loss."""
    return ((velocity - target) ** 2).flatten(1).mean(1)


def frame_change(latents: torch.Tensor) -> float:
    """Mean square of the change between consecutive frames of [B, C, T, H, W] latents: how much a clip moves."""
    return float((latents[:, :, 1:] - latents[:, :, :-1]).pow(2).mean())


@torch.no_grad()
def reference_use(pipe, adapters: dict, count: int = 48, seed: int = 0, size=(17, 64, 64)) -> dict:
    """Does a model use the identity in its reference? Flow-matching loss on held-out clips at fixed noise levels,
    with the clip's own reference ("right"), another held-out identity's ("wrong", the batch rolled by one) and
    none (the base). Independent of how well the model draws: a model that uses the identity has right < base <
    wrong."""
    from standin.models import StandInModel
    from standin.train.data import PromptEncoder, vae_latents

    if not adapters:
        return {}
    items, clean, noise = held_out_latents(pipe, count, seed, size)
    references = vae_latents(pipe.vae, torch.stack([item["reference"] for item in items]))
    prompts = PromptEncoder(pipe, pipe.device)([item["prompt"] for item in items])
    models = {name: StandInModel(pipe.transformer, adapter).eval() for name, adapter in adapters.items()}
    results = {name: {} for name in adapters}
    for sigma in LOSS_SIGMAS:
        noisy, target = (1 - sigma) * clean + sigma * noise, noise - clean

        def loss(model, reference=None) -> float:
            return float(clip_losses(velocities(model, noisy, sigma, prompts, reference), target).mean())

        # Without a reference every variant is the base model: computed once.
        base = loss(next(iter(models.values())))
        for name, model in models.items():
            results[name][f"base@{sigma}"] = base
            results[name][f"right@{sigma}"] = loss(model, references)
            results[name][f"wrong@{sigma}"] = loss(model, references.roll(1, 0))
    return results


def reference_use_table(results: dict) -> str:
    lines = ["| variant | " + " | ".join(f"sigma {s}: right / none / wrong" for s in LOSS_SIGMAS) + " |",
             "| --- |" + " --- |" * len(LOSS_SIGMAS)]
    for name, losses in results.items():
        cells = [" / ".join(f"{losses[f'{case}@{s}']:.4f}" for case in ("right", "base", "wrong"))
                 for s in LOSS_SIGMAS]
        lines.append(f"| {VARIANT_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replaced(prompt: Prompt, part: str, rng: np.random.Generator) -> Prompt:
    """The prompt with its `part` (action, place or time) replaced by another value of the world's, at random."""
    others = [value for value in PROMPT_PARTS[part] if value != getattr(prompt, part)]
    return dataclasses.replace(prompt, **{part: others[int(rng.integers(len(others)))]})


@torch.no_grad()
def prompt_use(pipe, count: int = 48, seed: int = 0, size=(17, 64, 64)) -> dict:
    """Does the base read each part of its prompt, and at which noise level? Its flow-matching loss on held-out
    clips with the clip's own prompt and with the action, the place or the time replaced (one at a time): a part
    the base reads raises the loss when it is wrong. The sampler lays a clip out at high noise, so a part read only
    at low noise comes too late to be drawn. With the own prompt, how much the clean clip the base predicts moves
    (frame_change), against the clips themselves. {"prompts": {case: texts}, "loss": {"case@sigma": per-clip
    losses}, "predicted_motion": {sigma: frame_change}, "clip_motion": frame_change}."""
    from standin.train.data import PromptEncoder

    items, clean, noise = held_out_latents(pipe, count, seed, size)
    own = [parse_prompt(item["prompt"]) for item in items]
    rng = np.random.default_rng(seed)
    texts = {"own": [str(prompt) for prompt in own],
             **{part: [str(replaced(prompt, part, rng)) for prompt in own] for part in PROMPT_PARTS}}
    encode = PromptEncoder(pipe, pipe.device)
    embeds = {case: encode(values) for case, values in texts.items()}
    model = pipe.transformer.eval()
    loss, motion = {}, {}
    for sigma in LOSS_SIGMAS:
        noisy, target = (1 - sigma) * clean + sigma * noise, noise - clean
        for case, embed in embeds.items():
            velocity = velocities(model, noisy, sigma, embed)
            loss[f"{case}@{sigma}"] = clip_losses(velocity, target).tolist()
            if case == "own":  # the clean clip it predicts: x0 = x_t - sigma v
                motion[str(sigma)] = frame_change(noisy - sigma * velocity)
    return {"prompts": texts, "loss": loss, "predicted_motion": motion, "clip_motion": frame_change(clean)}


def prompt_use_table(use: dict) -> str:
    """The mean loss with each part replaced, as a change over the own prompt's (per clip, then averaged), the
    predicted clip's motion as a share of the clips', and the action's change by the clip's action."""
    loss = {key: np.array(values) for key, values in use["loss"].items()}

    def change(case, sigma, clips=slice(None)):
        return f"{100 * np.mean(loss[f'{case}@{sigma}'][clips] / loss[f'own@{sigma}'][clips] - 1):+.1f}%"

    lines = ["| sigma | own prompt | " + " | ".join(f"{part} replaced" for part in PROMPT_PARTS)
             + " | motion of the predicted clip (of the clips') |", "| --- |" + " --- |" * (2 + len(PROMPT_PARTS))]
    for sigma in LOSS_SIGMAS:
        lines.append(f"| {sigma} | {loss[f'own@{sigma}'].mean():.4f} | " + " | ".join(
            f"{loss[f'{part}@{sigma}'].mean():.4f} ({change(part, sigma)})" for part in PROMPT_PARTS)
            + f" | {use['predicted_motion'][str(sigma)] / use['clip_motion']:.0%} |")
    actions = np.array([parse_prompt(text).action for text in use["prompts"]["own"]])
    lines += ["", "| the clip's action | clips | " + " | ".join(f"action replaced, sigma {s}" for s in LOSS_SIGMAS)
              + " |", "| --- | --- |" + " --- |" * len(LOSS_SIGMAS)]
    for action in ACTIONS:
        if (actions == action).any():
            lines.append(f"| {action} | {(actions == action).sum()} | "
                         + " | ".join(change("action", s, actions == action) for s in LOSS_SIGMAS) + " |")
    return "\n".join(lines)


@torch.no_grad()
def through_vae(vae, frames: np.ndarray) -> np.ndarray:
    """uint8 frames [T, H, W, 3] encoded (posterior mean) and decoded by the model's VAE."""
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample[0].clamp(-1, 1)
    return ((decoded.permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()


def summarize(rows: list[dict], base_rows: list[dict] | None = None) -> dict:
    """Means over clips; with base_rows (the same clips from the base), the paired FaceSim gain over the base and
    its 95% confidence half-width (normal approximation over clips where both found a face)."""
    def mean(key):
        values = [row[key] for row in rows if row[key] is not None]
        return float(np.mean(values)) if values else None

    summary = {"face_sim": mean("face_sim"), "face_rate": mean("face_rate"), "motion": mean("motion"),
               "copy_paste": mean("copy_paste"), "action": mean("action_ok"), "place": mean("place_ok"),
               "time": mean("time_ok"), "clips": len(rows), "gain": None, "gain_ci95": None}
    if base_rows is not None:
        gains = np.array([row["face_sim"] - base["face_sim"] for row, base in zip(rows, base_rows)
                          if row["face_sim"] is not None and base["face_sim"] is not None])
        if len(gains) > 1:
            summary["gain"] = float(gains.mean())
            summary["gain_ci95"] = float(1.96 * gains.std(ddof=1) / np.sqrt(len(gains)))
    return summary


def markdown_table(summary: dict) -> str:
    lines = ["| variant | FaceSim | gain over (a), 95% CI | face rate | motion (% diag/frame) | action | place | "
             "time of day | s / video |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in summary.items():
        cells = [f"{s['face_sim']:.3f}" if s["face_sim"] is not None else "-"]
        cells.append(f"{s['gain']:+.3f} +- {s['gain_ci95']:.3f}" if s["gain"] is not None else "")
        cells += [f"{s[key]:.3f}" if s[key] is not None else "-" for key in ("face_rate", "motion")]
        cells += [f"{s[key]:.0%}" for key in ("action", "place", "time")]
        cells.append(f"{s['seconds_per_video']:.2f}" if s.get("seconds_per_video") is not None else "")
        lines.append(f"| {VARIANT_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SHORT_NAMES = {"world": "world", "vae": "vae", "base": "a: base", "standin": "b: ours", "vanilla": "c: vanilla",
               "shared": "d: shared"}


def comparison_sheet(examples: list[dict], frames_shown: int = 6) -> Image.Image:
    """One block per example: the reference, then a row of evenly spaced frames per variant, labelled."""
    rows = []
    for example in examples:
        for name, frames in example["videos"].items():
            height, width = frames.shape[1:3]
            first = Image.new("RGB", (width, height), "white")
            if name == "world":  # the block starts with the reference the model was given
                first = Image.fromarray(example["reference"]).resize((width, height))
            ImageDraw.Draw(first).text((2, 2), SHORT_NAMES.get(name, name[:10]), fill=(200, 0, 0))
            row = Image.new("RGB", ((frames_shown + 1) * width, height), "white")
            row.paste(first)
            for slot, index in enumerate(np.linspace(0, len(frames) - 1, frames_shown).round().astype(int), 1):
                row.paste(Image.fromarray(frames[index]), (slot * width, 0))
            rows.append(row)
    return stack_rows(rows)


def guided_name(scale: float, steps: int | None) -> str:
    return f"g_ref {scale:g}" + ("" if steps is None else f", first {steps} steps")


def evaluate(base, adapters: dict[str, str], count: int, out: str, steps: int = 20, seed: int = 0,
             size=(17, 64, 64), examples: int = 3, reference_clips: int = 48, guidance: float | None = None,
             reference_guidance: list[tuple[float, int | None]] = ()) -> dict:
    """guidance: text guidance (None: the base's default_guidance_scale). reference_guidance: (g_ref, steps or
    None) settings, each a row of the "standin" adapter with that identity guidance (StandInPipeline's
    reference_guidance / reference_guidance_steps); the other adapter rows use g_ref 1, the published sampler."""
    pipe = load_pipeline(base, device="cpu")
    if guidance is None:
        guidance = pipe.config.default_guidance_scale
    pipe.set_progress_bar_config(disable=True)
    loaded = {name: load_adapter(path, pipe.transformer) for name, path in adapters.items()}
    guided = {guided_name(*setting): setting for setting in reference_guidance}
    if guided and "standin" not in loaded:
        raise ValueError("reference guidance rows use the adapter named standin: give --adapter standin=FILE")
    backend = MiniFaceBackend()
    frames_count, height, width = size
    rows = {name: [] for name in ("world", "vae", "base", *loaded, *guided)}
    seconds = {name: 0.0 for name in ("base", *loaded, *guided)}
    shown, started = [], time.perf_counter()
    for index, identity_id, prompt, reference in tqdm(list(held_out_cases(count, pipe.config.reference_size, seed)),
                                                      desc="held-out clips"):
        videos = {"world": make_clip(identity_id, prompt, frames_count, (height, width), seed=index).frames}
        videos["vae"] = through_vae(pipe.vae, videos["world"])
        for name in ("base", *loaded, *guided):
            if name != "base":
                pipe.set_standin_adapter(loaded[name if name in loaded else "standin"])
            scale, guided_steps = guided.get(name, (1.0, None))
            tick = time.perf_counter()
            result = pipe(prompt=str(prompt), reference_image=None if name == "base" else Image.fromarray(reference),
                          preprocess_reference=False, height=height, width=width, num_frames=frames_count,
                          num_inference_steps=steps, guidance_scale=guidance, reference_guidance=scale,
                          reference_guidance_steps=guided_steps, generator=torch.Generator().manual_seed(seed + index))
            seconds[name] += time.perf_counter() - tick
            videos[name] = to_uint8(result.frames[0])
        for name, frames in videos.items():
            rows[name].append({"identity": identity_id, "prompt": str(prompt), **measure(frames, reference, prompt,
                                                                                        backend)})
        if len(shown) < examples:
            shown.append({"reference": reference, "videos": videos})
    summary = {name: summarize(values, None if name in ("world", "vae", "base") else rows["base"])
               for name, values in rows.items()}
    for name, total in seconds.items():
        summary[name]["seconds_per_video"] = total / count
    use = reference_use(pipe, loaded, reference_clips, seed, size) if reference_clips else {}
    reads = prompt_use(pipe, reference_clips, seed, size) if reference_clips else {}
    report = {"base": str(base), "adapters": adapters, "count": count, "steps": steps, "guidance": guidance,
              "seed": seed, "size": list(size), "seconds": round(time.perf_counter() - started, 1), "summary": summary,
              "reference_use": {"clips": reference_clips, "loss": use}, "prompt_use": reads, "clips": rows}
    text = markdown_table(summary)
    if use:
        text += (f"\n\nFlow-matching loss on {reference_clips} held-out clips with the clip's own reference / none "
                 "/ another identity's:\n\n" + reference_use_table(use))
    if reads:
        text += (f"\n\nThe base's flow-matching loss on the same {reference_clips} clips with the clip's own prompt "
                 "and with one part replaced (change over the own prompt's, per clip):\n\n" + prompt_use_table(reads))
    out = Path(out)
    save_text(json.dumps(report, indent=2), out.with_suffix(".json"))
    save_text(text + "\n", out.with_suffix(".md"))
    save_image(comparison_sheet(shown), out.with_suffix(".png"))
    print(text)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the mini base (diffusers folder)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=FILE",
                        help="standin=..., vanilla=..., shared=... (the table's rows b-d), or any other name")
    parser.add_argument("--count", type=int, default=24, help="held-out (identity, prompt) pairs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, help="text guidance scale (1: none; default: the base's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-clips", type=int, default=48,
                        help="held-out clips for the loss diagnostics: reference use, the base's prompt use (0: skip)")
    parser.add_argument("--reference-guidance", action="append", default=[], metavar="G[:STEPS]",
                        help="add a row: the standin adapter with identity guidance G (in the first STEPS steps)")
    parser.add_argument("--out", required=True, help="output stem: writes STEM.md, STEM.json and STEM.png")
    args = parser.parse_args(argv)
    try:
        reference_guidance = [(float(item.split(":")[0]), int(item.split(":")[1]) if ":" in item else None)
                              for item in args.reference_guidance]
    except ValueError:
        parser.error("--reference-guidance takes G or G:STEPS, e.g. 2 or 3:6")
    if not all("=" in item for item in args.adapter):
        parser.error("--adapter takes NAME=FILE")
    adapters = dict(item.split("=", 1) for item in args.adapter)
    if set(adapters) & {"world", "vae", "base"}:
        parser.error("'world', 'vae' and 'base' name the reference-free rows; give the adapter another name")
    evaluate(args.base, adapters, args.count, args.out, args.steps, args.seed, reference_clips=args.reference_clips,
             guidance=args.guidance, reference_guidance=reference_guidance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
