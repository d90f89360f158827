"""`standin eval`: identity and motion metrics of one video, or of a folder / CSV of (video, reference) pairs."""

import json
from pathlib import Path

from standin.cli import fail

DEFAULT_NUM_FRAMES = 32  # standin.eval.metrics.DEFAULT_NUM_FRAMES, without importing cv2 to build the parser


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="FaceSim, face rate, copy-paste and motion amplitude of generated videos",
        description="One video: JSON on stdout. A folder or --pairs CSV (columns video,reference): progress bar, "
        "table on stdout, JSON with -o; exit status 1 when no video could be evaluated. In a folder, name.mp4 "
        "is paired with name.reference.png (written beside every generated video), else with name.png / .jpg / "
        ".jpeg / .webp / .bmp; a contact sheet (name.sheet.png, or a name.png that is a grid of the video's frames) "
        "is never a reference. --reference pairs every "
        "video with one photo. Videos: .mp4 .mov .mkv .webm .avi .gif.",
    )
    parser.add_argument("video", nargs="?", help="a video file, or a folder of videos")
    parser.add_argument("--reference", help="reference photo (default for one video: NAME.reference.png beside it; "
                        "with a folder, used for every video)")
    parser.add_argument("--pairs", help="CSV with a header and columns video,reference (relative to the CSV)")
    parser.add_argument("--frames", type=int, default=DEFAULT_NUM_FRAMES,
                        help=f"frames sampled per video (default {DEFAULT_NUM_FRAMES})")
    parser.add_argument(
        "--backend",
        default="dlib",
        help="face backend: dlib (default), dlib-hog, dlib-cnn, an installed one such as mini (the mini world, "
        "from standin-mini), an insightface model folder, or a recogniser .onnx",
    )
    parser.add_argument("-o", "--output", help="also write the JSON here")
    parser.set_defaults(func=run)


def run(args) -> int:
    from standin.eval.batch import EXPECTED_ERRORS, evaluate_pairs, find_pairs, format_table, read_pairs_csv
    from standin.eval.metrics import evaluate_video
    from standin.faces import FaceModelError
    from standin.io import save_text

    if args.frames < 1:
        return fail(f"--frames must be at least 1, got {args.frames}", status=2)
    if (args.video is None) == (args.pairs is None):
        return fail("give either a video / folder or --pairs CSV", status=2)
    result = None
    try:
        if args.pairs is None and not Path(args.video).is_dir():
            reference = args.reference
            if reference is None:  # a generated video's reference lies beside it (standin.video.companion_paths)
                from standin.video import companion_paths

                reference = companion_paths(args.video)[0]
                if not reference.is_file():
                    return fail(f"no --reference given and no {reference.name} beside the video", status=2)
                reference = str(reference)
            scores = evaluate_video(args.video, reference, backend=args.backend, num_frames=args.frames)
            text = json.dumps({"video": args.video, "reference": reference, **scores.to_dict()}, indent=2)
            print(text)
        else:
            pairs = read_pairs_csv(args.pairs) if args.pairs else find_pairs(args.video, args.reference)
            result = evaluate_pairs(pairs, backend=args.backend, num_frames=args.frames)
            print(format_table(result))
            text = json.dumps(result.to_dict(), indent=2)
        if args.output:
            save_text(text + "\n", args.output)
    except (*EXPECTED_ERRORS, FaceModelError, ValueError, OSError) as e:
        return fail(str(e))
    if result is not None:  # a batch: it failed if no video at all could be evaluated
        summary = result.summary()
        if summary["evaluated"] == 0:
            return fail(f"none of the {summary['videos']} videos could be evaluated (errors in the table above)")
    return 0
