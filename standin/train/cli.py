"""`standin prepare-data` and `standin train`."""

import argparse
import json

from standin.cli import fail
from standin.train.config import PrepareSettings, TrainConfig


def add_parser(subparsers) -> None:
    defaults = PrepareSettings()
    prepare = subparsers.add_parser(
        "prepare-data", help="cut training clips, reference faces and captions from videos",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    prepare.add_argument("videos", help="folder of videos; captions beside them as NAME.txt or NAME.json")
    prepare.add_argument("-o", "--output", required=True, help="dataset folder to write (manifest.json, clips, ...)")
    prepare.add_argument("--height", type=int, default=defaults.height)
    prepare.add_argument("--width", type=int, default=defaults.width)
    prepare.add_argument("--frames", type=int, default=defaults.num_frames, help="frames per clip (4k+1 for Wan)")
    prepare.add_argument("--fps", type=float, default=defaults.fps)
    prepare.add_argument("--max-clips", type=int, default=defaults.max_clips, help="clips per video at most")
    prepare.add_argument("--reference-size", type=int, default=defaults.reference_size)
    prepare.add_argument("--reference-frames", type=int, default=defaults.reference_frames,
                         help="random frames of each video searched for the reference face")
    prepare.add_argument("--default-caption", help="caption for videos without a caption file (else skipped)")
    prepare.add_argument("--face-backend", help="standin.faces backend name or path (default: dlib)")
    prepare.add_argument("--background", default=defaults.background,
                         help="reference background removal: grabcut, keep, or a face-parsing model path")
    prepare.add_argument("--seed", type=int, default=defaults.seed)
    prepare.add_argument("--encode-with", metavar="BASE",
                         help="also store VAE latents, text embeddings and reference latents of this base per clip")
    prepare.add_argument("--device", help="device for --encode-with (default: cuda if available)")
    prepare.set_defaults(func=run_prepare)

    c = TrainConfig(base="", data="", output="")
    train = subparsers.add_parser(
        "train", help="train Stand-In adapters on a frozen Wan base",
        description="Train Stand-In adapters on a frozen Wan base; `accelerate launch` for several GPUs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("--base", required=True, help="Wan diffusers folder, original Wan folder or hub id")
    train.add_argument("--data", required=True, help="a `standin prepare-data` folder, or an installed dataset's name: 'mini' (the mini world, "
                       "from standin-mini)")
    train.add_argument("-o", "--output", required=True, help="run folder (checkpoints, log, validation, report)")
    train.add_argument("--resume", action="store_true", help="continue the run in the output folder where its last "
                       "checkpoint left it (starts afresh if it has none); refused if the data, settings or a "
                       "--steps below the checkpoint's would not continue that run")
    optim = train.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=c.steps, help="optimizer steps")
    optim.add_argument("--batch-size", type=int, default=c.batch_size, help="clips per process and micro-step")
    optim.add_argument("--grad-accum", type=int, default=c.grad_accum, help="micro-steps per optimizer step")
    optim.add_argument("--rank", type=int, default=c.rank, help="LoRA rank")
    optim.add_argument("--attention", choices=("restricted", "vanilla"), default=c.attention,
                       help="vanilla: the paper's ablation where reference queries also see the video")
    optim.add_argument("--positions", choices=("shifted", "shared"), default=c.positions,
                       help="shared: the paper's ablation with the reference on the video's grid at time 0")
    optim.add_argument("--lr", type=float, default=c.lr)
    optim.add_argument("--weight-decay", type=float, default=c.weight_decay)
    optim.add_argument("--lr-scheduler", default=c.lr_scheduler, help="a diffusers.optimization scheduler name")
    optim.add_argument("--warmup-steps", type=int, default=c.warmup_steps)
    optim.add_argument("--max-grad-norm", type=float, default=c.max_grad_norm)
    optim.add_argument("--timestep-sampling", choices=("uniform", "logit_normal"), default=c.timestep_sampling)
    optim.add_argument("--shift", type=float, default=c.shift,
                       help="sigma shift (None: the base's sampler shift, 5 for Wan)")
    optim.add_argument("--seed", type=int, default=c.seed)
    optim.add_argument("--expert", choices=("high", "low"),
                       help="Wan2.2 (required there): train the high-noise expert (`transformer`, timesteps at or "
                       "above the base's boundary, 875) or the low-noise one (`transformer_2`, below it); one "
                       "run and output folder per expert, giving adapter_high / adapter_low.safetensors")
    system = train.add_argument_group("memory and processes")
    system.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in the backward pass")
    system.add_argument("--fsdp", action="store_true", help="shard the base over the processes (FSDP2)")
    system.add_argument("--mixed-precision", choices=("no", "bf16"), help="default: bf16 on GPU, float32 on CPU")
    system.add_argument("--num-workers", type=int, default=c.num_workers, help="data loader processes")
    data = train.add_argument_group("clip size of named datasets and of validation videos (default: the dataset's)")
    data.add_argument("--frames", type=int)
    data.add_argument("--height", type=int)
    data.add_argument("--width", type=int)
    data.add_argument("--mini-length", type=int, default=c.mini_length, help="items per epoch of a named dataset (mini)")
    runs = train.add_argument_group("checkpoints and validation")
    runs.add_argument("--checkpoint-every", type=int, default=c.checkpoint_every)
    runs.add_argument("--keep-checkpoints", type=int, default=c.keep_checkpoints)
    runs.add_argument("--validate-every", type=int, default=c.validate_every, help="0: at the end only")
    runs.add_argument("--val-data", help="prepared dataset or 'mini' (default: held-out mini identities for mini "
                      "data, else the training data)")
    runs.add_argument("--val-count", type=int, default=c.val_count, help="validation videos (0: none)")
    runs.add_argument("--val-steps", type=int, default=c.val_steps, help="sampling steps of validation videos")
    runs.add_argument("--val-guidance", type=float, default=c.val_guidance)
    runs.add_argument("--face-backend", default=c.face_backend, help="FaceSim backend: auto, none, mini, dlib, path")
    runs.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=run_train)


def run_prepare(args) -> int:
    from standin.cli import device_error
    from standin.train.prepare import prepare_dataset

    if args.encode_with and device_error(args.device):
        return fail(device_error(args.device))

    settings = PrepareSettings(
        height=args.height, width=args.width, num_frames=args.frames, fps=args.fps, max_clips=args.max_clips,
        reference_size=args.reference_size, reference_frames=args.reference_frames,
        default_caption=args.default_caption, face_backend=args.face_backend, background=args.background,
        seed=args.seed,
    )
    try:
        manifest = prepare_dataset(args.videos, args.output, settings, encode_with=args.encode_with,
                                   device=args.device)
    except (OSError, ValueError) as error:
        return fail(str(error))
    summary = {"output": args.output, "videos": manifest["videos"], "clips": len(manifest["clips"]),
               "skipped": manifest["skipped"], "encoded": manifest["encoded_with"] is not None}
    print(json.dumps(summary, indent=2))
    return 0


def run_train(args) -> int:
    from standin.train.trainer import train

    fields = {name: getattr(args, name) for name in TrainConfig.__dataclass_fields__ if hasattr(args, name)}
    config = TrainConfig(**fields, progress=not args.no_progress)
    try:
        report = train(config)
    except (OSError, ValueError) as error:
        return fail(str(error))
    if report is not None:  # the main process's
        print(json.dumps(report, indent=2))
    return 0
