"""`standin mini prepare`: the mini world as a pre-encoded training set, so that `standin train` runs only the
transformer.

    standin mini prepare --out runs/mini_data --clips 3000
    standin train --base mini/standin_mini/weights/base --data runs/mini_data --val-data mini -o runs/mini ...

Item i of the folder is item i of the train split `standin train --data mini` renders on the fly (the same
clip, reference and prompt), encoded once by the base's own VAE and text encoder, in the layout
`standin prepare-data --encode-with` writes (manifest.json, references/, latents/). On a 2-core CPU, rendering
and encoding are about four fifths of an on-the-fly step of the mini model. An interrupted run continues
where it stopped: each clip's file is written atomically and records its caption.
"""

import json
from dataclasses import asdict
from functools import partial
from pathlib import Path

from standin_mini.settings import MINI_FPS, MINI_SIZES, MINI_WEIGHTS


def prepare_mini(out: str | Path, clips: int, base: str | Path = MINI_WEIGHTS, workers: int = 1,
                 progress: bool = True) -> dict:
    """Write the first `clips` train-split items of the mini world, pre-encoded by `base`, to `out`; return the
    manifest. `workers` processes render clips while the main one encodes."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from standin.io import atomic_write, save_image, save_text
    from standin.train.config import PrepareSettings
    from standin.train.data import MANIFEST, tensor_to_image
    from standin.train.prepare import ClipEncoder
    from standin_mini.data import mini_dataset

    if clips < 1:
        raise ValueError(f"clips must be at least 1, got {clips}")
    out = Path(out)
    (out / "latents").mkdir(parents=True, exist_ok=True)
    (out / "references").mkdir(parents=True, exist_ok=True)
    encoder = ClipEncoder(str(base), device="cpu")
    encoded_with = encoder.describe()
    # A folder is completed only by the base that began it: clips encoded by two bases must never mix.
    started_with = out / "encoded_with.json"
    if started_with.exists() and json.loads(started_with.read_text()) != encoded_with:
        raise ValueError(f"{out} was begun with another base ({started_with.read_text().strip()}); "
                         "choose a new --out folder")
    save_text(json.dumps(encoded_with), started_with)
    frames, height, width = MINI_SIZES["num_frames"], MINI_SIZES["height"], MINI_SIZES["width"]
    dataset = mini_dataset("train", clips, frames, height, width, encoder.pipe.config.reference_size)

    def files(i: int) -> tuple[Path, Path]:
        return Path("latents") / f"mini_{i:06d}.safetensors", Path("references") / f"mini_{i:06d}.png"

    todo = [i for i in range(clips) if not all((out / f).exists() for f in files(i))]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, todo), batch_size=None,
                                         num_workers=workers)
    for i, item in zip(todo, tqdm(loader, desc="mini prepare", unit="clip", total=len(todo), disable=not progress)):
        latents_file, reference_file = files(i)
        tensors = encoder.encode(item["video"], item["prompt"], item["reference"])
        metadata = {"caption": item["prompt"], "identity": str(item["identity"])}
        save_image(tensor_to_image(item["reference"]), out / reference_file)  # first: the latents mark a clip done
        atomic_write(out / latents_file, partial(save_file, tensors, metadata=metadata))

    entries = []
    for i in range(clips):
        latents_file, reference_file = files(i)
        with safe_open(str(out / latents_file), "pt") as file:
            metadata = file.metadata()
        entries.append({"id": f"mini_{i:06d}", "reference": str(reference_file), "caption": metadata["caption"],
                        "identity": int(metadata["identity"]), "latents": str(latents_file)})
    settings = PrepareSettings(height=height, width=width, num_frames=frames, fps=MINI_FPS,
                               reference_size=encoder.pipe.config.reference_size, face_backend="mini",
                               background="keep")
    manifest = {"format": "standin-dataset", "version": 1, "settings": asdict(settings), "face_backend": "mini",
                "encoded_with": encoded_with, "source": "the mini world's train split (standin_mini.data)",
                "videos": clips, "clips": entries, "skipped": []}
    save_text(json.dumps(manifest, indent=2), out / MANIFEST)
    return manifest


def run(args) -> None:
    manifest = prepare_mini(args.out, args.clips, args.base, args.workers)
    print(f"wrote {args.out}: {len(manifest['clips'])} pre-encoded clips; train on it with "
          f"`standin train --base {args.base} --data {args.out} --val-data mini ...`")
