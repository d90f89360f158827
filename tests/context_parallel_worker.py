"""Run by tests/test_context_parallel.py under torchrun: the tiny pipeline with diffusers' context parallelism
(`transformer.enable_parallelism`), on every rank; rank 0 saves what it computed for the test to compare with one
process. argv: output file, none|ulysses|ring|unified, or ulysses_naive|ring_naive (the whole reference appended
on every rank, what the per-rank slicing prevents; unified: ring 2 x Ulysses 2 over 4 processes)."""

import sys

import math

import diffusers.models.attention_dispatch
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


def attention_with_lse(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """Attention that also returns the log-sum-exp, which ring attention merges partial results with. On GPUs the
    flash and cuDNN backends return it; no CPU backend does, so the CPU test puts this plain softmax in place of
    diffusers' native forward op. Everything else (the sharding, the ring, the merge) is diffusers' own code.
    Layout [B, S, H, D] in and out; lse [B, S, H]."""
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        raise NotImplementedError("the test's attention takes no mask, dropout, causality or grouped heads")
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))
    scores = query @ key.transpose(-1, -2) * (scale or 1 / math.sqrt(query.shape[-1]))
    out = (scores.softmax(-1) @ value).transpose(1, 2)
    return (out, scores.logsumexp(-1).transpose(1, 2)) if return_lse else out


def main(path: str, kind: str) -> None:
    torch.set_num_threads(1)
    pipe = tiny_pipeline()
    if kind != "none":
        dist.init_process_group("gloo")
        if not torch.accelerator.is_available():
            # diffusers picks this rank's device as rank % device_count, which divides by zero without an
            # accelerator; on CPU every rank uses the CPU.
            torch.accelerator.device_count = lambda: 1
        if kind.endswith("_naive"):
            kind = kind.removesuffix("_naive")
            whole = standin.models.reference.concat_reference
            standin.models.reference.concat_reference = lambda key, value, kv, shard: whole(key, value, kv)
        if kind in ("ring", "unified"):
            diffusers.models.attention_dispatch._native_attention_forward_op = attention_with_lse
        config = (ContextParallelConfig(ring_degree=2) if kind == "ring" else
                  ContextParallelConfig(ring_degree=2, ulysses_degree=2) if kind == "unified" else
                  ContextParallelConfig(ulysses_degree=2))
        pipe.transformer.enable_parallelism(config=config)
    with torch.no_grad():
        result = outputs(pipe)
    if kind == "none" or dist.get_rank() == 0:
        torch.save(result, path)
    if kind != "none":
        # Every rank leaves together: one tearing gloo down while a peer is still in a collective or saving
        # aborted a 4-process run once on busy cores ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
