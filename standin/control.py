"""`standin control VIDEO --pose -o pose.mp4`: a pose control video for `standin generate --control` (VACE).

The skeleton comes from MediaPipe's legacy Pose solution, the one pose model whose weights ship inside a package
on the package index (mediapipe<0.10.22 bundles its "full" landmark model; no download at run time): `pip install
'standin[pose]'`. Its 33 landmarks are mapped to the 18 keypoints of the OpenPose body layout (the neck is the
middle of the shoulders) and drawn as OpenPose draws them, which is what VACE's pose conditions look like:
coloured limbs and joints on black, colours around the hue wheel in OpenPose's limb order. Frames without a
person are black. Depth maps are not offered: no offline depth model ships inside a package.
"""

import colorsys
import json
import time
from pathlib import Path

from standin.cli import fail

# OpenPose body keypoint -> MediaPipe Pose landmark (None: the neck, the middle of the two shoulders).
# OpenPose order: nose, neck, right shoulder/elbow/wrist, left shoulder/elbow/wrist, right hip/knee/ankle,
# left hip/knee/ankle, right eye, left eye, right ear, left ear.
OPENPOSE_FROM_MEDIAPIPE = (0, None, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
# OpenPose's limbs, in its drawing order (the colours follow this order).
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
COLOURS = [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(i / 18, 1.0, 1.0)) for i in range(18)]
VISIBLE = 0.5  # MediaPipe's visibility below which a landmark is left out, as its own drawing utilities do


class PoseError(ValueError):
    """A video from which no pose video can be made; the message is one line."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "control", help="a pose control video (for generate --control) from an ordinary video",
        description="Extract a control video for `standin generate --control` from an ordinary video: --pose draws "
        "the person's body skeleton (MediaPipe Pose, offline: pip install 'standin[pose]') in OpenPose's layout "
        "and colours on black, frame by frame, at the video's size and frame rate.")
    parser.add_argument("video", help="the video of a person moving")
    parser.add_argument("--pose", action="store_true", help="extract the body pose (the only kind offered: no "
                        "offline depth model ships inside a package)")
    parser.add_argument("-o", "--output", required=True, help="output .mp4")
    parser.set_defaults(func=run_control)


def keypoints(landmarks, width: int, height: int) -> list[tuple[float, float] | None]:
    """MediaPipe's normalised landmarks -> the 18 OpenPose keypoints in pixels (None where not visible)."""
    points = []
    for index in OPENPOSE_FROM_MEDIAPIPE:
        parts = [landmarks[11], landmarks[12]] if index is None else [landmarks[index]]
        if min(part.visibility for part in parts) < VISIBLE:
            points.append(None)
        else:
            x, y = sum(p.x for p in parts) / len(parts), sum(p.y for p in parts) / len(parts)
            points.append((x * width, y * height))
    return points


def draw_pose(points: list[tuple[float, float] | None], width: int, height: int):
    """The skeleton on black (uint8 [H, W, 3]), limbs at 60% of their colour under full-colour joints, sized
    with the frame."""
    import numpy as np
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    thickness = max(2, round(min(width, height) / 120))
    for colour, (a, b) in zip(COLOURS, LIMBS):
        if points[a] is not None and points[b] is not None:
            draw.line([points[a], points[b]], fill=tuple(round(0.6 * c) for c in colour), width=2 * thickness)
    for colour, point in zip(COLOURS, points):
        if point is not None:
            x, y = point
            draw.ellipse([x - thickness, y - thickness, x + thickness, y + thickness], fill=colour)
    return np.asarray(image)


def pose_video(frames):
    """uint8 frames [F, H, W, 3] -> (pose frames of the same shape, how many frames had a person)."""
    import numpy as np

    try:
        import mediapipe as mp

        solution = mp.solutions.pose
    except (ImportError, AttributeError):
        raise PoseError("pose extraction needs MediaPipe's Pose solution: pip install 'standin[pose]'") from None
    height, width = frames.shape[1:3]
    poses, found = [], 0
    # Tracking mode: each frame's landmarks start from the previous frame's, which keeps the skeleton steady.
    with solution.Pose(static_image_mode=False, model_complexity=1, smooth_landmarks=True) as model:
        for frame in frames:
            result = model.process(np.ascontiguousarray(frame))
            if result.pose_landmarks is None:
                poses.append(np.zeros_like(frame))
                continue
            found += 1
            poses.append(draw_pose(keypoints(result.pose_landmarks.landmark, width, height), width, height))
    return np.stack(poses), found


def run_control(args) -> int:
    if not args.pose:
        return fail("say what to extract: --pose (the only kind offered)")
    output = Path(args.output)
    if output.suffix.lower() != ".mp4":
        return fail(f"output must be an .mp4 file, got {output.name}")
    from standin.commands import check_outputs
    from standin.swap.media import video_info
    from standin.video import VideoReadError, VideoWriteError, read_video, save_video

    started = time.perf_counter()
    try:
        check_outputs([output], [("video", args.video)])
        info = video_info(args.video)
        frames = read_video(args.video)
        poses, found = pose_video(frames)
        if found == 0:
            raise PoseError(f"{args.video}: no person found in any of its {len(frames)} frames")
        # A drawing of a skeleton, not a picture of a person: no AI-generated label.
        save_video(poses, output, fps=info.fps, generated=False)
    except (OSError, ValueError, VideoReadError, VideoWriteError) as error:
        return fail(str(error))
    print(json.dumps({"video": str(output), "frames": len(poses), "frames_with_a_person": found,
                      "fps": info.fps, "seconds": round(time.perf_counter() - started, 2)}))
    return 0
