"""`standin generate` and `standin convert`.

Building the parsers imports nothing heavy; the commands import torch, diffusers and the rest when they run.
"""

import json
import os
import time
from pathlib import Path

from standin.cli import device_error, fail

NO_DEFAULT_MODEL = ("no --base given and no default model is installed "
                    "(pip install -e mini/ for the embedded mini model)")


def add_parser(subparsers) -> None:
    generate = subparsers.add_parser(
        "generate", help="a video of the reference person doing what the prompt says",
        description="Make a video of the reference identity doing what the prompt says. Sizes, fps and reference "
        "preprocessing default to what the base records (Wan: 832x480, 81 frames, 25 fps, face crop; the embedded "
        "mini model: 64x64, 17 frames, 8 fps, no crop). Writes NAME.mp4, NAME.reference.png (the reference as "
        "the model saw it) and NAME.sheet.png (a contact sheet of the frames).",
    )
    generate.add_argument("--base", help="Wan diffusers folder, original Wan folder or hub id (default: the "
                          "installed default model, the embedded mini model of standin-mini)")
    generate.add_argument("--adapter", help="the Stand-In adapter (.ckpt / .safetensors) of --base, needed with "
                          "--reference; for Wan2.2 the *_high file (the default model brings its own)")
    generate.add_argument("--adapter-low", help="Wan2.2 only: the *_low adapter file for the low-noise expert")
    generate.add_argument("--reference", help="reference photo (omit to generate without identity control); for the "
                          "mini model a mini-world reference, e.g. examples/woman_34.png or `standin mini reference`")
    generate.add_argument("--prompt", required=True, help="what the person does, and where")
    generate.add_argument("--negative-prompt", help="what to avoid (default: Wan's standard negative prompt)")
    generate.add_argument("-o", "--output", required=True,
                          help="output .mp4 (NAME.reference.png and NAME.sheet.png go beside it)")
    generate.add_argument("--height", type=int, help="video height in pixels (default: the base's)")
    generate.add_argument("--width", type=int, help="video width in pixels (default: the base's)")
    generate.add_argument("--frames", type=int, help="number of frames, 4k+1 for Wan (default: the base's)")
    generate.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    generate.add_argument("--guidance", type=float, default=5.0,
                          help="text guidance scale; 1 turns guidance off (default: %(default)s)")
    generate.add_argument("--seed", type=int, default=0, help="random seed of the initial noise (default: %(default)s)")
    generate.add_argument("--fps", type=int, help="playback rate of the video (default: the base's)")
    generate.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    generate.add_argument("--no-preprocess", action="store_true",
                          help="use the reference as it is (only squared) even where the base crops the face on white "
                          "first (Wan does; the mini model's references are drawn cropped already)")
    generate.add_argument("--no-cache", action="store_true", help="recompute the reference stream every forward")
    generate.add_argument("--sequential-guidance", action="store_true", help="run guidance branches one by one")
    generate.set_defaults(func=run_generate)

    converter = subparsers.add_parser("convert", help="convert a Stand-In adapter (.ckpt or safetensors) to ours")
    converter.add_argument("source", help="the adapter file: official .ckpt, or a safetensors file")
    converter.add_argument("-o", "--output", required=True, help="output .safetensors")
    converter.set_defaults(func=run_convert)


class NoDefaultModelError(Exception):
    pass


def default_model() -> dict:
    """The installed default model ({"base", "adapter"}; the `standin.models` entry point "mini")."""
    from standin.plugins import DEFAULT_MODEL, MODELS, load

    factory = load(MODELS, DEFAULT_MODEL)
    if factory is None:
        raise NoDefaultModelError(NO_DEFAULT_MODEL)
    return factory()


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (the same path spelled differently, or links to one file)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_outputs(outputs: list[Path], inputs: list) -> None:
    """Refuse, before any work, to write an output over an input file (e.g. `-o x.mp4 --reference
    x.reference.png`, which the reference as the model saw it would replace)."""
    from standin.io import check_writable

    for output in outputs:
        check_writable(output)
        for name, value in inputs:
            if value is not None and same_file(output, Path(value)):
                raise ValueError(f"{output} would overwrite the {name} {value}: choose another -o")


def run_generate(args) -> int:
    if args.base is None and (args.adapter is not None or args.adapter_low is not None):
        return fail("--adapter and --adapter-low need --base (the default model brings its own adapter)")
    if args.base is not None and args.reference is not None and args.adapter is None:
        return fail("--reference needs the Stand-In --adapter of --base (or no --reference: the base alone)")
    output = Path(args.output)
    if output.suffix.lower() != ".mp4":
        return fail(f"output must be an .mp4 file, got {output.name}")
    for name in ("steps", "fps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    if device_error(args.device):
        return fail(device_error(args.device))

    from standin.checkpoint import AdapterFileError
    from standin.video import companion_paths

    reference_path, sheet_path = companion_paths(output)
    try:
        if args.reference is not None and not Path(args.reference).is_file():
            raise FileNotFoundError(f"reference image not found: {args.reference}")
        base, adapter, adapter_low = args.base, args.adapter, args.adapter_low
        if base is None:
            model = default_model()
            base = model["base"]
            # The base alone suffices without a reference; the adapter is required (and checked) with one.
            adapter = model["adapter"] if args.reference is not None else None
        check_outputs([output, reference_path, sheet_path],
                      [("reference", args.reference), ("adapter", adapter), ("adapter", adapter_low)])
        import torch

        from standin.loading import load_pipeline

        # Float32 on the CPU; on a GPU, the default model is small enough to stay in float32 too.
        dtype = torch.float32 if args.base is None else None
        pipe = load_pipeline(base, adapter, adapter_low, device=args.device, dtype=dtype)
        extra = {} if args.negative_prompt is None else {"negative_prompt": args.negative_prompt}
        started = time.perf_counter()
        # Sizes, fps and reference preprocessing: what the base records in its config, unless asked otherwise.
        result = pipe(
            prompt=args.prompt, reference_image=args.reference, num_inference_steps=args.steps,
            guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed),
            height=args.height, width=args.width, num_frames=args.frames,
            preprocess_reference=False if args.no_preprocess else None, cache_reference=not args.no_cache,
            batch_guidance=not args.sequential_guidance, **extra,
        )
    except (OSError, ValueError, NoDefaultModelError, AdapterFileError) as error:
        return fail(str(error))
    from standin.io import save_image
    from standin.video import contact_sheet, save_video

    frames = result.frames[0]
    save_video(frames, output, fps=args.fps or pipe.config.default_fps)
    if result.reference is not None:
        save_image(result.reference, reference_path)
    save_image(contact_sheet(frames), sheet_path)
    print(json.dumps({"video": str(output), "reference": None if result.reference is None else str(reference_path),
                      "contact_sheet": str(sheet_path), "frames": len(frames),
                      "seconds": round(time.perf_counter() - started, 2)}))
    return 0


def run_convert(args) -> int:
    from standin.checkpoint import AdapterFileError, convert

    try:
        summary = convert(args.source, args.output)
    except (OSError, AdapterFileError) as error:
        return fail(str(error))
    print(json.dumps({"output": args.output, **summary}))
    return 0
