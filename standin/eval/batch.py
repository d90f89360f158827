"""Evaluating many (video, reference) pairs: pairing conventions, progress, summary.

Pairing, in order of precedence:
- a CSV file with a header row and the columns `video` and `reference`; relative paths are relative to the
  CSV's folder;
- one reference for every video of a folder;
- by file name in a folder, following the naming of `standin.video.companion_paths`: `name.mp4` goes with
  `name.reference.png` (the reference as the model saw it, written beside every generated video), else with a
  `name.png` (or .jpg, .jpeg, .webp, .bmp) next to it, for folders people put together. A contact sheet
  `name.sheet.png` is never taken as a reference, nor a `name.png` that is a grid of the video's frames (the
  contact sheets `standin generate` wrote before they were named `.sheet.png`): both would score the video
  against its own frames.
Videos are files ending in .mp4, .mov, .mkv, .webm, .avi or .gif. A video without a reference is reported
as an error row, not skipped silently.
"""

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from standin.eval.metrics import DEFAULT_NUM_FRAMES, NoFaceError, evaluate_video
from standin.eval.frames import VideoReadError
from standin.faces import get_backend
from standin.io import regular_file_problem
from standin.preprocess.images import ImageLoadError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFERENCE_SUFFIX = ".reference"  # name.reference.png, see standin.video.companion_paths
SHEET_SUFFIX = ".sheet"  # name.sheet.png: a contact sheet of the video's frames, never a reference
SUMMARY_KEYS = ("face_sim", "face_rate", "copy_paste_score", "motion")
# per-video problems that are recorded in the results instead of stopping the batch
EXPECTED_ERRORS = (ImageLoadError, VideoReadError, NoFaceError)


@dataclass
class Pair:
    video: Path
    reference: Path | None  # None: no reference found for this video
    problem: str | None = None  # why there is no reference, when it is not simply missing


@dataclass
class BatchResult:
    rows: list[dict] = field(default_factory=list)  # one per pair: video, reference, scores or error

    def summary(self) -> dict:
        """Mean of each metric over the videos where it is defined, and how many videos were evaluated."""
        ok = [r for r in self.rows if "error" not in r]
        means = {}
        for key in SUMMARY_KEYS:
            values = [r[key] for r in ok if r.get(key) is not None]
            means[key] = float(np.mean(values)) if values else None
        return {"videos": len(self.rows), "evaluated": len(ok), "failed": len(self.rows) - len(ok), **means}

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "videos": self.rows}


def find_pairs(folder, reference=None) -> list[Pair]:
    """Pairs for the videos of `folder`: all with `reference` if given, else by matching file name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VideoReadError(f"{folder}: not a folder")
    videos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    if not videos:
        raise VideoReadError(f"{folder}: no video files ({', '.join(VIDEO_EXTENSIONS)})")
    if reference is not None:
        return [Pair(v, Path(reference)) for v in videos]
    pairs = []
    for video in videos:
        image = _image_named_like(video)
        if image is not None and not image.stem.lower().endswith(REFERENCE_SUFFIX) and _is_contact_sheet(image, video):
            problem = (
                f"{image.name} is a contact sheet of this video's frames, not a reference photo; "
                f"put the reference beside the video as {video.stem}{REFERENCE_SUFFIX}.png"
            )
            pairs.append(Pair(video, None, problem))
        else:
            pairs.append(Pair(video, image))
    return pairs


def read_pairs_csv(csv_path) -> list[Pair]:
    """Pairs from a CSV with a header and columns `video`, `reference` (paths relative to the CSV's folder)."""
    csv_path = Path(csv_path)
    problem = regular_file_problem(csv_path, "pairs file")
    if problem:
        raise VideoReadError(f"{csv_path}: {problem}")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"video", "reference"} <= set(reader.fieldnames):
            raise VideoReadError(f"{csv_path}: expected a header row with the columns 'video' and 'reference'")
        rows = list(reader)
    base = csv_path.parent
    return [Pair(base / row["video"], base / row["reference"] if row["reference"] else None) for row in rows]


def evaluate_pairs(
    pairs: list[Pair], *, backend=None, num_frames: int = DEFAULT_NUM_FRAMES, progress: bool = True
) -> BatchResult:
    """Evaluate every pair; a bad video or reference becomes an error row and the batch goes on."""
    from tqdm.auto import tqdm

    backend = get_backend(backend)  # load the models once, before the progress bar starts
    result = BatchResult()
    for pair in tqdm(pairs, desc="evaluating", unit="video", disable=not progress):
        row = {"video": str(pair.video), "reference": None if pair.reference is None else str(pair.reference)}
        if pair.reference is None:
            row["error"] = pair.problem or "no reference image with the same name"
        else:
            try:
                row.update(evaluate_video(pair.video, pair.reference, backend=backend, num_frames=num_frames).to_dict())
            except EXPECTED_ERRORS as e:
                row["error"] = str(e)
        result.rows.append(row)
    return result


def format_table(result: BatchResult) -> str:
    """Fixed-width text table: one line per video, then the mean."""
    header = f"{'video':<32} {'FaceSim':>8} {'faces':>6} {'copy-paste':>10} {'motion%':>8}"
    lines = [header, "-" * len(header)]
    for row in result.rows:
        name = Path(row["video"]).name[:32]
        if "error" in row:
            lines.append(f"{name:<32} error: {row['error']}")
        else:
            lines.append(
                f"{name:<32} {_cell(row['face_sim'], 8)} {_cell(row['face_rate'], 6)} "
                f"{_cell(row['copy_paste_score'], 10)} {_cell(row['motion'], 8)}"
            )
    summary = result.summary()
    lines.append("-" * len(header))
    lines.append(
        f"{'mean (' + str(summary['evaluated']) + ' of ' + str(summary['videos']) + ')':<32} "
        f"{_cell(summary['face_sim'], 8)} {_cell(summary['face_rate'], 6)} "
        f"{_cell(summary['copy_paste_score'], 10)} {_cell(summary['motion'], 8)}"
    )
    return "\n".join(lines)


def _cell(value, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"


def _image_named_like(video: Path) -> Path | None:
    """`name.reference.png` (or another image extension) for `name.mp4`, else `name.png`, `name.jpg`, ...;
    never a contact sheet `*.sheet.png`."""
    for stem in (video.stem + REFERENCE_SUFFIX, video.stem):
        if stem.lower().endswith(SHEET_SUFFIX):
            continue
        for extension in IMAGE_EXTENSIONS:
            for candidate in (video.with_name(stem + extension), video.with_name(stem + extension.upper())):
                if candidate.is_file():
                    return candidate
    return None


def _is_contact_sheet(image: Path, video: Path) -> bool:
    """True when `image` is a grid of 2 or more of the video's frames: what `standin generate` wrote as
    `name.png` before contact sheets were named `name.sheet.png`. Taken as the reference, it would score the
    video against its own frames. Sizes come from the headers; anything unreadable is left to the evaluation."""
    from PIL import Image

    from standin.video import video_size

    try:
        with Image.open(image) as opened:
            width, height = opened.size
        frame_width, frame_height = video_size(video)
    except (OSError, ValueError, RuntimeError):
        return False
    if frame_width < 1 or frame_height < 1 or width % frame_width or height % frame_height:
        return False
    columns, rows = width // frame_width, height // frame_height
    return columns * rows >= 2 and columns <= 8
