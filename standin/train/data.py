"""Training data: prepared dataset folders, named datasets of installed packages (the `standin.datasets` entry
points, e.g. "mini", the mini world of standin-mini), and the order in which a run reads them.

A run reads one endless stream of samples. Position p of the stream is item order_e[p mod n] of epoch
e = p div n, where order_e is a permutation seeded by (seed, e); the sample's noise and noise level come from
a generator seeded by (seed, p). Optimizer step s reads positions [s * G, (s + 1) * G) for the global batch G,
split over micro-steps and processes in a fixed layout. So what a step sees depends only on the seed and the
step: not on the number of processes, not on whether the run was interrupted and resumed.

Samples are either pixels (dict video [3, T, H, W] and reference [3, 1, S, S] in [-1, 1], prompt str; what named
datasets give) or, for datasets pre-encoded with `standin prepare-data --encode-with`, the frozen encoders'
outputs (latents, prompt_embeds, reference_latents), so that a step runs only the transformer.
"""

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from safetensors.torch import load_file

from standin.video import read_video

MANIFEST = "manifest.json"
MAX_SEQUENCE_LENGTH = 512  # what the pipeline pads prompts to at inference; training must see the same
MINI = "mini"  # the mini world's dataset (and face backend) name, when standin-mini is installed


# ---------------------------------------------------------------------------------------------------------------
# Pixels.


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [3, T, H, W] float32 in [-1, 1], the layout of Wan's video VAE."""
    return torch.from_numpy(np.array(frames)).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_image(pixels: torch.Tensor) -> PIL.Image.Image:
    """[3, 1, H, W] in [-1, 1] -> RGB image."""
    array = ((pixels[:, 0].permute(1, 2, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return PIL.Image.fromarray(array, "RGB")


def square_reference(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """A reference at the size the pipeline feeds its model (the same area resize as prepare_reference_image)."""
    image = image.convert("RGB")
    if image.width != image.height:
        raise ValueError(f"a prepared reference must be square, got {image.width}x{image.height}")
    return image if image.size == (size, size) else image.resize((size, size), PIL.Image.BOX)


# ---------------------------------------------------------------------------------------------------------------
# Datasets.


def read_manifest(folder: str | Path) -> dict:
    """A prepared dataset's manifest, checked: ValueError naming the file (and the clip) when it cannot be used."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        installed = ", ".join(dataset_names()) or "none installed"
        raise FileNotFoundError(f"{folder} is not a prepared dataset (no {MANIFEST}); make one with "
                                f"`standin prepare-data`, or use a dataset name ({installed})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); run `standin prepare-data` again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
        raise ValueError(f"{path} is not a `standin prepare-data` manifest (no 'settings')")
    clips = manifest.get("clips")
    if not clips:
        raise ValueError(f"{path} lists no usable clips (see its 'skipped' entries for why)")
    if not isinstance(clips, list) or not all(isinstance(clip, dict) for clip in clips):
        raise ValueError(f"{path}: 'clips' is not a list of clip entries")
    for number, clip in enumerate(clips):
        name = clip.get("id", f"number {number}")
        if not isinstance(clip.get("caption"), str) or not clip["caption"].strip():
            raise ValueError(f"{path}: clip {name} has caption {clip.get('caption')!r}, not text")
        if not isinstance(clip.get("reference"), str):
            raise ValueError(f"{path}: clip {name} has no 'reference' file")
        if not isinstance(clip.get("video"), str) and not isinstance(clip.get("latents"), str):
            raise ValueError(f"{path}: clip {name} has neither a 'video' nor a 'latents' file")
    return manifest


def dataset_fingerprint(data: str, mini_length: int) -> dict:
    """What identifies a run's training data, recorded in its checkpoints so that --resume refuses changed data.

    A prepared folder: its clip count and a SHA-256 of manifest.json's bytes and of each clip file's name and size
    (the files' contents are not read: that would read the whole dataset; a clip replaced by another of exactly
    the same size and the same manifest goes unnoticed). A named dataset: its name and length."""
    import hashlib

    if is_named_dataset(data):
        return {"name": str(data), "clips": mini_length}
    folder = Path(data)
    manifest = read_manifest(folder)
    digest = hashlib.sha256((folder / MANIFEST).read_bytes())
    for clip in manifest["clips"]:
        for key in ("video", "reference", "latents"):
            if isinstance(clip.get(key), str):
                file = folder / clip[key]
                size = file.stat().st_size if file.is_file() else -1
                digest.update(f"\0{clip[key]}\0{size}".encode())
    return {"clips": len(manifest["clips"]), "sha256": digest.hexdigest()}


class PreparedDataset(torch.utils.data.Dataset):
    """The clips of a `standin prepare-data` folder: pre-encoded tensors if the folder has them, else pixels.

    reference_size: the side the model's references have (the pipeline's config.reference_size).
    """

    def __init__(self, folder: str | Path, reference_size: int, use_latents: bool = True):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        self.clips = manifest["clips"]
        self.settings = manifest["settings"]
        self.encoded_with = manifest.get("encoded_with") if use_latents else None
        self.reference_size = reference_size

    def __len__(self) -> int:
        return len(self.clips)

    def reference_image(self, index: int) -> PIL.Image.Image:
        return square_reference(PIL.Image.open(self.folder / self.clips[index]["reference"]), self.reference_size)

    def __getitem__(self, index: int) -> dict:
        clip = self.clips[index]
        if self.encoded_with is not None:
            return load_file(str(self.folder / clip["latents"]))
        reference = np.asarray(self.reference_image(index))
        return {"video": frames_to_tensor(read_video(self.folder / clip["video"])),
                "reference": frames_to_tensor(reference[None]), "prompt": clip["caption"]}


def dataset_names() -> list[str]:
    """The names of the datasets installed packages provide (`standin.datasets` entry points)."""
    from standin.plugins import DATASETS, names

    return names(DATASETS)


def is_named_dataset(data: str) -> bool:
    """Whether --data / --val-data names an installed dataset (the name wins over a folder of that name: the
    repository itself has a folder mini/; give such a folder as ./mini)."""
    return str(data) in dataset_names()


def named_dataset(name: str, split: str, length: int, num_frames: int | None, height: int | None,
                  width: int | None, reference_size: int):
    """An installed package's dataset of pixel samples, generated for `split` ("train", or "test": held out) with
    `length` items; sizes left None are the dataset's own. Its `settings` dict gives num_frames, height, width
    and fps, as a prepared dataset's manifest does."""
    from standin.plugins import DATASETS, load

    factory = load(DATASETS, name)
    if factory is None:
        installed = ", ".join(dataset_names()) or "none"
        raise ValueError(f"no dataset named {name!r} is installed (installed: {installed}; pip install -e mini/ "
                         "for 'mini')")
    dataset = factory(split, length, num_frames, height, width, reference_size)
    missing = {"num_frames", "height", "width", "fps"} - set(getattr(dataset, "settings", {}))
    if missing:
        raise ValueError(f"dataset {name!r} gives no {', '.join(sorted(missing))} in its settings")
    return dataset


# ---------------------------------------------------------------------------------------------------------------
# The sample stream.


def position_seed(seed: int, position: int) -> int:
    """A well-mixed 64-bit seed for one stream position (neighbouring positions get unrelated generators)."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1, np.uint64)[0])


class SampleStream(torch.utils.data.Dataset):
    """Position p -> the dataset item of p (see the module docstring), with "position" added."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._orders: dict[int, np.ndarray] = {}  # the current epoch's order only

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))}
        return int(self._orders[epoch][offset])

    def __getitem__(self, position: int) -> dict:
        return {**self.dataset[self.index(position)], "position": position}


class StepBatches:
    """Batch sampler: the stream positions one process reads, micro-step after micro-step, from `start_step` on.

    Within step s, micro-step m, process r reads positions s*G + (m*P + r)*b + [0, b), with b the per-process
    batch, P processes, G = b * P * accumulation: together the processes read each step's G positions once.
    """

    def __init__(self, batch_size: int, num_processes: int, process_index: int, accumulation: int,
                 start_step: int, steps: int):
        self.batch_size, self.num_processes, self.process_index = batch_size, num_processes, process_index
        self.accumulation, self.start_step, self.steps = accumulation, start_step, steps

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes * self.accumulation

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accumulation

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            for micro in range(self.accumulation):
                first = step * self.global_batch + (micro * self.num_processes + self.process_index) * self.batch_size
                yield list(range(first, first + self.batch_size))


# ---------------------------------------------------------------------------------------------------------------
# Frozen encoders.


@torch.no_grad()
def vae_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, T, H, W] in [-1, 1] -> normalised latents (posterior mean), as the pipeline encodes references.

    One sample at a time, so that a sample's latents never depend on what else is in its batch."""
    from standin.pipeline import normalize_latents

    latents = torch.cat([vae.encode(p[None].to(vae.device, vae.dtype)).latent_dist.mean for p in pixels])
    return normalize_latents(vae, latents)


class PromptEncoder:
    """Prompts -> text embeddings [B, 512, text_dim] with the pipeline's text encoder, one prompt at a time,
    remembering the most recent `cache_size` prompts (the mini world has a small prompt vocabulary)."""

    def __init__(self, pipe, device, cache_size: int = 1024):
        self.pipe, self.device, self.cache_size = pipe, torch.device(device), cache_size
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        if prompt in self.cache:
            self.cache.move_to_end(prompt)
            return self.cache[prompt]
        embeds = self.pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                         max_sequence_length=MAX_SEQUENCE_LENGTH, device=self.device)[0][0]
        self.cache[prompt] = embeds
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return embeds

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([self.encode(prompt) for prompt in prompts])
