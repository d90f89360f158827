"""Does standin's invisible watermark survive what happens to videos once shared, and does it stay silent on
videos it never marked?

Marked videos: N clips of the mini world (its own renders, 17 frames), written by standin.video.save_video
(watermark on), at the mini model's 64x64 and upscaled to 256x256. Each is then edited with ffmpeg, its
metadata dropped (-map_metadata -1, so only the pixels can tell):
    re-encode   H.264 again at half the file's own bitrate
    resize 0.5x half the width and height
    crop 10%    the central 90% of the width and height
    fps 8->5    a frame-rate change (frames dropped)
and read with standin.provenance.verify (8 frames spread over the clip). Unmarked videos (false positives):
the world's own renders and real photographs from scikit-image (slow pans across them), written with
watermark=False, at the same sizes.

    python benchmarks/watermark_survival.py --count 8 --out docs/watermark_survival.json

The mini world is used here, in the measurement only (standin_mini after the package split, standin.mini
before); the product never imports it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EDITS = {
    "re-encode (half bitrate)": None,
    "resize 0.5x": ["-vf", "scale=trunc(iw/4)*2:trunc(ih/4)*2"],
    "crop 10%": ["-vf", "crop=trunc(iw*0.45)*2:trunc(ih*0.45)*2"],
    "fps 8->5": ["-vf", "fps=5"],
}


def mini_world():
    try:
        from standin_mini.data import make_clip
        from standin_mini.prompts import sample_prompt
        from standin_mini.world import identity
    except ImportError:
        from standin.mini.data import make_clip
        from standin.mini.prompts import sample_prompt
        from standin.mini.world import identity
    return make_clip, sample_prompt, identity


def world_clips(count: int, seed: int):
    make_clip, sample_prompt, identity = mini_world()
    clips = []
    for index in range(count):
        number = 1000 + 97 * index + seed
        prompt = sample_prompt(seed * 1000 + index, identity(number))
        clips.append(make_clip(number, prompt, num_frames=17, size=(64, 64), seed=index).frames)
    return clips


def photo_clips(count: int, frames: int = 17):
    """Slow pans over scikit-image's real photographs, as 64x64 videos of `frames` frames."""
    from PIL import Image
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "hubble_deep_field",
             "retina", "colorwheel", "skin", "motorcycle_left", "logo"]
    clips = []
    for name in names:
        if len(clips) == count:
            break
        try:
            image = np.asarray(getattr(data, name)())
        except Exception:  # an image that needs a download (pooch) or is missing in this version
            continue
        if image.ndim == 2:
            image = np.stack([image] * 3, -1)
        image = image[..., :3].astype(np.uint8)
        side = min(image.shape[:2])
        window = int(side * 0.8)
        shots = []
        for t in range(frames):
            x = int((image.shape[1] - window) * t / max(frames - 1, 1))
            y = (image.shape[0] - window) // 2
            crop = Image.fromarray(image[y:y + window, x:x + window]).resize((64, 64), Image.Resampling.LANCZOS)
            shots.append(np.asarray(crop))
        clips.append(np.stack(shots))
    return clips


def upscale(clip: np.ndarray, size: int) -> np.ndarray:
    if clip.shape[1] == size:
        return clip
    import cv2

    return np.stack([cv2.resize(frame, (size, size), interpolation=cv2.INTER_CUBIC) for frame in clip])


def edit(source: Path, name: str, target: Path) -> Path:
    import imageio_ffmpeg

    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-i", str(source), "-map_metadata", "-1"]
    if EDITS[name] is None:
        seconds = 17 / 8
        command += ["-b:v", str(int(os.path.getsize(source) * 8 / seconds / 2))]
    else:
        command += EDITS[name]
    command += ["-c:v", "libx264", "-pix_fmt", "yuv420p", str(target)]
    subprocess.run(command, check=True)
    return target


def detected(path: Path) -> dict:
    from standin.provenance import verify

    watermark = verify(path)["watermark"]
    return {"detected": watermark["detected"], "best_bit_accuracy": watermark["best_bit_accuracy"]}


def run(count: int, sizes: list[int], photos: int, work: Path) -> dict:
    from standin.video import save_video

    results = {"count": count, "photos": photos, "sizes": sizes, "rows": []}
    marked_clips = world_clips(count, seed=1)
    clean_world = world_clips(count, seed=2)
    clean_photos = photo_clips(photos)
    for size in sizes:
        started = time.perf_counter()
        cells = {name: [] for name in ["untouched", *EDITS]}
        for index, clip in enumerate(marked_clips):
            path = save_video(upscale(clip, size), work / f"marked_{size}_{index}.mp4", fps=8)
            cells["untouched"].append(detected(path))
            for name in EDITS:
                cells[name].append(detected(edit(path, name, work / f"edit_{size}_{index}.mp4")))
        false = {"mini-world renders": [], "real photos (skimage)": []}
        for label, clips in (("mini-world renders", clean_world), ("real photos (skimage)", clean_photos)):
            for index, clip in enumerate(clips):
                path = save_video(upscale(clip, size), work / f"clean_{size}_{index}.mp4", fps=8, watermark=False)
                false[label].append(detected(path))
        for name, found in cells.items():
            results["rows"].append({
                "size": size, "kind": "marked", "case": name, "videos": len(found),
                "detection_rate": sum(f["detected"] for f in found) / len(found),
                "mean_bit_accuracy": float(np.mean([f["best_bit_accuracy"] for f in found])),
            })
        for name, found in false.items():
            if found:
                results["rows"].append({
                    "size": size, "kind": "unmarked", "case": name, "videos": len(found),
                    "detection_rate": sum(f["detected"] for f in found) / len(found),
                    "mean_bit_accuracy": float(np.mean([f["best_bit_accuracy"] for f in found])),
                })
        print(f"{size}x{size}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return results


def table(results: dict) -> str:
    lines = ["| frames | video | edit | videos | detected | mean bit accuracy (best layer) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        what = "watermarked" if row["kind"] == "marked" else f"unmarked: {row['case']}"
        case = row["case"] if row["kind"] == "marked" else "untouched"
        lines.append(f"| {row['size']}x{row['size']} | {what} | {case} | {row['videos']} | "
                     f"{row['detection_rate']:.0%} | {row['mean_bit_accuracy']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=8, help="watermarked videos (and unmarked renders) per size")
    parser.add_argument("--photos", type=int, default=8, help="unmarked videos made from real photos")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--out", type=Path, help="JSON results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        results = run(args.count, args.sizes, args.photos, Path(work))
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
