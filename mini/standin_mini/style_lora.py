"""A style LoRA for the mini base, and what it does when composed with Stand-In.

The style is one the world's renderer produces by post-processing its frames: a cool "blue hour" grade (red and
green damped, blue lifted; see `stylize`). `style_strength` detects it (mean blue-minus-red of the frames, in
[-1, 1]: plain renders score low, graded ones about 0.25 higher). The LoRA is trained with PEFT on the frozen mini
base exactly as community style LoRAs are trained on Wan: flow matching on styled clips of the world's train
split, no reference, rank 8 on every attention projection. It is saved in diffusers' LoRA format and loaded back
with diffusers' own `load_lora_weights`, like any user's LoRA.

    python -m standin_mini.style_lora train --out mini/standin_mini/weights/style_lora.safetensors
    python -m standin_mini.style_lora evaluate --lora mini/standin_mini/weights/style_lora.safetensors \
        --count 16 --scales 0.5 1.0 --out docs/mini_lora_results

The evaluation table: style strength and identity (FaceSim, the world's face model) of the base, the base + LoRA,
Stand-In, and Stand-In + LoRA at each scale, on held-out identities and prompts, every variant from the same noise.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

GRADE = np.array([0.70, 0.85, 1.0], np.float32)
LIFT = np.array([0.0, 0.0, 40.0], np.float32)


def stylize(frames: np.ndarray) -> np.ndarray:
    """uint8 frames [..., 3] -> the same frames in the style (red and green damped, blue lifted)."""
    return np.clip(frames.astype(np.float32) * GRADE + LIFT, 0, 255).round().astype(np.uint8)


def style_strength(frames: np.ndarray) -> float:
    """Mean (blue - red) / 255 over all pixels of uint8 frames [..., 3]."""
    frames = np.asarray(frames, np.float32)
    return float((frames[..., 2] - frames[..., 0]).mean() / 255.0)


def default_base() -> str:
    from standin_mini.model import embedded_model

    return str(embedded_model()["base"])


def training_set(pipe, clips: int, size=(17, 64, 64), seed: int = 0):
    """Styled clips of train-split identities with train prompts: normalised latents and prompt embeddings."""
    from standin.train.data import PromptEncoder, frames_to_tensor, vae_latents
    from standin_mini.data import make_clip, split_identity
    from standin_mini.prompts import sample_prompt
    from standin_mini.world import identity as world_identity

    rng = np.random.default_rng(seed)
    frames_count, height, width = size
    latents, prompts = [], []
    for index in range(clips):
        identity_id = split_identity("train", int(rng.integers(0, 100_000)))
        prompt = sample_prompt(int(rng.integers(0, 2**31)), world_identity(identity_id), "train")
        frames = stylize(make_clip(identity_id, prompt, frames_count, (height, width), seed=index).frames)
        latents.append(vae_latents(pipe.vae, frames_to_tensor(frames)[None]))
        prompts.append(str(prompt))
    return torch.cat(latents), PromptEncoder(pipe, "cpu")(prompts)


def train(out: str, base: str | None = None, clips: int = 64, steps: int = 150, batch: int = 8, rank: int = 8,
          lr: float = 2e-3, seed: int = 0, frames: int = 9) -> dict:
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from standin.loading import load_pipeline
    from standin_mini.model import MINI_SHIFT

    torch.manual_seed(seed)
    started = time.perf_counter()
    pipe = load_pipeline(base or default_base(), device="cpu")
    latents, embeds = training_set(pipe, clips, (frames, 64, 64), seed=seed)
    prepared = time.perf_counter() - started
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    history = []
    transformer.train()
    for step in range(steps):
        index = torch.randint(len(latents), (batch,), generator=generator)
        x0, text = latents[index], embeds[index]
        noise = torch.randn(x0.shape, generator=generator)
        u = torch.rand(batch, generator=generator)
        sigma = MINI_SHIFT * u / (1 + (MINI_SHIFT - 1) * u)  # the sampler's own noise levels
        s = sigma.view(-1, 1, 1, 1, 1)
        prediction = transformer((1 - s) * x0 + s * noise, 1000 * sigma, text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(prediction, noise - x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {np.mean(history[-50:]):.4f}", flush=True)
    transformer.eval()
    layers = get_peft_model_state_dict(transformer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    WanPipeline.save_lora_weights(out.parent, transformer_lora_layers=layers, weight_name=out.name)
    summary = {"clips": clips, "frames": frames, "steps": steps, "batch": batch, "rank": rank, "lr": lr, "seed": seed,
               "parameters": sum(p.numel() for p in layers.values()), "data_seconds": round(prepared, 1),
               "seconds": round(time.perf_counter() - started, 1), "final_loss": float(np.mean(history[-50:]))}
    print(json.dumps(summary))
    return summary


VARIANTS = ("base", "lora", "standin", "both")


def evaluate(lora: str, out: str, base: str | None = None, adapter: str | None = None, count: int = 16,
             scales=(0.5, 1.0), steps: int = 20, guidance: float = 1.0, seed: int = 0,
             size=(17, 64, 64), face_frames: int = 17, reference_guidance: float = 1.0) -> dict:
    from PIL import Image

    from standin.checkpoint import load_adapter
    from standin.eval import evaluate_video
    from standin.io import save_text
    from standin.loading import load_pipeline
    from standin.lora import load_loras
    from standin.video import to_uint8
    from standin_mini.data import make_clip
    from standin_mini.evaluate import held_out_cases
    from standin_mini.identity import MiniFaceBackend
    from standin_mini.model import embedded_model

    model = embedded_model()
    pipe = load_pipeline(base or model["base"], device="cpu")
    pipe.set_standin_adapter(load_adapter(adapter or model["adapter"], pipe.transformer))
    pipe.set_progress_bar_config(disable=True)
    names = load_loras(pipe, [(lora, 1.0)])
    backend = MiniFaceBackend()
    frames_count, height, width = size
    rows: dict[str, list] = {}
    world = {"world": [], "world styled": []}  # the world's own renders, plain and styled
    started = time.perf_counter()
    out = Path(out)
    order = ["base", *[f"lora@{s:g}" for s in scales], "standin", *[f"both@{s:g}" for s in scales]]

    def write(done: int) -> str:
        """The table over the clips done so far (written after every clip: a long run can be read midway)."""
        summary = {}
        for name, values in rows.items():
            # Stand-In's gain: over the same LoRA scale without a reference (the base for "standin").
            baseline = rows[name.replace("both", "lora") if name.startswith("both") else "base"]
            sims = [r["face_sim"] for r in values if r["face_sim"] is not None]
            styled_sims = [r["face_sim_styled_reference"] for r in values if r["face_sim_styled_reference"] is not None]
            styled_gains = [r["face_sim_styled_reference"] - b["face_sim_styled_reference"] for r, b in
                            zip(values, baseline) if r["face_sim_styled_reference"] is not None
                            and b["face_sim_styled_reference"] is not None]
            gains = [r["face_sim"] - b["face_sim"] for r, b in zip(values, baseline)
                     if r["face_sim"] is not None and b["face_sim"] is not None]
            enough = len(gains) > 1
            summary[name] = {"style": float(np.mean([r["style"] for r in values])),
                             "style_sd": float(np.std([r["style"] for r in values], ddof=1)) if enough else 0.0,
                             "face_sim": float(np.mean(sims)) if sims else None,
                             "face_rate": float(np.mean([r["face_rate"] for r in values])),
                             "gain": float(np.mean(gains)) if enough else None,
                             "gain_ci95": float(1.96 * np.std(gains, ddof=1) / np.sqrt(len(gains))) if enough else None,
                             "face_sim_styled_reference": float(np.mean(styled_sims)) if styled_sims else None,
                             "styled_gain": float(np.mean(styled_gains)) if len(styled_gains) > 1 else None,
                             "styled_gain_ci95": float(1.96 * np.std(styled_gains, ddof=1) / np.sqrt(len(styled_gains)))
                             if len(styled_gains) > 1 else None}
        lines = ["| variant | style strength (blue - red) | FaceSim | Stand-In gain over the same LoRA scale "
                 "without reference, 95% CI | FaceSim vs styled reference | its Stand-In gain, 95% CI | face rate |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, values in world.items():
            lines.append(f"| {name} (render, no model) | {np.mean(values):.3f} | | | | | |")
        for name in order:
            s = summary[name]
            shown = name.startswith(("both", "standin")) and s["gain"] is not None
            gain = f"{s['gain']:+.3f} +- {s['gain_ci95']:.3f}" if shown else ""
            sim = f"{s['face_sim']:.3f}" if s["face_sim"] is not None else "-"
            style = f"{s['style']:.3f} (sd {s['style_sd']:.3f})"
            styled_sim = (f"{s['face_sim_styled_reference']:.3f}" if s["face_sim_styled_reference"] is not None
                          else "-")
            styled_gain = (f"{s['styled_gain']:+.3f} +- {s['styled_gain_ci95']:.3f}"
                           if name.startswith(("both", "standin")) and s["styled_gain"] is not None else "")
            lines.append(f"| {name} | {style} | {sim} | {gain} | {styled_sim} | {styled_gain} | "
                         f"{s['face_rate']:.3f} |")
        text = "\n".join(lines)
        report = {"lora": lora, "count": count, "done": done, "scales": list(scales), "steps": steps,
                  "guidance": guidance, "reference_guidance": reference_guidance, "seed": seed, "size": list(size),
                  "face_frames": face_frames,
                  "seconds": round(time.perf_counter() - started, 1), "summary": summary,
                  "world": {k: float(np.mean(v)) for k, v in world.items()}, "clips": rows}
        save_text(json.dumps(report, indent=2), out.with_suffix(".json"))
        save_text(text + "\n", out.with_suffix(".md"))
        return text

    for index, identity_id, prompt, reference in held_out_cases(count, pipe.config.reference_size, seed):
        rendered = make_clip(identity_id, prompt, frames_count, (height, width), seed=index).frames
        world["world"].append(style_strength(rendered))
        world["world styled"].append(style_strength(stylize(rendered)))
        for scale in (0.0, *scales):
            pipe.set_adapters(names, [scale])
            for with_reference in (False, True):
                if scale == 0.0:
                    name = "standin" if with_reference else "base"
                else:
                    name = f"{'both' if with_reference else 'lora'}@{scale:g}"
                image = Image.fromarray(reference) if with_reference else None
                result = pipe(prompt=str(prompt), reference_image=image,
                              preprocess_reference=False, height=height, width=width, num_frames=frames_count,
                              num_inference_steps=steps, guidance_scale=guidance,
                              reference_guidance=reference_guidance,
                              generator=torch.Generator().manual_seed(seed + index))
                frames = to_uint8(result.frames[0])
                scores = evaluate_video(list(frames), Image.fromarray(reference), backend=backend,
                                        num_frames=min(face_frames, len(frames)))
                # The face model was trained on plain renders and reads colours: against the reference in the
                # style too, like is compared with like.
                styled = evaluate_video(list(frames), Image.fromarray(stylize(reference)), backend=backend,
                                        num_frames=min(face_frames, len(frames)))
                rows.setdefault(name, []).append({"identity": identity_id, "prompt": str(prompt),
                                                  "style": style_strength(frames), "face_sim": scores.face_sim,
                                                  "face_sim_styled_reference": styled.face_sim,
                                                  "face_rate": scores.face_rate})
        text = write(index + 1)
        print(f"{index + 1}/{count} clips, {time.perf_counter() - started:.0f} s", flush=True)
    print(text)
    return json.loads(out.with_suffix(".json").read_text())


def world_scores(count: int = 16, seed: int = 0, size=(17, 64, 64), face_frames: int = 17) -> dict:
    """Style strength and FaceSim of the world's own renders of the evaluation's clips, plain and styled: what
    the grade alone does to the statistics (the face model was trained on plain renders)."""
    from PIL import Image

    from standin.eval import evaluate_video
    from standin_mini.data import make_clip
    from standin_mini.evaluate import held_out_cases
    from standin_mini.identity import MiniFaceBackend
    from standin_mini.model import load_mini_pipeline

    backend = MiniFaceBackend()
    reference_size = load_mini_pipeline(adapter=False).config.reference_size
    frames_count, height, width = size
    rows = {"world": [], "world styled": []}
    for index, identity_id, prompt, reference in held_out_cases(count, reference_size, seed):
        plain = make_clip(identity_id, prompt, frames_count, (height, width), seed=index).frames
        for name, frames in (("world", plain), ("world styled", stylize(plain))):
            scores = evaluate_video(list(frames), Image.fromarray(reference), backend=backend,
                                    num_frames=min(face_frames, len(frames)))
            styled = evaluate_video(list(frames), Image.fromarray(stylize(reference)), backend=backend,
                                    num_frames=min(face_frames, len(frames)))
            rows[name].append({"style": style_strength(frames), "face_sim": scores.face_sim,
                               "face_sim_styled_reference": styled.face_sim, "face_rate": scores.face_rate})
    return {name: {"style": float(np.mean([r["style"] for r in values])),
                   "face_sim": float(np.mean([r["face_sim"] for r in values if r["face_sim"] is not None])),
                   "face_sim_styled_reference": float(np.mean([r["face_sim_styled_reference"] for r in values
                                                              if r["face_sim_styled_reference"] is not None])),
                   "face_rate": float(np.mean([r["face_rate"] for r in values]))} for name, values in rows.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    trainer = commands.add_parser("train", help="train the style LoRA on the mini base")
    trainer.add_argument("--out", required=True, help="output .safetensors (diffusers LoRA format)")
    trainer.add_argument("--base", help="the mini base folder (default: the embedded one)")
    trainer.add_argument("--clips", type=int, default=64)
    trainer.add_argument("--frames", type=int, default=9, help="frames per training clip (the style is per frame)")
    trainer.add_argument("--steps", type=int, default=150)
    trainer.add_argument("--batch", type=int, default=8)
    trainer.add_argument("--rank", type=int, default=8)
    trainer.add_argument("--lr", type=float, default=2e-3)
    evaluator = commands.add_parser("evaluate", help="style and identity of base / LoRA / Stand-In / both")
    evaluator.add_argument("--lora", required=True)
    evaluator.add_argument("--out", required=True, help="output stem: STEM.md and STEM.json")
    evaluator.add_argument("--count", type=int, default=16)
    evaluator.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0])
    evaluator.add_argument("--steps", type=int, default=20)
    evaluator.add_argument("--guidance", type=float, default=1.0)
    evaluator.add_argument("--reference-guidance", type=float, default=1.0,
                           help="identity guidance g_ref of the Stand-In rows (1: the published sampler)")
    evaluator.add_argument("--face-frames", type=int, default=17, help="frames FaceSim looks at (evenly spaced)")
    evaluator.add_argument("--frames", type=int, default=17, help="frames per generated clip (4k+1)")
    evaluator.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    world = commands.add_parser("world", help="style and FaceSim of the world's renders, plain and styled")
    world.add_argument("--count", type=int, default=16)
    args = parser.parse_args(argv)
    if args.command == "world":
        print(json.dumps(world_scores(args.count)))
        return 0
    if args.command == "train":
        train(args.out, args.base, args.clips, args.steps, args.batch, args.rank, args.lr, frames=args.frames)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        evaluate(args.lora, args.out, count=args.count, scales=args.scales, steps=args.steps, guidance=args.guidance,
                 size=(args.frames, 64, 64), face_frames=args.face_frames, reference_guidance=args.reference_guidance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
