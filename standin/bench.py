"""What Stand-In costs over the base Wan transformer, measured side by side in one run.

For one config, on the same random weights and inputs, rounds are interleaved (base, cached, uncached, base, ...)
so that drift of the machine hits every variant alike. Reported, per denoising step with guidance (both branches
in one batch of 2) and per whole generation of N steps:
- base:      the diffusers WanTransformer3DModel alone
- kernels:   the base through Stand-In's attention path with a reference of zero tokens: the same video work
             with the same kernels (Stand-In's RoPE is faster than diffusers' on CPU), so that cached / kernels
             is what the reference tokens themselves cost
- cached:    Stand-In, reference keys/values computed once per generation (the reference pass counted once)
- uncached:  Stand-In, reference stream recomputed in every forward (what the official code does)
Overheads are over `kernels` (comparable to the floor) and, as users see it, over `base`; the floor is counted
from operations: video queries over the extra reference keys, plus the one-time reference pass. Peak memory:
CUDA's allocator peak per variant; on CPU the peak resident memory a fresh process per variant adds while it
runs, over the loaded model. Prints a table and writes JSON.

    standin bench --config tiny medium --json overhead.json                   # CPU
    standin bench --config real --layers 8 --device cuda --dtype bf16 --fp8    # GPU, 14B layer sizes
(benchmarks/overhead.py is the same program.)
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

import psutil
import torch

from standin.bench_cli import add_arguments
from standin.io import save_text
from standin.models import StandInAdapter, StandInModel, cast_like_pretrained
from standin.tiny import tiny_transformer

# Video grids are post-patch tokens (frames, height, width); the reference is ref x ref tokens.
# "real" is Wan2.1-14B at 480p / 81 frames: 21 x 30 x 52 = 32,760 video tokens and 32 x 32 = 1,024 reference
# tokens. The CPU configs keep the same reference / video token ratio (about 3%).
CONFIGS = {
    "tiny": dict(model=dict(size="tiny"), grid=(5, 12, 20), ref=6, text=32),
    "medium": dict(model=dict(size="medium"), grid=(5, 12, 20), ref=6, text=64),
    "real": dict(model=dict(size="14B"), grid=(21, 30, 52), ref=32, text=512),
}


@dataclass
class Result:
    config: str
    device: str
    dtype: str
    fp8: bool
    layers: int
    dim: int
    video_tokens: int
    reference_tokens: int
    steps: int
    base_step_s: float
    kernels_step_s: float
    cached_step_s: float
    uncached_step_s: float
    reference_pass_s: float
    cached_step_overhead: float  # over the base with the same kernels: what the reference tokens cost
    cached_step_vs_diffusers: float  # over diffusers' own base: what a user sees
    uncached_step_overhead: float
    cached_generation_overhead: float
    uncached_generation_overhead: float
    floor_step_overhead: float
    floor_generation_overhead: float
    cached_over_floor: float
    peak_memory_base_mb: float | None = None
    peak_memory_cached_mb: float | None = None
    peak_memory_uncached_mb: float | None = None
    cache_mb: float | None = None


def build(config: str, layers: int | None, device, dtype, fp8: bool = False):
    spec = CONFIGS[config]
    overrides = {"num_layers": layers} if layers else {}
    transformer = cast_like_pretrained(tiny_transformer(spec["model"]["size"], **overrides).to(device), dtype)
    if fp8:  # weights stored in float8, computed in `dtype`: the 24 GB GPU path
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    model = StandInModel(transformer, StandInAdapter.for_transformer(transformer, rank=128))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.adapter.named_parameters():
            if name.endswith("up.weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    f, h, w = spec["grid"]
    c = transformer.config
    latents = torch.randn(2, c.in_channels, f, 2 * h, 2 * w, generator=generator).to(device, dtype)
    reference = torch.randn(1, c.in_channels, 1, 2 * spec["ref"], 2 * spec["ref"], generator=generator)
    text = torch.randn(2, spec["text"], c.text_dim, generator=generator).to(device, dtype)
    return model, latents, reference.to(device, dtype), text


def counted_flops(model, video_tokens: int, reference_tokens: int, text_tokens: int):
    """Multiply-adds x 2 of one forward of one sample, and of the extra Stand-In work."""
    c = model.transformer.config
    dim, ffn, layers = c.num_attention_heads * c.attention_head_dim, c.ffn_dim, c.num_layers
    per_token_linear = 2 * (4 * dim * dim + 2 * dim * dim + 2 * dim * ffn)  # self qkvo, cross q/o, ffn
    text_kv = 2 * 2 * dim * dim * text_tokens
    attention = 2 * 2 * video_tokens * (video_tokens + text_tokens) * dim
    base = layers * (video_tokens * per_token_linear + text_kv + attention)
    extra_step = layers * 2 * 2 * video_tokens * reference_tokens * dim  # video queries over reference keys
    rank = model.adapter.rank
    reference_pass = layers * reference_tokens * (
        2 * (4 * dim * dim + 2 * dim * ffn) + 2 * 3 * 2 * dim * rank + 2 * 2 * reference_tokens * dim)
    return base, extra_step, reference_pass


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_variant(variant, model, latents, reference, text, steps: int, device):
    """One whole generation's transformer work: `steps` batched-guidance forwards."""
    timestep = torch.full((latents.shape[0],), 500.0, device=device)
    synchronize(device)
    start = time.perf_counter()
    if variant == "base":
        for _ in range(steps):
            model(latents, timestep, text)
    elif variant in ("kernels", "cached", "uncached"):
        with model.reference(reference, latents.shape, cache=variant != "uncached") as stream:
            if variant != "uncached":  # record the cache untimed (the "reference" variant times that forward)
                model(latents, timestep, text)
                if variant == "kernels":  # the same video work through the same kernels, zero reference tokens
                    stream.keys_values = [(key[:, :0], value[:, :0]) for key, value in stream.keys_values]
                synchronize(device)
                start = time.perf_counter()
            for _ in range(steps):
                model(latents, timestep, text)
    elif variant == "reference":  # the recording forward: the reference pass plus one cached step
        with model.reference(reference, latents.shape, cache=True):
            model(latents, timestep, text)
    synchronize(device)
    return time.perf_counter() - start


def peak_memory_mb(args, variant) -> float:
    """Peak memory of one generation of `variant`: CUDA allocator peak, or a fresh process's peak RSS on CPU."""
    if args.device == "cuda":
        model, latents, reference, text = build(args.config[0], args.layers, torch.device("cuda"), DTYPES[args.dtype],
                                                args.fp8)
        torch.cuda.reset_peak_memory_stats()
        run_variant(variant, model, latents, reference, text, 1, torch.device("cuda"))
        return torch.cuda.max_memory_allocated() / 2**20
    command = [sys.executable, "-m", "standin.bench", "--worker", variant, "--config", args.config[0], "--dtype", args.dtype,
               "--steps", "1"] + (["--layers", str(args.layers)] if args.layers else []) + (["--fp8"] if args.fp8 else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def benchmark(args, config: str) -> Result:
    device = torch.device(args.device)
    model, latents, reference, text = build(config, args.layers, device, DTYPES[args.dtype], args.fp8)
    spec = CONFIGS[config]
    video_tokens, reference_tokens = spec["grid"][0] * spec["grid"][1] * spec["grid"][2], spec["ref"] ** 2
    variants = ("base", "kernels", "cached", "uncached", "reference")
    for variant in variants:  # warm-up: allocator, kernels, caches
        run_variant(variant, model, latents, reference, text, 1, device)
    times = {variant: [] for variant in variants}
    for _ in range(args.rounds):
        for variant in times:
            times[variant].append(run_variant(variant, model, latents, reference, text, args.steps, device))
    median = {variant: statistics.median(values) for variant, values in times.items()}
    base_step = median["base"] / args.steps
    kernels_step = median["kernels"] / args.steps
    cached_step = median["cached"] / args.steps
    reference_pass = median["reference"] - cached_step  # the recording forward minus one cached step
    cached_generation = reference_pass + args.steps * cached_step
    uncached_step = median["uncached"] / args.steps
    base_flops, extra_step, reference_flops = counted_flops(model, video_tokens, reference_tokens, spec["text"])
    batch = latents.shape[0]
    floor_step = extra_step / base_flops
    floor_generation = (args.steps * batch * extra_step + reference_flops) / (args.steps * batch * base_flops)
    cached_overhead = cached_step / kernels_step - 1
    result = Result(
        config=config, device=str(device), dtype=args.dtype, fp8=args.fp8, layers=model.transformer.config.num_layers,
        dim=model.adapter.dim, video_tokens=video_tokens, reference_tokens=reference_tokens, steps=args.steps,
        base_step_s=base_step, kernels_step_s=kernels_step, cached_step_s=cached_step, uncached_step_s=uncached_step,
        reference_pass_s=reference_pass, cached_step_overhead=cached_overhead,
        cached_step_vs_diffusers=cached_step / base_step - 1,
        uncached_step_overhead=uncached_step / base_step - 1,
        cached_generation_overhead=cached_generation / median["base"] - 1,
        uncached_generation_overhead=median["uncached"] / median["base"] - 1,
        floor_step_overhead=floor_step, floor_generation_overhead=floor_generation,
        cached_over_floor=cached_overhead / floor_step if floor_step else float("nan"),
    )
    if args.memory:
        timestep = torch.full((latents.shape[0],), 500.0, device=device)
        with torch.no_grad(), model.reference(reference, latents.shape, cache=True) as stream:
            model(latents, timestep, text)
            result.cache_mb = sum(t.numel() * t.element_size() for kv in stream.keys_values for t in kv) / 2**20
        del model, stream
        result.peak_memory_base_mb = peak_memory_mb(args, "base")
        result.peak_memory_cached_mb = peak_memory_mb(args, "cached")
        result.peak_memory_uncached_mb = peak_memory_mb(args, "uncached")
    return result


def worker(args) -> None:
    """Runs one variant once in this fresh process and prints the peak of its resident memory above what the
    loaded model and inputs already held, in MB (sampled every millisecond: the high-water mark of the process
    would be set by the imports, not by the run)."""
    model, latents, reference, text = build(args.config[0], args.layers, torch.device("cpu"), DTYPES[args.dtype],
                                            args.fp8)
    process = psutil.Process()
    baseline = peak = process.memory_info().rss
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.wait(0.001):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    run_variant(args.worker, model, latents, reference, text, args.steps, torch.device("cpu"))
    done.set()
    sampler.join()
    print((max(peak, process.memory_info().rss) - baseline) / 2**20)


def print_table(results) -> None:
    print("overheads: `cached` and `floor` over the base with the same kernels; `vs diffusers`, `uncached` and the "
          "whole generations (gen) over diffusers' own base")
    print(f"{'config':8} {'tokens v+r':>12} {'base/step':>10} {'cached':>9} {'floor':>8} {'cached/floor':>12} "
          f"{'vs diffusers':>12} {'uncached':>9} {'gen cached':>10} {'gen uncached':>12} {'peak +MB b/c/u':>20}")
    for r in results:
        memory = "-" if r.peak_memory_base_mb is None else (
            f"{r.peak_memory_base_mb:.0f}/{r.peak_memory_cached_mb:.0f}/{r.peak_memory_uncached_mb:.0f}")
        print(f"{r.config:8} {r.video_tokens:>7}+{r.reference_tokens:<4} {r.base_step_s * 1e3:>8.1f}ms "
              f"{r.cached_step_overhead:>+8.2%} {r.floor_step_overhead:>+7.2%} {r.cached_over_floor:>12.2f} "
              f"{r.cached_step_vs_diffusers:>+11.2%} {r.uncached_step_overhead:>+8.2%} "
              f"{r.cached_generation_overhead:>+9.2%} "
              f"{r.uncached_generation_overhead:>+11.2%} {memory:>20}")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return 0
    results = [benchmark(args, config) for config in args.config]
    print_table(results)
    if args.json:
        payload = {"machine": platform.platform(), "torch": torch.__version__,
                   "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                   "results": [asdict(r) for r in results]}
        save_text(json.dumps(payload, indent=2), args.json)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
