"""`standin mini ...`: the mini world from the command line.

    standin mini clip "A child waves on a beach at noon." --identity 42 --out clip.mp4
    standin mini reference --identity 34 --out woman.png
    standin mini check clip.mp4 "A child waves on a beach at noon."
    standin mini sheet identities.png
    standin mini train-identity
    standin mini prepare --out runs/mini_data --clips 3000
"""

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image

from standin.io import atomic_write, save_image
from standin_mini import prepare, sheet, train_identity, world
from standin_mini.data import make_clip, make_reference
from standin_mini.identity import check_prompt
from standin.video import save_video


def _clip(args):
    clip = make_clip(args.identity, args.prompt, num_frames=args.frames, size=(args.size, args.size), seed=args.seed)
    if Path(args.out).suffix == ".gif":
        atomic_write(args.out, lambda path: iio.imwrite(path, clip.frames, duration=1000 / args.fps, loop=0))
    else:
        save_video(clip.frames, args.out, fps=args.fps)
    reference = _save_reference(args, Path(args.out).with_suffix(".reference.png"))
    print(f"wrote {args.out} ({len(clip.frames)} frames of '{clip.prompt}') and {reference}")


def _save_reference(args, path) -> Path:
    return save_image(Image.fromarray(make_reference(args.identity, args.size, seed=args.seed)), path)


def _reference(args):
    _save_reference(args, args.out)
    print(f"wrote {args.out}: identity {args.identity} ({world.identity(args.identity).who}), cropped on white")


def _check(args):
    frames = np.stack([np.asarray(Image.fromarray(frame).convert("RGB")) for frame in iio.imread(args.video)])
    print(json.dumps(check_prompt(frames, args.prompt), indent=2))


def add_parser(subparsers):
    mini = subparsers.add_parser("mini", help="the mini world: synthetic identities, clips and their face model")
    commands = mini.add_subparsers(dest="mini_command", required=True)

    clip = commands.add_parser("clip", help="render a clip of a prompt (.mp4 or .gif) and its reference photo")
    clip.add_argument("prompt", help='e.g. "A person jumps in the snow at night."')
    clip.add_argument("--identity", type=int, default=0)
    clip.add_argument("--out", default="clip.mp4")
    clip.add_argument("--frames", type=int, default=17)
    clip.add_argument("--size", type=int, default=64)
    clip.add_argument("--fps", type=int, default=8)
    clip.add_argument("--seed", type=int, default=0)
    clip.set_defaults(func=_clip)

    reference = commands.add_parser("reference", help="draw a reference photo of an identity (crop on white)")
    reference.add_argument("--identity", type=int, default=0)
    reference.add_argument("--out", default="reference.png")
    reference.add_argument("--size", type=int, default=64)
    reference.add_argument("--seed", type=int, default=0)
    reference.set_defaults(func=_reference)

    check = commands.add_parser("check", help="does a video follow a mini-world prompt? (action, place, time, who)")
    check.add_argument("video")
    check.add_argument("prompt")
    check.set_defaults(func=_check)

    draw = commands.add_parser("sheet", help="contact sheet of identities or clips")
    sheet.add_arguments(draw)
    draw.set_defaults(func=sheet.run)

    train = commands.add_parser("train-identity", help="train and evaluate the mini face model (resumable)")
    train_identity.add_arguments(train)
    train.set_defaults(func=train_identity.run)

    pre_encoded = commands.add_parser("prepare", help="pre-encode mini-world training clips for `standin train`")
    prepare.add_arguments(pre_encoded)
    pre_encoded.set_defaults(func=prepare.run)
    return mini
