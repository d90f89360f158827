"""Run by tests/test_context_parallel.py under torchrun: the tiny pipeline with diffusers' context parallelism
(`transformer.enable_parallelism`), on every rank; rank 0 saves what it computed for the test to compare with one
process. argv: output file, none|ulysses|ulysses_naive (the whole reference appended on every rank: what the
per-rank slicing prevents)."""

import sys

import torch
import torch.distributed as dist
from conftest import SIZES, reference_image, run
from diffusers import ContextParallelConfig

import standin.models.reference
from standin.models import reference_stream, video_grid
from standin.tiny import tiny_pipeline


def outputs(pipe) -> dict:
    """Velocities of one forward (batched guidance, with and without the reference, cached) and whole videos."""
    transformer, generator = pipe.transformer, torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, SIZES["num_frames"] // 4 + 1, SIZES["height"] // 8, SIZES["width"] // 8,
                    generator=generator)
    timestep, text = torch.tensor([700.0, 700.0]), torch.randn(2, 9, 32, generator=generator)
    latents = pipe.encode_reference_image(pipe.prepare_reference_image(reference_image(), preprocess=False))
    result = {"base": transformer(x, timestep, text, return_dict=False)[0]}
    with reference_stream(transformer, pipe.adapters["transformer"], latents, video_grid(transformer, x.shape)):
        result["recording"] = transformer(x, timestep, text, return_dict=False)[0]
        result["cached"] = transformer(x, timestep, text, return_dict=False)[0]
    result["video"] = run(pipe, reference_image(), negative_prompt="blurry")
    result["video_uncached"] = run(pipe, reference_image(), negative_prompt="blurry", cache_reference=False)
    result["video_two_references"] = run(pipe, [reference_image(1), reference_image(2)])
    result["video_base"] = run(pipe, negative_prompt="blurry")
    return result


def main(path: str, kind: str) -> None:
    torch.set_num_threads(1)
    pipe = tiny_pipeline()
    if kind != "none":
        dist.init_process_group("gloo")
        if not torch.accelerator.is_available():
            # diffusers picks this rank's device as rank % device_count, which divides by zero without an
            # accelerator; on CPU every rank uses the CPU.
            torch.accelerator.device_count = lambda: 1
        if kind == "ulysses_naive":
            whole = standin.models.reference.concat_reference
            standin.models.reference.concat_reference = lambda key, value, kv, shard: whole(key, value, kv)
        config = ContextParallelConfig(ulysses_degree=2)
        pipe.transformer.enable_parallelism(config=config)
    with torch.no_grad():
        result = outputs(pipe)
    if kind == "none" or dist.get_rank() == 0:
        torch.save(result, path)
    if kind != "none":
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
