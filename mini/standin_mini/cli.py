"""`standin mini ...`: the mini world from the command line (the `standin.commands` entry point `mini`).

    standin mini clip "A child waves on a beach at noon." --identity 42 --out clip.mp4
    standin mini clip "A man and a woman wave on a beach at noon." --identity 2 --identity-2 34 --out two.mp4
    standin mini reference --identity 34 --out woman.png
    standin mini check clip.mp4 "A child waves on a beach at noon."
    standin mini sheet identities.png
    standin mini train-identity
    standin mini prepare --out runs/mini_data --clips 3000

Building the parsers imports nothing heavy (`standin --help` stays fast): each command imports what it runs.
"""

import json
from pathlib import Path

from standin.cli import fail
from standin_mini.settings import IDENTITY_WEIGHTS, MINI_FPS, MINI_SIZES, MINI_WEIGHTS, IdentityTrainConfig

CLIP_EXAMPLE = "A person jumps in the snow at night."


def _clip(args) -> int:
    from standin.io import atomic_write, check_writable
    from standin.video import companion_paths, save_video
    from standin_mini.data import make_clip, make_pair_clip
    from standin_mini.prompts import parse_prompt

    out = Path(args.out)
    reference_path = companion_paths(out)[0]
    try:
        if out.suffix.lower() not in (".mp4", ".gif"):
            raise ValueError(f"--out must be an .mp4 or .gif file, got {out.name}")
        prompt = parse_prompt(args.prompt)
        identities = [args.identity] if prompt.who_2 is None else [args.identity, args.identity_2]
        if prompt.who_2 is not None and args.identity_2 is None:
            raise ValueError(f"'{prompt}' has two people: give the second one's identity with --identity-2")
        # Two people: NAME.reference-1.png (left, the first named) and NAME.reference-2.png, as `standin generate`
        # names several references.
        reference_paths = [reference_path] if len(identities) == 1 else [
            reference_path.with_name(reference_path.name.replace(".reference.png", f".reference-{k}.png"))
            for k in (1, 2)]
        check_writable(out)
        for path in reference_paths:
            check_writable(path)
        if len(identities) == 1:
            clip = make_clip(args.identity, prompt, num_frames=args.frames, size=(args.size, args.size),
                             seed=args.seed)
        else:
            clip = make_pair_clip(args.identity, args.identity_2, prompt, num_frames=args.frames,
                                  size=(args.size, args.size), seed=args.seed)
        references = [_make_reference(identity, args) for identity in identities]
    except (OSError, ValueError) as error:  # PromptError is a ValueError
        return fail(str(error))
    if out.suffix.lower() == ".gif":
        import imageio.v3 as iio

        atomic_write(out, lambda path: iio.imwrite(path, clip.frames, duration=1000 / args.fps, loop=0,
                                                   extension=".gif"))
    else:
        save_video(clip.frames, out, fps=args.fps)
    for reference, path in zip(references, reference_paths):
        _save(reference, path)
    print(f"wrote {out} ({len(clip.frames)} frames of '{clip.prompt}') and {', '.join(map(str, reference_paths))}")
    return 0


def _make_reference(identity: int, args):
    from PIL import Image

    from standin_mini.data import make_reference

    return Image.fromarray(make_reference(identity, args.size, seed=args.seed))


def _save(image, path) -> Path:
    from standin.io import save_image

    return save_image(image, path)


def _reference(args) -> int:
    from standin.io import check_writable
    from standin_mini import world

    try:
        check_writable(args.out)
        image = _make_reference(args.identity, args)
    except (OSError, ValueError) as error:
        return fail(str(error))
    _save(image, args.out)
    print(f"wrote {args.out}: identity {args.identity} ({world.identity(args.identity).who}), cropped on white")
    return 0


def _check(args) -> int:
    import numpy as np

    from standin_mini.prompts import parse_prompt

    try:
        prompt = parse_prompt(args.prompt)  # before the video is read: a bad prompt is the cheaper mistake
        frames = _read_frames(args.video)
    except (OSError, ValueError) as error:
        return fail(str(error))
    from standin_mini.identity import check_prompt

    if len(frames) == 0:
        return fail(f"{args.video}: the video has no frames")
    try:
        checks = check_prompt(np.ascontiguousarray(frames), prompt)
    except ValueError as error:  # a two-person prompt: the rules check one person
        return fail(str(error))
    print(json.dumps(checks, indent=2))
    return 0


def _read_frames(video: str):
    import imageio.v3 as iio
    import numpy as np
    from PIL import Image

    if not Path(video).is_file():
        raise FileNotFoundError(f"no such video file: {video}")
    try:
        frames = iio.imread(video)
    except Exception as error:  # imageio raises many kinds for a file it cannot decode
        raise ValueError(f"{video}: not a readable video ({type(error).__name__})") from None
    if frames.ndim == 3:  # one frame (a still image), or a grey video
        frames = frames[None]
    return np.stack([np.asarray(Image.fromarray(frame).convert("RGB")) for frame in frames])


def _sheet(args) -> int:
    from standin_mini import sheet

    try:
        sheet.run(args)
    except (OSError, ValueError) as error:
        return fail(str(error))
    return 0


def _train_identity(args) -> int:
    from standin_mini import train_identity

    try:
        train_identity.run(args)
    except (OSError, ValueError) as error:
        return fail(str(error))
    return 0


def _prepare(args) -> int:
    from standin_mini import prepare

    try:
        prepare.run(args)
    except (OSError, ValueError) as error:
        return fail(str(error))
    return 0


def sheet_arguments(parser) -> None:
    parser.add_argument("out", help="PNG path")
    parser.add_argument("--clips", type=int, default=0, help="draw this many clips instead of identities")
    parser.add_argument("--count", type=int, default=32, help="identities on an identity sheet")
    parser.add_argument("--size", type=int, default=96, help="tile / frame size in pixels")
    parser.add_argument("--seed", type=int, default=0, help="varies poses, scenes and the clips' prompts")


def train_identity_arguments(parser) -> None:
    defaults = IdentityTrainConfig()
    parser.add_argument("--out", type=Path, default=IDENTITY_WEIGHTS,
                        help="weights file; its .json gets the metrics (default: the shipped weights)")
    parser.add_argument("--work", type=Path, default=Path("outputs/mini_identity"),
                        help="checkpoint and log directory; an existing checkpoint there is resumed "
                        "(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="(default: %(default)s)")
    parser.add_argument("--evaluate-only", action="store_true", help="measure the weights at --out, don't train")
    parser.add_argument("--fit-rules", action="store_true",
                        help="with --evaluate-only: refit the prompt checker's thresholds to the world as it draws "
                        "now (after a change of framing), keeping the networks")


def prepare_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="the dataset folder to write (or to complete)")
    parser.add_argument("--clips", type=int, default=3000, help="train-split items 0..N-1 (default: %(default)s)")
    parser.add_argument("--base", default=str(MINI_WEIGHTS),
                        help="the base whose VAE and text encoder encode them (default: the embedded mini model)")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering clips (default: %(default)s)")


def add_parser(subparsers):
    mini = subparsers.add_parser("mini", help="the mini world: synthetic people, clips and their face model",
                                 description="The mini world: synthetic identities, clips that act out prompts, "
                                 "and the face model that measures them (package standin-mini).")
    commands = mini.add_subparsers(dest="mini_command", required=True)

    clip = commands.add_parser("clip", help="render a clip of a prompt (.mp4 or .gif) and its reference photo")
    clip.add_argument("prompt", help=f'who, action, place, time of day, e.g. "{CLIP_EXAMPLE}"')
    clip.add_argument("--identity", type=int, default=0,
                      help="the person drawn, any integer; must fit the prompt's who (default: %(default)s)")
    clip.add_argument("--identity-2", type=int, default=None,
                      help="the second person of a two-person prompt (\"A man and a woman wave ...\"), drawn on "
                      "the right; its reference is NAME.reference-2.png, the first's NAME.reference-1.png")
    clip.add_argument("--out", default="clip.mp4", help="output .mp4 or .gif; the reference photo goes beside it "
                      "as NAME.reference.png (default: %(default)s)")
    clip.add_argument("--frames", type=int, default=MINI_SIZES["num_frames"],
                      help="frames in the clip (default: %(default)s)")
    clip.add_argument("--size", type=int, default=MINI_SIZES["height"],
                      help="side of the square frames and of the reference, in pixels (default: %(default)s)")
    clip.add_argument("--fps", type=int, default=MINI_FPS, help="playback rate (default: %(default)s)")
    clip.add_argument("--seed", type=int, default=0,
                      help="varies what the prompt leaves open: motion, light, scene (default: %(default)s)")
    clip.set_defaults(func=_clip)

    reference = commands.add_parser("reference", help="draw a reference photo of an identity (crop on white)")
    reference.add_argument("--identity", type=int, default=0, help="the person drawn (default: %(default)s)")
    reference.add_argument("--out", default="reference.png", help="output image (default: %(default)s)")
    reference.add_argument("--size", type=int, default=MINI_SIZES["height"],
                           help="side in pixels (default: %(default)s)")
    reference.add_argument("--seed", type=int, default=0, help="varies pose, light and scene (default: %(default)s)")
    reference.set_defaults(func=_reference)

    check = commands.add_parser("check", help="does a video follow a mini-world prompt? (action, place, time, who)")
    check.add_argument("video", help="the video to check (.mp4, .gif, ...)")
    check.add_argument("prompt", help=f'the mini-world prompt it should follow, e.g. "{CLIP_EXAMPLE}"')
    check.set_defaults(func=_check)

    draw = commands.add_parser("sheet", help="contact sheet of identities or clips")
    sheet_arguments(draw)
    draw.set_defaults(func=_sheet)

    train = commands.add_parser("train-identity", help="train and evaluate the mini face model (resumable)")
    train_identity_arguments(train)
    train.set_defaults(func=_train_identity)

    pre_encoded = commands.add_parser("prepare", help="pre-encode mini-world training clips for `standin train`")
    prepare_arguments(pre_encoded)
    pre_encoded.set_defaults(func=_prepare)
    return mini
