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
    generate.add_argument("--reference", action="append",
                          help="reference photo (omit to generate without identity control); for the mini model a "
                          "mini-world reference, e.g. examples/woman_34.png or `standin mini reference`. Give it "
                          "twice or more for several people in one video (zero-shot; the prompt decides who is where)")
    generate.add_argument("--reference-guidance", type=float,
                          help="identity guidance g_ref: above 1 a third branch without the reference (one more "
                          "forward per step) pushes the video towards the identity; 1 is the published sampler "
                          "(default: the base's own: 1 for Wan, 3 for the mini model, measured on held-out identities)")
    generate.add_argument("--reference-guidance-steps", type=int,
                          help="apply --reference-guidance in the first N steps only (default: all)")
    generate.add_argument("--prompt", help="what the person does, and where (required without --jobs)")
    generate.add_argument("--negative-prompt", help="what to avoid (default: Wan's standard negative prompt)")
    generate.add_argument("-o", "--output",
                          help="output .mp4 (NAME.reference.png and NAME.sheet.png go beside it; required without "
                          "--jobs)")
    generate.add_argument("--jobs", metavar="FILE",
                          help="many videos, one model load: a JSON Lines file, one video per line, e.g. {\"prompt\": "
                          "\"...\", \"reference\": \"face.png\", \"seed\": 3, \"output\": \"out/a.mp4\"}; a line may "
                          "also set negative_prompt, height, width, frames, steps, guidance, reference_guidance, "
                          "reference_guidance_steps, fps (the flags give the defaults); relative paths are from the "
                          "file's folder. Under `accelerate launch` or `torchrun` the videos are shared out over the "
                          "processes. Finished videos are skipped, so a stopped run resumes; a failed video does not "
                          "stop the others; what became of each goes to NAME.summary.json beside NAME.jsonl "
                          "(docs/scaling.md)")
    generate.add_argument("--height", type=int, help="video height in pixels (default: the base's)")
    generate.add_argument("--width", type=int, help="video width in pixels (default: the base's)")
    generate.add_argument("--frames", type=int, help="number of frames, 4k+1 for Wan (default: the base's)")
    generate.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                          help="denoising steps (default: %(default)s)")
    generate.add_argument("--guidance", type=float,
                          help="text guidance scale; 1 turns guidance off (default: the base's, 5 for Wan, 2 for "
                          "the mini model)")
    generate.add_argument("--seed", type=int, default=0, help="random seed of the initial noise (default: %(default)s)")
    generate.add_argument("--fps", type=int, help="playback rate of the video (default: the base's)")
    generate.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    generate.add_argument("--no-preprocess", action="store_true",
                          help="use the reference as it is (only squared) even where the base crops the face on white "
                          "first (Wan does; the mini model's references are drawn cropped already)")
    generate.add_argument("--no-cache", action="store_true", help="recompute the reference stream every forward")
    generate.add_argument("--sequential-guidance", action="store_true", help="run guidance branches one by one")
    generate.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                          help="a LoRA on the base (diffusers / PEFT, `diffusion_model.` community, kohya "
                          "`lora_unet_` or lightx2v format), at SCALE (default 1); repeatable. It acts on the video "
                          "and the reference alike, as the published scripts' merged LoRA. For Wan2.2 this is the "
                          "high-noise expert's")
    generate.add_argument("--lora-low", action="append", metavar="FILE[:SCALE]",
                          help="Wan2.2 only: a LoRA for the low-noise expert; repeatable")
    generate.add_argument("--preset", choices=("lightx2v",),
                          help="sampler settings of a few-step distillation LoRA: lightx2v = 4 steps, guidance 1, "
                          "shift 5 (lightx2v's distill configs); a --guidance given, or --steps other than the "
                          "default, wins")
    generate.add_argument("--control", metavar="VIDEO",
                          help="pose / depth control video for a Wan VACE --base (e.g. Wan2.1-VACE-14B-diffusers; "
                          "`standin control VIDEO --pose` makes one from an ordinary video): its frames, trimmed to "
                          "4k+1, fix the length (--frames takes the first N) and, centre-cropped to multiples of 16 "
                          "px, the size (or resized to --height x --width of the same aspect). The VACE blocks see "
                          "the video only; Stand-In acts in the main blocks, as in the published implementation")
    generate.add_argument("--control-reference", action="append", metavar="IMAGE",
                          help="with --control: an image VACE puts in front of the video as its own reference frame "
                          "(the published script's vace_reference_image, e.g. the first frame's look); repeatable")
    generate.add_argument("--control-scale", type=float, default=0.5,
                          help="strength of the control hints (VACE's conditioning scale; default: %(default)s: the "
                          "published README finds VACE's own face prior fights the identity and suggests about 0.5, "
                          "below its script's 0.8)")
    generate.add_argument("--parallel", choices=("ulysses", "ring", "unified"),
                          help="context parallelism: one video over all processes of `torchrun --nproc_per_node N "
                          "-m standin.cli generate ...` (diffusers' Ulysses or ring attention; unified: Ulysses "
                          "within each machine, ring across machines; rank 0 writes). ring and unified need a GPU "
                          "attention backend that returns the log-sum-exp (default there: _native_cudnn)")
    generate.add_argument("--attention-backend", metavar="NAME",
                          help="diffusers attention backend of the transformer(s), e.g. flash, _native_cudnn, sage "
                          "(default: diffusers' own, PyTorch SDPA)")
    generate.set_defaults(func=run_generate)

    converter = subparsers.add_parser("convert", help="convert a Stand-In adapter (.ckpt or safetensors) to ours")
    converter.add_argument("source", help="the adapter file: official .ckpt, or a safetensors file")
    converter.add_argument("-o", "--output", required=True, help="output .safetensors")
    converter.set_defaults(func=run_convert)


DEFAULT_STEPS = 20  # what --preset replaces when --steps is not given


class NoDefaultModelError(FileNotFoundError):
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


# What may differ from one video to the next: a line of a jobs file may set each of them (standin.jobs); the flags
# of the same names give the defaults.
VIDEO_SETTINGS = ("prompt", "negative_prompt", "reference", "output", "seed", "height", "width", "frames", "steps",
                  "guidance", "reference_guidance", "reference_guidance_steps", "fps")


def setting_problem(name: str, value) -> str | None:
    """Why a value of a numeric video setting cannot be used ("must be at least 1, got 0"), or None."""
    if value is None:  # the default
        return None
    if name in ("steps", "fps", "height", "width", "frames") and value < 1:
        return f"must be at least 1, got {value}"
    if name in ("guidance", "reference_guidance") and not (value >= 0 and value != float("inf")):  # also nan
        return f"must be a finite number >= 0, got {value}"
    if name == "reference_guidance_steps" and value < 0:
        return f"must be >= 0, got {value}"
    if name == "seed" and not 0 <= value < 2**63:
        return f"must be between 0 and 2**63 - 1, got {value}"
    return None


def flags_problem(args) -> str | None:
    """Why the flags that every video of a run shares cannot be used, or None; checked before anything loads."""
    if args.base is None and (args.adapter is not None or args.adapter_low is not None):
        return "--adapter and --adapter-low need --base (the default model brings its own adapter)"
    for name in ("steps", "fps", "guidance", "reference_guidance", "reference_guidance_steps", "seed"):
        problem = setting_problem(name, getattr(args, name))
        if problem:
            return f"--{name.replace('_', '-')} {problem}"
    if args.attention_backend is not None:
        from diffusers.models.attention_dispatch import AttentionBackendName

        names = sorted(backend.value for backend in AttentionBackendName)
        if args.attention_backend not in names:
            return f"unknown --attention-backend {args.attention_backend!r}: diffusers has {', '.join(names)}"
    return device_error(args.device)


def parse_loras(args) -> tuple[list, list]:
    """The --lora and --lora-low files with their scales; ValueError for a bad argument or a missing file."""
    from standin.lora import parse_lora_argument

    loras = [parse_lora_argument(text) for text in args.lora or []]
    loras_low = [parse_lora_argument(text) for text in args.lora_low or []]
    for path, _ in loras + loras_low:
        if not Path(path).is_file():
            raise ValueError(f"LoRA file not found: {path}")
    return loras, loras_low


def output_paths(output: Path, references: int) -> tuple[list[Path], Path]:
    """The files written beside a video: the reference(s) as the model saw them (NAME.reference.png; several:
    NAME.reference-1.png, NAME.reference-2.png, ..., as standin eval pairs one reference only) and the contact
    sheet NAME.sheet.png."""
    from standin.video import companion_paths

    reference, sheet = companion_paths(output)
    if references <= 1:
        return [reference][:references], sheet
    return [reference.with_name(reference.name.replace(".reference.png", f".reference-{k}.png"))
            for k in range(1, references + 1)], sheet


def load_generator(args, base, adapter, adapter_low, loras, loras_low, device, vace: bool = False):
    """The pipeline of a run on `device`, with --parallel, the LoRAs and --preset applied; and the (steps,
    guidance) every video of the run defaults to: the flags, else the preset's, else the base's guidance."""
    import torch

    from standin.loading import load_pipeline

    # Float32 on the CPU; on a GPU, the default model is small enough to stay in float32 too.
    dtype = torch.float32 if args.base is None else None
    if vace:
        from standin.vace import load_vace_pipeline

        pipe = load_vace_pipeline(base, adapter, adapter_low, device=device, dtype=dtype)
    else:
        pipe = load_pipeline(base, adapter, adapter_low, device=device, dtype=dtype)
    backend = args.attention_backend
    if args.parallel in ("ring", "unified") and backend is None:
        backend = "_native_cudnn"  # PyTorch's cuDNN attention returns the log-sum-exp ring attention merges with
    config = context_parallel_config(args.parallel) if args.parallel else None
    for transformer in pipe._experts().values():
        if backend is not None:
            transformer.set_attention_backend(backend)
        if config is not None:
            transformer.enable_parallelism(config=config)
    if loras or loras_low:
        from standin.lora import load_loras

        if loras:
            load_loras(pipe, loras)
        if loras_low:
            load_loras(pipe, loras_low, "transformer_2")
    steps, guidance = args.steps, args.guidance
    if args.preset:
        from standin.lora import apply_preset

        settings = apply_preset(pipe, args.preset)
        # The preset's values unless given on the command line (--steps other than its default, any --guidance).
        if steps == DEFAULT_STEPS:
            steps = settings["num_inference_steps"]
        if guidance is None:
            guidance = settings["guidance_scale"]
    if guidance is None:
        guidance = pipe.config.default_guidance_scale
    return pipe, steps, guidance


def generate_video(pipe, video: dict, args, model: dict, control=None, control_references=None) -> dict | None:
    """Generate one video with a loaded pipeline and write it with its companion files and provenance; what was
    written (None on the ranks other than 0 of --parallel).

    video: the VIDEO_SETTINGS (reference a list of paths, output a Path). args: the flags every video shares
    (--no-preprocess, --no-cache, ...). model: the base, adapter and adapter_low the pipeline was loaded from.
    control, control_references: the control video's frames and VACE's own reference images (PIL), for a VACE base.
    The companion files are written first and NAME.mp4 last: a video file means a finished video, which is what
    `generate --jobs` resumes from (each file is written atomically)."""
    import torch

    from standin.io import save_image
    from standin.provenance import generation_provenance
    from standin.video import contact_sheet, save_video

    references, output = video["reference"], Path(video["output"])
    reference_paths, sheet_path = output_paths(output, len(references))
    common = dict(prompt=video["prompt"], num_inference_steps=video["steps"], guidance_scale=video["guidance"],
                  generator=torch.Generator().manual_seed(video["seed"]),
                  preprocess_reference=False if args.no_preprocess else None, cache_reference=not args.no_cache)
    if video["negative_prompt"] is not None:
        common["negative_prompt"] = video["negative_prompt"]
    started = time.perf_counter()
    # Sizes, fps and reference preprocessing: what the base records in its config, unless asked otherwise.
    if control is not None:
        from standin.pipeline import WAN_NEGATIVE_PROMPT
        from standin.vace import control_frames_as_images

        result = pipe(**{"negative_prompt": WAN_NEGATIVE_PROMPT, **common}, video=control_frames_as_images(control),
                      conditioning_scale=args.control_scale, height=control.shape[1], width=control.shape[2],
                      num_frames=len(control), reference_image=references[0] if references else None,
                      reference_images=control_references or None)
    else:
        result = pipe(**common, reference_image=references[0] if len(references) == 1 else references or None,
                      reference_guidance=video["reference_guidance"],
                      reference_guidance_steps=video["reference_guidance_steps"],
                      height=video["height"], width=video["width"], num_frames=video["frames"],
                      batch_guidance=not args.sequential_guidance)
    frames = result.frames[0]
    if args.parallel and torch.distributed.get_rank() != 0:
        return None  # every rank computed the same video; rank 0 writes it
    seen = result.reference if isinstance(result.reference, list) else [result.reference] * bool(references)
    record = generation_provenance(base=model["base"], adapter=model["adapter"] if references else None,
                                   adapter_low=model["adapter_low"], seed=video["seed"], prompt=video["prompt"],
                                   steps=video["steps"], guidance=video["guidance"])
    written = []
    try:
        for image, path in zip(seen, reference_paths):
            written.append(save_image(image, path))
        written.append(save_image(contact_sheet(frames), sheet_path))
        save_video(frames, output, fps=video["fps"] or pipe.config.default_fps, provenance=record)
    except BaseException:  # no companion files without their video
        for path in written:
            Path(path).unlink(missing_ok=True)
        raise
    references_written = [str(path) for path in reference_paths]
    return {"video": str(output), "reference": references_written[0] if references_written else None,
            "references": references_written,
            "contact_sheet": str(sheet_path), "frames": len(frames),
            "seconds": round(time.perf_counter() - started, 2)}


def run_generate(args) -> int:
    if args.jobs is not None:
        from standin.jobs import run_jobs

        return run_jobs(args)
    if args.prompt is None or args.output is None:
        return fail("--prompt and -o are required (or --jobs FILE for many videos)", 2)
    problem = flags_problem(args)
    if problem:
        return fail(problem)
    if args.base is not None and args.reference is not None and args.adapter is None:
        return fail("--reference needs the Stand-In --adapter of --base (or no --reference: the base alone)")
    output = Path(args.output)
    if output.suffix.lower() != ".mp4":
        return fail(f"output must be an .mp4 file, got {output.name}")

    from standin.checkpoint import AdapterFileError
    from standin.io import regular_file_problem
    from standin.lora import LoraFileError

    try:
        loras, loras_low = parse_loras(args)
    except ValueError as error:
        return fail(str(error))

    control, control_references = None, []
    if args.control_reference and args.control is None:
        return fail("--control-reference needs --control (VACE's own reference frames)")
    if args.control is not None:
        problem = ("--control needs a Wan VACE --base" if args.base is None else
                   "give both --height and --width with --control (or neither: the control video's size)"
                   if (args.height is None) != (args.width is None) else
                   "--reference-guidance is not available with --control"
                   if args.reference_guidance not in (None, 1.0) else
                   "--parallel is not available with --control" if args.parallel else
                   "several --reference are not available with --control" if len(args.reference or []) > 1 else
                   f"--control-scale must be a finite number, got {args.control_scale}"
                   if not abs(args.control_scale) < float("inf") else None)
        if problem:
            return fail(problem)
        from standin.preprocess.images import load_image
        from standin.vace import read_control_video

        try:
            size = None if args.height is None else (args.height, args.width)
            control = read_control_video(args.control, num_frames=args.frames, size=size)
            control_references = [load_image(path) for path in args.control_reference or []]
        except ValueError as error:  # ControlVideoError, ImageLoadError (a missing file too)
            return fail(str(error))

    references = args.reference or []
    reference_paths, sheet_path = output_paths(output, len(references))
    try:
        for reference in references:
            problem = regular_file_problem(reference, "reference image")
            if problem:
                raise FileNotFoundError(f"{reference}: {problem}")
        base, adapter, adapter_low = args.base, args.adapter, args.adapter_low
        if base is None:
            model = default_model()
            base = model["base"]
            # The base alone suffices without a reference; the adapter is required (and checked) with one.
            adapter = model["adapter"] if references else None
        check_outputs([output, *reference_paths, sheet_path],
                      [*(("reference", r) for r in references), ("adapter", adapter), ("adapter", adapter_low),
                       *(("LoRA", path) for path, _ in loras + loras_low), ("control video", args.control),
                       *(("control reference", path) for path in args.control_reference or [])])
        device = start_context_parallel(args.device, args.parallel) if args.parallel else args.device
        pipe, steps, guidance = load_generator(args, base, adapter, adapter_low, loras, loras_low, device,
                                               vace=control is not None)
        video = {**{name: getattr(args, name) for name in VIDEO_SETTINGS}, "reference": references,
                 "output": output, "steps": steps, "guidance": guidance}
        report = generate_video(pipe, video, args, {"base": base, "adapter": adapter, "adapter_low": adapter_low},
                                control, control_references)
    except (OSError, ValueError, AdapterFileError, LoraFileError) as error:  # OSError: NoDefaultModelError too
        return fail(str(error))
    if report is not None:
        print(json.dumps(report))
    return 0


def context_parallel_config(kind: str):
    """diffusers' ContextParallelConfig over all processes: Ulysses, ring, or unified (Ulysses among the processes
    of one machine, which share fast links, and ring across machines)."""
    import torch
    from diffusers import ContextParallelConfig

    ranks = torch.distributed.get_world_size()
    if kind != "unified":
        return ContextParallelConfig(**{f"{kind}_degree": ranks})
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks))
    if local in (1, ranks) or ranks % local:
        raise ValueError(f"--parallel unified runs Ulysses within each machine and ring across machines: {ranks} "
                         f"processes, {local} per machine; on one machine use --parallel ulysses or ring")
    return ContextParallelConfig(ulysses_degree=local, ring_degree=ranks // local)


def start_context_parallel(device: str | None, kind: str = "ulysses") -> str:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); this rank's device."""
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        raise ValueError("--parallel runs under torchrun (torchrun --nproc_per_node N -m standin.cli generate ...)")
    cuda = torch.cuda.is_available() and device in (None, "cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if kind in ("ring", "unified") and not cuda:
        raise ValueError(f"--parallel {kind} needs a GPU attention backend that returns the log-sum-exp (flash, "
                         "_native_cudnn): none does on CPUs; use --parallel ulysses there")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return f"cuda:{torch.cuda.current_device()}"
    # diffusers picks a rank's device as rank % accelerator count, which divides by zero on CPU-only machines.
    torch.accelerator.device_count = lambda: 1
    return "cpu"


def run_convert(args) -> int:
    from standin.checkpoint import AdapterFileError, convert

    try:
        summary = convert(args.source, args.output)
    except (OSError, AdapterFileError) as error:
        return fail(str(error))
    print(json.dumps({"output": args.output, **summary}))
    return 0
