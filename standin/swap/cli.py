"""`standin swap VIDEO --reference FACE -o out.mp4`: the face in a video replaced by the reference's (docs/swap.md).

Building the parser imports nothing heavy; the command imports torch, cv2 and diffusers when it runs. Bad input
fails with one line and writes nothing: an unreadable video, a reference without a face, a video without a face
in any frame are all found before the model loads.
"""

import json
import math
import sys
import time
from pathlib import Path

from standin.cli import device_error, fail


def add_parser(subparsers) -> None:
    swap = subparsers.add_parser(
        "swap", help="replace the face in a video by the reference's (zero-shot inpainting)",
        description="Replace the largest face in every frame of VIDEO by the reference person's: the reference face "
        "is pasted onto each frame by its five landmarks, and Stand-In repaints the video from --strength with the "
        "reference (the published face swap). Keeps the video's frame count, frame rate and audio; the frame is "
        "processed in its centred crop to multiples of 16 px, the border kept as it was. Writes NAME.mp4, "
        "NAME.reference.png (the reference as the model saw it) and NAME.sheet.png; with --save-intermediate also "
        "NAME.pasted.mp4 and NAME.mask.mp4.",
    )
    swap.add_argument("video", help="the input video (mp4, mov, mkv, webm, avi, gif...)")
    swap.add_argument("--reference", required=True, help="photo of the person whose face goes into the video")
    swap.add_argument("-o", "--output", required=True, help="output .mp4")
    swap.add_argument("--prompt", default="", help="what the video shows (may be empty; default: empty)")
    swap.add_argument("--negative-prompt", help="what to avoid (default: Wan's standard negative prompt)")
    swap.add_argument("--strength", type=float, default=0.85,
                      help="how much of the video is repainted, in (0, 1]: lower keeps more of the input, 1 repaints "
                      "from pure noise (default: %(default)s, the published value)")
    swap.add_argument("--keep-background", action="store_true",
                      help="background consistency: after every step, outside the face mask the latents are reset "
                      "to the input video's (noised to the step's level), so only the face region is repainted")
    swap.add_argument("--composite", action="store_true",
                      help="paste the result back into the input with the feathered mask: outside the mask every "
                      "pixel is the input's (latent-space --keep-background cannot promise that: the VAE decoder "
                      "spreads each latent over many pixels)")
    swap.add_argument("--save-intermediate", action="store_true",
                      help="also write NAME.pasted.mp4 (the reference face pasted on each frame) and NAME.mask.mp4")
    swap.add_argument("--base", help="Wan diffusers folder, original Wan folder or hub id (default: the installed "
                      "default model, the embedded mini model of standin-mini)")
    swap.add_argument("--adapter", help="the Stand-In adapter of --base (Wan2.2: the *_high file)")
    swap.add_argument("--adapter-low", help="Wan2.2 only: the *_low adapter file")
    swap.add_argument("--backend", help="face backend for the landmarks (default: 'mini' for the default model, "
                      "'dlib' with --base; an insightface folder such as antelopev2 as published)")
    swap.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    swap.add_argument("--guidance", type=float, help="text guidance scale; 1 turns it off (default: the "
                      "base's, 5 for Wan, 2 for the mini model)")
    swap.add_argument("--seed", type=int, default=0, help="random seed of the noise (default: %(default)s)")
    swap.add_argument("--window", type=int, help="frames per window for long videos (default: the model's frame "
                      "count, 81 for Wan, 17 for the mini model)")
    swap.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    swap.add_argument("--no-preprocess", action="store_true",
                      help="use the reference as it is (only squared), without the face crop on white")
    swap.set_defaults(func=run_swap)


def intermediate_paths(output: Path) -> tuple[Path, Path]:
    """NAME.pasted.mp4 and NAME.mask.mp4 beside NAME.mp4."""
    return output.with_name(f"{output.stem}.pasted.mp4"), output.with_name(f"{output.stem}.mask.mp4")


def base_settings(base) -> dict:
    """What a base records for references (StandInPipeline config), read without loading it."""
    from standin.pipeline import REFERENCE_SIZE

    index = Path(base) / "model_index.json"
    config = json.loads(index.read_text()) if index.is_file() else {}
    return {"reference_size": int(config.get("reference_size", REFERENCE_SIZE)),
            "preprocess_reference": bool(config.get("preprocess_reference", True))}


def check_arguments(args) -> str | None:
    if args.base is None and (args.adapter is not None or args.adapter_low is not None):
        return "--adapter and --adapter-low need --base (the default model brings its own adapter)"
    if args.base is not None and args.adapter is None:
        return "--base needs its Stand-In --adapter"
    if Path(args.output).suffix.lower() != ".mp4":
        return f"output must be an .mp4 file, got {Path(args.output).name}"
    if not (0.0 < args.strength <= 1.0):  # also refuses nan
        return f"--strength must be in (0, 1], got {args.strength}"
    if args.steps < 1:
        return f"--steps must be at least 1, got {args.steps}"
    if args.guidance is not None and not (args.guidance >= 0 and math.isfinite(args.guidance)):
        return f"--guidance must be a finite number >= 0, got {args.guidance}"
    if args.window is not None and args.window < 1:
        return f"--window must be at least 1, got {args.window}"
    if not 0 <= args.seed < 2**63:
        return f"--seed must be between 0 and 2**63 - 1, got {args.seed}"
    return device_error(args.device)


def run_swap(args) -> int:
    problem = check_arguments(args)
    if problem:
        return fail(problem)
    from standin.checkpoint import AdapterFileError
    from standin.commands import check_outputs, default_model
    from standin.faces import FaceModelError
    from standin.video import companion_paths

    output = Path(args.output)
    reference_path, sheet_path = companion_paths(output)
    pasted_path, mask_path = intermediate_paths(output)
    outputs = [output, reference_path, sheet_path] + ([pasted_path, mask_path] if args.save_intermediate else [])
    started = time.perf_counter()
    try:
        if not Path(args.reference).is_file():
            raise FileNotFoundError(f"reference image not found: {args.reference}")
        base, adapter, adapter_low = args.base, args.adapter, args.adapter_low
        backend = args.backend or "dlib"
        if base is None:
            model = default_model()
            base, adapter = model["base"], model["adapter"]
            backend = args.backend or "mini"
        check_outputs(outputs, [("video", args.video), ("reference", args.reference), ("adapter", adapter),
                                ("adapter", adapter_low)])
        from standin.swap.media import video_info
        from standin.video import read_video

        # Everything that can be wrong with the inputs is found before the model loads.
        info = video_info(args.video)
        frames = read_video(args.video)
        import numpy as np

        from standin.faces import get_backend
        from standin.swap.run import denoise, finish, prepare, prepare_reference

        settings = base_settings(base)
        preprocess = settings["preprocess_reference"] and not args.no_preprocess
        reference = prepare_reference(args.reference, settings["reference_size"], preprocess)
        backend = get_backend(backend)
        prepared = prepare(frames, reference, backend)

        import torch

        from standin.loading import load_pipeline
        from standin.swap.pipeline import StandInSwapPipeline

        dtype = torch.float32 if args.base is None else None
        pipe = StandInSwapPipeline.from_standin(load_pipeline(base, adapter, adapter_low, device=args.device,
                                                              dtype=dtype))
        extra = {} if args.negative_prompt is None else {"negative_prompt": args.negative_prompt}
        inner = denoise(pipe, prepared, reference, args.prompt, strength=args.strength,
                        keep_background=args.keep_background, seed=args.seed, num_inference_steps=args.steps,
                        guidance_scale=args.guidance, window=args.window, **extra)
        from standin.swap.run import window_plan

        result = finish(frames, prepared, reference, inner, window_plan(pipe, len(frames), args.window),
                        args.composite)

        from standin.io import save_image
        from standin.swap.media import copy_audio
        from standin.video import VideoWriteError, contact_sheet, save_video

        save_video(result.frames, output, fps=info.fps)
        audio = None
        if info.audio_codec:
            try:
                audio = copy_audio(output, args.video)
            except VideoWriteError as error:
                print(f"warning: {error}; the video is written without audio", file=sys.stderr)
        save_image(result.reference, reference_path)
        save_image(contact_sheet(result.frames), sheet_path)
        if args.save_intermediate:
            save_video(result.pasted, pasted_path, fps=info.fps)
            masks = (np.repeat(result.masks[..., None], 3, axis=3) * 255.0).round().astype(np.uint8)
            save_video(masks, mask_path, fps=info.fps)
    except (OSError, ValueError, AdapterFileError, FaceModelError) as error:  # OSError: NoDefaultModelError too
        return fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
    print(json.dumps({"video": str(output), "reference": str(reference_path), "contact_sheet": str(sheet_path),
                      "pasted": str(pasted_path) if args.save_intermediate else None,
                      "mask": str(mask_path) if args.save_intermediate else None,
                      "frames": len(result.frames), "fps": info.fps, "audio": audio,
                      "frames_with_face": result.frames_with_face, "windows": result.windows,
                      "seconds": round(time.perf_counter() - started, 2)}))
    return 0
