"""Contact sheets of the mini world: a grid of identities, or the frames of clips with their prompts.

    python -m standin_mini.sheet identities.png          # 8 x 4 identities in their scenes
    python -m standin_mini.sheet clips.png --clips 6     # one row per clip, every other frame
"""

import argparse

import numpy as np
from PIL import Image, ImageDraw

from standin_mini import world
from standin_mini.data import HELDOUT_IDENTITIES, make_clip, make_reference, split_identity
from standin_mini.prompts import sample_prompt


def stack_rows(rows: list[Image.Image]) -> Image.Image:
    """Images one under the other, left-aligned, on white."""
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    top = 0
    for row in rows:
        sheet.paste(row, (0, top))
        top += row.height
    return sheet


def identity_sheet(identity_ids, columns: int = 8, tile: int = 96, seed: int = 0) -> Image.Image:
    """Each identity in a frontal portrait, in a scene and light of its own."""
    rng = np.random.default_rng(seed)
    tiles = []
    for identity_id in identity_ids:
        place, time = str(rng.choice(world.PLACES)), str(rng.choice(world.TIMES))
        scene = world.background(place, time, (tile, tile), int(rng.integers(0, 2**31)))
        pose = world.Pose(y=0.42, scale=0.42, yaw=rng.uniform(-0.3, 0.3), mouth=str(rng.choice(["closed", "smile"])))
        tiles.append(world.render(world.identity(int(identity_id)), pose, world.time_light(time, rng), scene,
                                  (tile, tile)).image)
    rows = -(-len(tiles) // columns)
    tiles += [np.full((tile, tile, 3), 255, np.uint8)] * (rows * columns - len(tiles))
    return Image.fromarray(np.concatenate([np.concatenate(tiles[r * columns:(r + 1) * columns], 1)
                                           for r in range(rows)], 0))


def clip_sheet(clips, references=None, every: int = 2, label_height: int = 12) -> Image.Image:
    """One row per clip (every `every`-th frame), its reference first when given, its prompt above."""
    rows = []
    for k, clip in enumerate(clips):
        frames = list(clip.frames[::every])
        if references is not None:
            height = clip.frames.shape[1]
            frames.insert(0, np.asarray(Image.fromarray(references[k]).resize((height, height), Image.BOX)))
        strip = np.concatenate(frames, 1)
        label = Image.new("RGB", (strip.shape[1], label_height), (255, 255, 255))
        ImageDraw.Draw(label).text((2, 0), f"id {clip.identity_id}: {clip.prompt}", fill=(0, 0, 0))
        rows.append(np.concatenate([np.asarray(label), strip], 0))
    return Image.fromarray(np.concatenate(rows, 0))


def run(args: argparse.Namespace):
    if args.clips:
        rng = np.random.default_rng(args.seed)
        ids = [split_identity("test", int(k)) for k in rng.integers(0, HELDOUT_IDENTITIES, args.clips)]
        clips = [make_clip(i, sample_prompt(args.seed * 1000 + n, world.identity(i)), size=(args.size, args.size),
                           seed=args.seed * 1000 + n) for n, i in enumerate(ids)]
        sheet = clip_sheet(clips, [make_reference(i, args.size, seed=args.seed) for i in ids])
    else:
        sheet = identity_sheet(range(args.count), tile=args.size, seed=args.seed)
    sheet.save(args.out)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")


if __name__ == "__main__":
    from standin_mini.cli import sheet_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sheet_arguments(parser)
    run(parser.parse_args())
