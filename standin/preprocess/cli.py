"""`standin preprocess IMG -o OUT.png`: the reference crop the pipeline uses, written atomically."""

import json

from standin.cli import fail


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="reference photo -> 512x512 face crop on white",
        description="Detect the largest face, crop 1.5x around it, pad to a square with white, resize, and "
        "paint the background white. Without a face, the whole image is padded to a square.",
    )
    parser.add_argument("image", help="reference photo (any format Pillow reads)")
    parser.add_argument("-o", "--output", required=True, help="where to write the result (.png, .jpg, .webp)")
    parser.add_argument("--size", type=int, default=512, help="output side in pixels, 16 to 4096 (default 512)")
    parser.add_argument(
        "--backend",
        default="dlib",
        help="face backend: dlib (default), dlib-hog, dlib-cnn, an insightface model folder, or a recogniser .onnx",
    )
    parser.add_argument(
        "--background",
        default="grabcut",
        help="grabcut (default, offline), keep, or a face-parsing model path (.onnx, TorchScript, BiSeNet .pth)",
    )
    parser.add_argument("--json", action="store_true", help="print what was done as JSON instead of a sentence")
    parser.set_defaults(func=run)


def run(args) -> int:
    from standin.faces import FaceModelError
    from standin.io import save_image
    from standin.preprocess.images import ImageLoadError
    from standin.preprocess.reference import preprocess_reference

    try:
        result = preprocess_reference(args.image, backend=args.backend, size=args.size, background=args.background)
        save_image(result.image, args.output)
    except (ImageLoadError, FaceModelError, ValueError, OSError) as e:
        return fail(str(e))
    if args.json:
        face = result.face
        print(
            json.dumps(
                {
                    "output": args.output,
                    "num_faces": result.num_faces,
                    "face_box": None if face is None else [round(v, 1) for v in face.box],
                    "face_score": None if face is None else face.score,
                    "fallback_reason": result.fallback_reason,
                    "background": result.background,
                }
            )
        )
    else:
        print(f"{args.output}: {result.describe()}")
    return 0
