"""diffusers' step-caching hooks (FirstBlockCache, TaylorSeer) on a Stand-In pipeline: speed-up and drift.

Each hook is enabled on the transformer exactly as on diffusers' WanPipeline (`pipe.transformer.enable_cache`),
and the same generation (prompt, seed, reference) runs with and without it, with and without a reference.
Drift is measured against the hook-free video of the same case: mean absolute pixel difference (0-255 scale)
and PSNR. Rounds are interleaved and the median time is reported. Prints a table; --json writes the numbers.

    python benchmarks/caching_hooks.py --base mini/standin_mini/weights/base \
        --adapter mini/standin_mini/weights/standin_adapter.safetensors --reference examples/woman_34.png
"""

import argparse
import json
import statistics
import time

import numpy as np
import torch
from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

from standin.io import save_text
from standin.loading import load_pipeline

HOOKS = {
    "none": None,
    "first-block 0.05": lambda steps: FirstBlockCacheConfig(threshold=0.05),
    "first-block 0.2": lambda steps: FirstBlockCacheConfig(threshold=0.2),
    # TaylorSeer's default module selection finds nothing to hook in diffusers' Wan blocks: name them.
    "taylorseer 2": lambda steps: TaylorSeerCacheConfig(cache_interval=2, max_order=1, disable_cache_before_step=3,
                                                        disable_cache_after_step=steps - 2,
                                                        cache_identifiers=[r"^blocks\.\d+$"]),
}


def generate(pipe, reference, args) -> np.ndarray:
    frames = pipe(prompt=args.prompt, reference_image=reference, num_inference_steps=args.steps,
                  generator=torch.Generator().manual_seed(args.seed)).frames[0]
    return (np.asarray(frames) * 255).round()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--prompt", default="A woman waves on a beach at noon.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    pipe = load_pipeline(args.base, adapter=args.adapter, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for case, reference in (("no reference", None), ("reference", args.reference)):
        times, videos = {name: [] for name in HOOKS}, {}
        for _ in range(args.rounds):
            for name, config in HOOKS.items():
                if config is not None:
                    pipe.transformer.enable_cache(config(args.steps))
                start = time.perf_counter()
                videos[name] = generate(pipe, reference, args)
                times[name].append(time.perf_counter() - start)
                if config is not None:
                    pipe.transformer.disable_cache()
        plain, plain_time = videos["none"], statistics.median(times["none"])
        for name in HOOKS:
            error = np.abs(videos[name] - plain)
            mse = float((error**2).mean())
            rows.append(dict(case=case, hook=name, seconds=statistics.median(times[name]),
                             speedup=plain_time / statistics.median(times[name]), mean_abs_diff=float(error.mean()),
                             psnr=float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))))
    print(f"{'case':14} {'hook':18} {'seconds':>8} {'speed-up':>9} {'mean |diff|':>12} {'PSNR dB':>8}")
    for r in rows:
        print(f"{r['case']:14} {r['hook']:18} {r['seconds']:>8.2f} {r['speedup']:>8.2f}x {r['mean_abs_diff']:>12.2f} "
              f"{r['psnr']:>8.1f}")
    if args.json:
        save_text(json.dumps({"steps": args.steps, "rows": rows}, indent=2), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
