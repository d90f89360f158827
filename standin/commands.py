"""`standin generate` and `standin convert`."""

import argparse
import json
import time
from pathlib import Path

from standin.checkpoint import AdapterFileError, convert
from standin.cli import fail


def add_parser(subparsers) -> None:
    generate = subparsers.add_parser(
        "generate", help="make a video of the reference identity doing what the prompt says",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    generate.add_argument("--base", help="Wan diffusers folder, original Wan folder or hub id "
                          "(default: the embedded mini model)")
    generate.add_argument("--adapter", help="Stand-In adapter (.ckpt / .safetensors); for Wan2.2 the *_high file")
    generate.add_argument("--adapter-low", help="Wan2.2 only: the *_low adapter file for the low-noise expert")
    generate.add_argument("--reference", help="reference photo (omit to generate without identity control); for the "
                          "mini model a mini-world reference, e.g. examples/woman_34.png or `standin mini reference`")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative-prompt", help="default: Wan's standard negative prompt")
    generate.add_argument("-o", "--output", required=True, help="output .mp4 (a contact sheet .png goes beside it)")
    generate.add_argument("--height", type=int)
    generate.add_argument("--width", type=int)
    generate.add_argument("--frames", type=int, help="4k+1 frames")
    generate.add_argument("--steps", type=int, default=20)
    generate.add_argument("--guidance", type=float, default=5.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--fps", type=int, help="playback rate (default: the published 25, the mini model's 8)")
    generate.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    generate.add_argument("--no-preprocess", action="store_true",
                          help="use the reference as it is (only squared); always so for the mini model, whose "
                          "references are drawn already cropped on white")
    generate.add_argument("--no-cache", action="store_true", help="recompute the reference stream every forward")
    generate.add_argument("--sequential-guidance", action="store_true", help="run guidance branches one by one")
    generate.set_defaults(func=run_generate)

    converter = subparsers.add_parser("convert", help="convert a Stand-In adapter (.ckpt or safetensors) to ours")
    converter.add_argument("source")
    converter.add_argument("-o", "--output", required=True, help="output .safetensors")
    converter.set_defaults(func=run_convert)


def run_generate(args) -> int:
    import torch

    from standin.io import check_writable
    from standin.loading import load_pipeline
    from standin.io import save_image
    from standin.video import contact_sheet, save_video

    output = Path(args.output)
    sheet_path = output.with_suffix(".png")
    try:
        check_writable(output)
        if output.suffix.lower() != ".mp4":
            raise ValueError(f"output must be an .mp4 file, got {output.name}")
        if args.reference is not None and not Path(args.reference).is_file():
            raise FileNotFoundError(f"reference image not found: {args.reference}")
        preprocess = not args.no_preprocess
        if args.base is None:
            from standin.mini.model import MINI_FPS, MINI_SIZES, load_mini_pipeline

            # The base alone suffices without a reference; the adapter is required (and checked) with one.
            pipe = load_mini_pipeline(device=args.device, adapter=args.reference is not None)
            sizes, fps = MINI_SIZES, MINI_FPS
            # The face detector knows real faces; mini-world references come cropped on white from the world.
            preprocess = False
        else:
            pipe = load_pipeline(args.base, args.adapter, args.adapter_low, device=args.device)
            sizes, fps = dict(height=480, width=832, num_frames=81), 25
        sizes = dict(sizes)
        for key, value in (("height", args.height), ("width", args.width), ("num_frames", args.frames)):
            if value is not None:
                sizes[key] = value
        extra = {} if args.negative_prompt is None else {"negative_prompt": args.negative_prompt}
        started = time.perf_counter()
        result = pipe(
            prompt=args.prompt, reference_image=args.reference, num_inference_steps=args.steps,
            guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed),
            preprocess_reference=preprocess, cache_reference=not args.no_cache,
            batch_guidance=not args.sequential_guidance, **sizes, **extra,
        )
    except (OSError, ValueError, AdapterFileError) as error:
        return fail(str(error))
    frames = result.frames[0]
    save_video(frames, output, fps=args.fps or fps)
    save_image(contact_sheet(frames), sheet_path)
    print(json.dumps({"video": str(output), "contact_sheet": str(sheet_path), "frames": len(frames),
                      "seconds": round(time.perf_counter() - started, 2)}))
    return 0


def run_convert(args) -> int:
    try:
        summary = convert(args.source, args.output)
    except (OSError, AdapterFileError) as error:
        return fail(str(error))
    print(json.dumps({"output": args.output, **summary}))
    return 0
