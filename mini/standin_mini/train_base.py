"""Train the mini base model from scratch on a CPU: the real Wan classes at tiny sizes, on the mini world.

    python -m standin_mini.train_base vae --work /tmp/mini_work        # stage 1: frame-wise video VAE
        [--set init=mini/standin_mini/weights/base/vae --set steps=2400 --set lr=1e-3]  # continue a trained one
        [--set scale_equivariance=1.0]  # pooled latents must decode to pooled frames (docs/mini_base_capacity.md)
    python -m standin_mini.train_base t2v --work /tmp/mini_work        # stage 2: latent cache, text encoder + DiT
        [--device cuda --workers 16 --set steps=20000 --set batch=64 --set clips=20000]   # a longer run on a GPU
        [--set init=mini/standin_mini/weights/base --set steps=6000]  # continue the shipped base, on its own VAE
        [--set init=mini/standin_mini/weights/base --set layers=12]   # grow it deeper first (grow_depth)
        [--set init=mini/standin_mini/weights/base --set patch=1]     # or refine its token grid (refine_patches)
        [--set ema=0.995]  # export a moving average of the weights (the last step's stay in t2v/checkpoint.pt)
        [--set image_batch=64]  # single frames of cached clips beside the clips, a second loss
        [--set motion_loss=5]   # weigh the predicted clip's change between frames on its own (motion_error)
    python -m standin_mini.train_base evaluate --work /tmp/mini_work   # sample clips, contact sheet, prompt checks
    python -m standin_mini.train_base export --work /tmp/mini_work --out mini/standin_mini/weights/base

Stage 1 trains an AutoencoderKLWan without temporal down-sampling whose causal 3-D kernels have zero taps on
past frames. Trained on single frames, those taps only ever meet the causal zero padding: their gradient is
exactly zero and they stay zero, so the VAE is exactly frame-wise on videos (and one frame costs a third of
the 3-D work, see `one_frame_convs`). Stage 2 encodes clips of the mini world's train split once (the VAE is
frozen from then on), then trains a UMT5 text encoder and a WanTransformer3DModel jointly with Wan's flow
matching: x_t = (1 - sigma) x0 + sigma noise, velocity target noise - x0, timestep 1000 sigma, with sigma
drawn from the sampler's own distribution (a uniform sigma shifted by MINI_SHIFT, so training sees the noise
levels in the proportions the Euler sampler visits them; the exported pipeline records that shift).

Every stage resumes: a killed run started again with the same command continues from its last checkpoint
(model, optimizer, LR schedule, step) exactly as if it had never stopped, because all randomness of step s
(the batch, the noise) is drawn from generators seeded with (seed, s) and nothing else. A finished stage
leaves its result in WORK/<stage>/final and is not run again; delete WORK to start over.
"""

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.training_utils import EMAModel
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import UMT5Config, UMT5EncoderModel

from standin.io import atomic_write, save_image, save_text
from standin_mini import world
from standin_mini.data import (HELDOUT_IDENTITIES, MiniClipDataset, make_clip, make_reference, split_identity,
                               to_tensor)
from standin_mini.model import MINI_FPS, MINI_GUIDANCE, MINI_REFERENCE_GUIDANCE, MINI_SHIFT, MINI_SIZES
from standin_mini.prompts import sample_prompt
from standin_mini.tokenizer import mini_tokenizer
from standin.pipeline import WAN_NEGATIVE_PROMPT, StandInPipeline, normalize_latents, standin_scheduler

logger = logging.getLogger(__name__)

FRAME_SIZE = (MINI_SIZES["height"], MINI_SIZES["width"])
NUM_FRAMES = MINI_SIZES["num_frames"]
REFERENCE_SIZE = 64
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default: prompt embeddings are zero-padded to this length
SHARD_CLIPS = 500


@dataclass
class VaeConfig:
    base_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)  # three 2x down-samplings: a 64x64 frame -> 8x8 latent
    z_dim: int = 16
    steps: int = 2400
    batch: int = 16  # images: two frames of a clip, then a reference photo of its identity, and so on
    crop: int = 32  # train on random crops: 4x the steps for the same compute (the VAE is convolutional)
    lr: float = 2e-3  # with MSE, the fastest of those tried (L1, lower rates: slower; 4e-3: unstable)
    warmup: int = 50
    kl_weight: float = 1e-5  # on the per-element KL: only a light pull, as Wan and SD's VAEs do
    # Scale equivariance (Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders"): the latent
    # average-pooled 2x must also decode to the frame pooled 2x, which keeps fine-scale noise out of the latents.
    scale_equivariance: float = 0.0
    eval_clips: int = 32  # held-out identities and prompts: two frames per clip, plus one reference each
    stats_clips: int = 128  # clips whose latents set latents_mean / latents_std
    checkpoint_every: int = 50
    seed: int = 0
    init: str = ""  # a trained frame-wise VAE folder to continue from (e.g. the shipped base's vae/), "" = scratch


@dataclass
class T2VConfig:
    clips: int = 3000  # cached train-split clips (item i is MiniClipDataset("train", seed=seed)[i])
    text_dim: int = 64
    text_layers: int = 2
    heads: int = 4
    head_dim: int = 32  # RoPE: 10 dims each for height and width, 12 for time
    layers: int = 6
    patch: int = 2  # spatial patch of the transformer: 8x8 latents -> 4x4 tokens a frame (1: 8x8, ~5x a step)
    ffn_dim: int = 512
    freq_dim: int = 64
    steps: int = 3000
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 100
    min_lr: float = 0.1  # of lr, at the end of the cosine decay
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    shift: float = MINI_SHIFT  # of the training sigma distribution (the sampler's shift)
    prompt_dropout: float = 0.1  # the unconditional branch of classifier-free guidance
    image_batch: int = 0  # single frames a step besides the clips (Wan trains on images too): 16 tokens each, not 272
    ema: float = 0.0  # decay of an exponential moving average of the weights, which the stage then exports; 0: off
    motion_loss: float = 0.0  # weight of the clips' frame-to-frame loss (motion_error); 0: off
    checkpoint_every: int = 100
    seed: int = 0
    init: str = ""  # an exported mini base folder to continue from (e.g. the shipped one), "" = scratch


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The torch generator of one step: a function of (seed, step, stream) alone, so resuming is exact."""
    state = np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def cosine_schedule(warmup: int, steps: int, min_lr: float = 0.0):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: the frame-wise VAE.


def causal_convs(vae: AutoencoderKLWan) -> list[WanCausalConv3d]:
    """The causal convolutions that reach back in time (temporal kernel size > 1)."""
    return [m for m in vae.modules() if isinstance(m, WanCausalConv3d) and m.kernel_size[0] > 1]


def past_taps_are_zero(vae: AutoencoderKLWan) -> bool:
    return all(not conv.weight[:, :, :-1].any() for conv in causal_convs(vae))


def build_vae(config: VaeConfig) -> AutoencoderKLWan:
    torch.manual_seed(config.seed)
    levels = len(config.dim_mult) - 1
    vae = AutoencoderKLWan(base_dim=config.base_dim, z_dim=config.z_dim, dim_mult=list(config.dim_mult),
                           num_res_blocks=1, temperal_downsample=[False] * levels, scale_factor_temporal=1,
                           scale_factor_spatial=2**levels)
    with torch.no_grad():
        for conv in causal_convs(vae):
            conv.weight[:, :, :-1] = 0  # no tap sees a past frame: the VAE is frame-wise
            conv.weight[:, :, -1] *= conv.kernel_size[0] ** 0.5  # the initial scale for the fan-in of one tap
    return vae


@contextlib.contextmanager
def one_frame_convs(vae: AutoencoderKLWan):
    """Within the block, run every causal 3-D convolution of `vae` as the 2-D convolution of its last temporal tap.

    On one-frame inputs the earlier taps only meet the causal zero padding, so this is the same function (and
    the same gradients) with a third of the work. Inputs of any other length are refused.
    """

    def forward(conv, x, cache_x=None):
        if x.shape[2] != 1 or cache_x is not None:
            raise ValueError("one_frame_convs runs one-frame inputs only")
        padding = (conv._padding[2], conv._padding[0])  # (height, width); the temporal padding is the zeros
        return F.conv2d(x[:, :, 0], conv.weight[:, :, -1], conv.bias, conv.stride[1:], padding)[:, :, None]

    convs = [m for m in vae.modules() if isinstance(m, WanCausalConv3d)]
    for conv in convs:
        conv.forward = functools.partial(forward, conv)
    try:
        yield vae
    finally:
        for conv in convs:
            del conv.forward


def as_frames(video: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, 1, H, W]: a batch of one-frame videos."""
    return video.transpose(1, 2).flatten(0, 1)[:, :, None]


def encode_frames(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """Posterior means of a frame-wise VAE for [B, 3, T, H, W] videos, each frame encoded on its own (fast)."""
    with one_frame_convs(vae), torch.no_grad():
        mean = vae.encode(as_frames(video)).latent_dist.mean
    return mean[:, :, 0].unflatten(0, video.shape[:1] + video.shape[2:3]).transpose(1, 2)


class FrameBatches(torch.utils.data.Dataset):
    """Item s is the batch of training step s, [B, 3, 1, crop, crop] in [-1, 1], rendered from (seed, s) alone:
    two random frames of a train-split clip, a reference photo of its identity, the same for the next clip...,
    each cut to a random crop."""

    def __init__(self, config: VaeConfig):
        self.config = config

    def __len__(self):
        return self.config.steps

    def __getitem__(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.config.seed, step, 1])
        images = []
        while len(images) < self.config.batch:
            identity_id = split_identity("train", int(rng.integers(0, world.NUM_IDENTITIES - HELDOUT_IDENTITIES)))
            prompt = sample_prompt(int(rng.integers(0, 2**31)), world.identity(identity_id), "train")
            clip = make_clip(identity_id, prompt, NUM_FRAMES, FRAME_SIZE, seed=int(rng.integers(0, 2**31)))
            images += list(clip.frames[rng.choice(NUM_FRAMES, 2, replace=False)])
            images.append(make_reference(identity_id, REFERENCE_SIZE, seed=int(rng.integers(0, 2**31))))
        size = self.config.crop
        corners = rng.integers(0, FRAME_SIZE[0] - size + 1, (self.config.batch, 2))
        crops = [image[y:y + size, x:x + size] for image, (y, x) in zip(images, corners)]
        return as_frames(to_tensor(np.stack(crops))[None])


def heldout_frames(config: VaeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip frames, references) of held-out identities in held-out prompt combinations, [N, 3, 1, 64, 64]."""
    frames, references = [], []
    for k in range(config.eval_clips):
        identity_id = split_identity("test", k)
        prompt = sample_prompt(k, world.identity(identity_id), "test")
        clip = make_clip(identity_id, prompt, NUM_FRAMES, FRAME_SIZE, seed=k)
        frames += [clip.frames[0], clip.frames[NUM_FRAMES // 2]]
        references.append(make_reference(identity_id, REFERENCE_SIZE, seed=k))
    return as_frames(to_tensor(np.stack(frames))[None]), as_frames(to_tensor(np.stack(references))[None])


def vae_loss(vae: AutoencoderKLWan, frames: torch.Tensor, generator: torch.Generator, config: VaeConfig):
    with one_frame_convs(vae):
        posterior = vae.encode(frames).latent_dist
        # The decoder itself, not vae.decode: decode clamps to [-1, 1], which would stop gradients at the edges.
        z = posterior.sample(generator)
        recon = vae.decoder(vae.post_quant_conv(z))
        mse = F.mse_loss(recon, frames)
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).mean()
        loss, parts = mse + config.kl_weight * kl, {"mse": mse.item(), "kl": kl.item()}
        if config.scale_equivariance:
            coarse = vae.decoder(vae.post_quant_conv(pool2(z)))
            se = F.mse_loss(coarse, pool2(frames))
            loss, parts["se"] = loss + config.scale_equivariance * se, se.item()
    return loss, parts


def pool2(x: torch.Tensor) -> torch.Tensor:
    """[N, C, 1, H, W] -> [N, C, 1, H/2, W/2]: the mean of each 2x2 block."""
    return F.avg_pool3d(x, (1, 2, 2))


def fine_scale_share(x: torch.Tensor) -> float:
    """The share of the spatial variance of the maps [N, C, 1, H, W] that lies within 2x2 blocks (what `pool2`
    removes), averaged over channels (each weighs the same, as after the pipeline's per-channel normalisation):
    3/4 for white noise, less for the smooth pictures a diffusion model draws coarse to fine."""
    x = x - x.mean((-2, -1), keepdim=True)
    fine = x - F.interpolate(pool2(x), scale_factor=(1, 2, 2), mode="nearest")
    per_channel = fine.pow(2).transpose(0, 1).flatten(1).sum(1) / x.pow(2).transpose(0, 1).flatten(1).sum(1)
    return float(per_channel.mean())


@torch.no_grad()
def psnr(vae: AutoencoderKLWan, frames: torch.Tensor) -> float:
    """Mean PSNR (dB, pixels in [0, 1]) of reconstructions through the posterior mean, as the pipeline decodes."""
    with one_frame_convs(vae):
        recon = vae.decode(vae.encode(frames).latent_dist.mean).sample
    mse = ((recon - frames) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


@torch.no_grad()
def latent_fine_share(vae: AutoencoderKLWan, frames: torch.Tensor) -> float:
    """`fine_scale_share` of the posterior means of `frames`."""
    with one_frame_convs(vae):
        return fine_scale_share(vae.encode(frames).latent_dist.mean)


@torch.no_grad()
def latent_statistics(vae: AutoencoderKLWan, config: VaeConfig) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means of train-split clips (all their frames)."""
    dataset = MiniClipDataset("train", length=config.stats_clips, seed=config.seed + 1)
    latents = torch.cat([encode_frames(vae, dataset[i]["video"][None]) for i in range(len(dataset))])
    channels = latents.transpose(0, 1).flatten(1)
    return channels.mean(1).tolist(), channels.std(1).tolist()


def train_vae(work: Path, config: VaeConfig) -> Path:
    stage = work / "vae"
    final = stage / "final"
    if final.exists():
        logger.info("stage vae: already done (%s)", final)
        return final
    vae = (AutoencoderKLWan.from_pretrained(config.init) if config.init else build_vae(config)).train()
    if config.init:
        shape = (vae.config.base_dim, tuple(vae.config.dim_mult), vae.config.z_dim)
        asked = (config.base_dim, tuple(config.dim_mult), config.z_dim)
        if shape != asked:
            raise ValueError(f"{config.init} has base_dim, dim_mult, z_dim {shape}, the config asks {asked}")
        if not past_taps_are_zero(vae):
            raise ValueError(f"{config.init} is not a frame-wise VAE: its causal convolutions reach past frames")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)  # no decay: keep taps exact
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(config.warmup, config.steps))
    eval_frames, eval_references = heldout_frames(config)

    def evaluate() -> dict:
        vae.eval()
        metrics = {"psnr_frames": psnr(vae, eval_frames), "psnr_references": psnr(vae, eval_references),
                   "latent_fine_share": latent_fine_share(vae, eval_frames)}
        vae.train()
        return metrics

    def step(s: int, batch: torch.Tensor) -> dict:
        loss, parts = vae_loss(vae, batch, step_generator(config.seed, s), config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        return {"loss": loss.item(), **parts}

    def batches(sampler):  # rendered in a worker process, ahead of the training step
        return torch.utils.data.DataLoader(FrameBatches(config), batch_size=None, sampler=sampler, num_workers=1)

    history = run_steps(stage, config, {"vae": vae}, optimizer, schedule, step, batches, evaluate)

    vae.eval()
    assert past_taps_are_zero(vae), "a past-frame tap moved: the VAE would not be frame-wise"
    factor = vae.config.scale_factor_spatial  # the frames pooled to the latent grid: the picture's own share
    metrics = {"config": asdict(config), **history, **evaluate(),
               "frames_fine_share": fine_scale_share(F.avg_pool3d(eval_frames, (1, factor, factor)))}
    mean, std = latent_statistics(vae, config)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    save_folder(final, lambda folder: vae.save_pretrained(folder))
    save_text(json.dumps(metrics, indent=2), stage / "metrics.json")
    logger.info("stage vae: done, %s", json.dumps({k: v for k, v in metrics.items() if k != "curve"}))
    return final


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: latent cache, text encoder and text-to-video transformer.


def build_text_encoder(config: T2VConfig, vocab_size: int) -> UMT5EncoderModel:
    torch.manual_seed(config.seed)
    return UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=config.text_dim, d_kv=config.text_dim // 4, d_ff=2 * config.text_dim,
        num_layers=config.text_layers, num_heads=4, relative_attention_num_buckets=16,
        relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def build_transformer(config: T2VConfig) -> WanTransformer3DModel:
    torch.manual_seed(config.seed + 1)
    return WanTransformer3DModel(
        patch_size=(1, config.patch, config.patch), num_attention_heads=config.heads,
        attention_head_dim=config.head_dim, in_channels=16, out_channels=16, text_dim=config.text_dim,
        freq_dim=config.freq_dim, ffn_dim=config.ffn_dim, num_layers=config.layers, cross_attn_norm=True, eps=1e-6,
    )


def trained_t2v(config: T2VConfig, vocab_size: int) -> tuple[UMT5EncoderModel, WanTransformer3DModel]:
    """The text encoder and transformer of the exported base config.init, checked against the config's sizes
    (a continued run must be the model the config describes, or its record would be wrong). A config with more
    layers than the base grows it (`grow_depth`): the same function, more blocks to train; a smaller patch refines
    its token grid (`refine_patches`)."""
    text_encoder = UMT5EncoderModel.from_pretrained(Path(config.init) / "text_encoder")
    transformer = WanTransformer3DModel.from_pretrained(Path(config.init) / "transformer")
    found = (text_encoder.config.vocab_size, text_encoder.config.d_model, text_encoder.config.num_layers,
             transformer.config.num_attention_heads, transformer.config.attention_head_dim,
             transformer.config.ffn_dim, transformer.config.freq_dim)
    asked = (vocab_size, config.text_dim, config.text_layers, config.heads, config.head_dim, config.ffn_dim,
             config.freq_dim)
    patch = transformer.config.patch_size[1]
    if found != asked or config.layers < transformer.config.num_layers or config.patch < 1 or patch % config.patch:
        raise ValueError(f"{config.init} has (vocabulary, text_dim, text_layers, heads, head_dim, ffn_dim, freq_dim) "
                         f"{found}, {transformer.config.num_layers} layers and patch {patch}, the config asks {asked}, "
                         f"{config.layers} and {config.patch} (more layers grow the base, fewer cannot; a patch "
                         f"that divides the base's refines it, another cannot)")
    if config.layers > transformer.config.num_layers:
        transformer = grow_depth(transformer, config.layers, seed=config.seed + 1)
    if config.patch < patch:
        transformer = refine_patches(transformer, config.patch)
    return text_encoder, transformer


def grow_depth(transformer: WanTransformer3DModel, layers: int, seed: int = 0) -> WanTransformer3DModel:
    """A deeper transformer that computes exactly what `transformer` does: its blocks in their order, spread over
    `layers` slots, and new blocks between them whose three output projections (self-attention, cross-attention,
    feed-forward) are zero, so each starts as the identity on the residual stream (DiT's adaLN-zero idea) while
    the rest of its weights are a fresh initialisation for training to use."""
    old = len(transformer.blocks)
    torch.manual_seed(seed)
    grown = WanTransformer3DModel.from_config({**transformer.config, "num_layers": layers})
    slots = [index * layers // old for index in range(old)]  # distinct and increasing since layers > old
    state = grown.state_dict()
    for key, value in transformer.state_dict().items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            key = f"blocks.{slots[int(index)]}.{rest}"
        state[key] = value
    grown.load_state_dict(state)  # strict: a weight the grown model lacks is an error, not skipped
    with torch.no_grad():
        for slot in sorted(set(range(layers)) - set(slots)):
            block = grown.blocks[slot]
            for projection in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[-1]):
                projection.weight.zero_()
                projection.bias.zero_()
    return grown


def refine_patches(transformer: WanTransformer3DModel, patch: int) -> WanTransformer3DModel:
    """The transformer on a finer token grid (spatial patch `patch`, dividing its own P), started from its weights
    so that training refines a base instead of starting over. A new token reads its patch as the old embedding
    would read that patch enlarged to P x P (each new kernel tap sums the old taps it would cover), so a constant
    latent embeds to exactly the old token; its output likewise averages the old outputs over those taps. Blocks,
    text and time embedders stay as they are. The model first sees each thing k = P / patch times larger in tokens
    (RoPE keeps integer positions), which is what training then adapts to."""
    old = transformer.config.patch_size[1]
    k = old // patch
    refined = WanTransformer3DModel.from_config({**transformer.config, "patch_size": (1, patch, patch)})
    state = transformer.state_dict()
    embed = state["patch_embedding.weight"]  # [dim, channels, 1, P, P], tap u of the old kernel -> u // k
    state["patch_embedding.weight"] = embed.unflatten(4, (patch, k)).unflatten(3, (patch, k)).sum((4, 6))
    out_weight, out_bias = state["proj_out.weight"], state["proj_out.bias"]  # rows ordered (1, P, P, channels)
    state["proj_out.weight"] = out_weight.unflatten(0, (1, patch, k, patch, k, -1)).mean((2, 4)).flatten(0, 3)
    state["proj_out.bias"] = out_bias.unflatten(0, (1, patch, k, patch, k, -1)).mean((2, 4)).flatten()
    refined.load_state_dict(state)
    return refined


def keep_init_record(init: Path, stage: Path) -> None:
    """Copy the continued base's TRAINING.md into the stage folder, headed by a digest of its transformer: export
    often overwrites the very folder this run continued (the shipped base), and a path alone would then name the
    new weights. A resumed run keeps the copy its start took."""
    kept = stage / "continued_TRAINING.md"
    if kept.exists():
        return
    digest = hashlib.sha256((init / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    record = init / "TRAINING.md"
    body = record.read_text().split("\n", 1)[1].strip() if record.exists() else "(it has no TRAINING.md)"
    stage.mkdir(parents=True, exist_ok=True)
    save_text(f"{init}, transformer sha256 {digest[:16]}\n{body}\n", kept)


def adopt_vae(source: Path, vae_folder: Path) -> None:
    """A continued base keeps its own VAE: the latents it was trained on. Copied into the work folder, or, when
    the work folder already has one, the same weights."""
    weights = "diffusion_pytorch_model.safetensors"
    if not vae_folder.exists():
        save_folder(vae_folder, lambda folder: shutil.copytree(source, folder))
    elif (vae_folder / weights).read_bytes() != (source / weights).read_bytes():
        raise ValueError(f"{vae_folder} is not the VAE of {source.parent}, which the transformer was trained on: "
                         "use a new work folder to continue that base")


def encode_prompts(tokenizer, text_encoder: UMT5EncoderModel, prompts: list[str],
                   max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> torch.Tensor:
    """Prompt embeddings as WanPipeline makes them (each prompt's tokens, then zeros up to max_sequence_length),
    without running the encoder over the padding: masked positions do not change the real tokens' outputs."""
    tokens = tokenizer([prompt_clean(p) for p in prompts], padding="longest", truncation=True,
                       max_length=max_sequence_length, return_tensors="pt").to(text_encoder.device)
    hidden = text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    hidden = hidden * tokens.attention_mask[..., None]
    return F.pad(hidden, (0, 0, 0, max_sequence_length - hidden.shape[1]))


def build_cache(work: Path, vae: AutoencoderKLWan, config: T2VConfig,
                workers: int = 1) -> tuple[torch.Tensor, list[str], float]:
    """Normalised latents [N, 16, 17, 8, 8] (on the CPU) and prompts of the first `clips` items of the train split,
    encoded once on the VAE's device, in shards written atomically (an interrupted cache continues at its first
    missing shard), and the seconds the encoding took. `workers` processes render the clips."""
    folder = work / "cache"
    dataset = MiniClipDataset("train", length=config.clips, num_frames=NUM_FRAMES, size=FRAME_SIZE,
                              reference_size=REFERENCE_SIZE, seed=config.seed)
    latents, prompts, seconds = [], [], 0.0
    shards = range(0, config.clips, SHARD_CLIPS)
    for start in tqdm(shards, desc="cache shards", unit="shard"):
        path = folder / f"latents_{start:06d}.safetensors"
        if not path.exists():
            started = time.perf_counter()
            indices = range(start, min(start + SHARD_CLIPS, config.clips))
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=8,
                                                 num_workers=workers)
            shard, shard_prompts = [], []
            for batch in loader:
                shard.append(normalize_latents(vae, encode_frames(vae, batch["video"].to(vae.device))).cpu())
                shard_prompts += batch["prompt"]
            tensors = {"latents": torch.cat(shard).contiguous()}
            metadata = {"prompts": json.dumps(shard_prompts), "seconds": f"{time.perf_counter() - started:.1f}"}
            atomic_write(path, functools.partial(save_file, tensors, metadata=metadata))
            logger.info("cache: wrote %s", path.name)
        with safe_open(str(path), "pt") as file:
            latents.append(file.get_tensor("latents"))
            prompts += json.loads(file.metadata()["prompts"])
            seconds += float(file.metadata()["seconds"])
    return torch.cat(latents), prompts, seconds


def flow_matching_batch(latents: torch.Tensor, prompts: list[str], generator: torch.Generator, config: T2VConfig,
                        images: int = 0):
    """(noisy latents, timesteps, velocity targets, prompts) of one training step: config.batch clips, or with
    `images`, that many single frames of random clips (the VAE is frame-wise: a clip's latent frame is the latent of
    that frame as an image), each with its clip's prompt."""
    batch = images or config.batch
    index = torch.randint(len(latents), (batch,), generator=generator)
    x0 = latents[index]
    if images:
        frame = torch.randint(latents.shape[2], (batch,), generator=generator)
        x0 = x0[torch.arange(batch), :, frame][:, :, None]
    u = torch.rand(batch, generator=generator)
    sigma = config.shift * u / (1 + (config.shift - 1) * u)
    noise = torch.randn(x0.shape, generator=generator)
    s = sigma.view(-1, 1, 1, 1, 1)
    # Dropped prompts become the empty prompt or Wan's negative prompt (all <unk> here), the two texts the
    # unconditional branch of guidance sees at sampling time.
    drop = torch.rand(batch, generator=generator) < config.prompt_dropout
    other = torch.rand(batch, generator=generator) < 0.5
    texts = [("" if o else WAN_NEGATIVE_PROMPT) if d else prompts[i] for i, d, o in
             zip(index.tolist(), drop.tolist(), other.tolist())]
    return (1 - s) * x0 + s * noise, 1000 * sigma, noise - x0, texts


def motion_error(velocity: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the predicted clean clip's frame-to-frame change. The clean latents' change between
    frames carries ~4% of their power, so the plain loss barely sees whether a prediction moves; this term weighs
    the motion on its own. The clean-latent error is sigma times the velocity error (x0 = x_t - sigma v)."""
    error = (timesteps / 1000).view(-1, 1, 1, 1, 1) * (velocity - target)
    return F.mse_loss(error[:, :, 1:], error[:, :, :-1])


def t2v_loss(transformer, text_encoder, tokenizer, latents, prompts, generator, config: T2VConfig) -> dict:
    """{"loss": the sum of the parts, "clips": the clips' loss[, "motion": their weighted motion_error][, "images":
    the single frames' loss]}. The batches are drawn on the CPU (the same on every device), the step runs on the
    transformer's device."""

    def predict(images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        noisy, timesteps, target, texts = flow_matching_batch(latents, prompts, generator, config, images)
        device = transformer.device
        noisy, timesteps, target = noisy.to(device), timesteps.to(device), target.to(device)
        embeds = encode_prompts(tokenizer, text_encoder, texts)
        return transformer(noisy, timesteps, embeds, return_dict=False)[0], target, timesteps

    velocity, target, timesteps = predict(0)
    parts = {"clips": F.mse_loss(velocity, target)}
    if config.motion_loss:
        parts["motion"] = config.motion_loss * motion_error(velocity, target, timesteps)
    if config.image_batch:
        velocity, target, _ = predict(config.image_batch)
        parts["images"] = F.mse_loss(velocity, target)
    return {"loss": sum(parts.values()), **parts}


def train_t2v(work: Path, config: T2VConfig, device="cpu", workers: int = 1) -> Path:
    stage = work / "t2v"
    final = stage / "final"
    if final.exists():
        logger.info("stage t2v: already done (%s)", final)
        return final
    vae_folder = work / "vae" / "final"
    if config.init:
        adopt_vae(Path(config.init) / "vae", vae_folder)
        keep_init_record(Path(config.init), stage)
    if not vae_folder.exists():
        raise FileNotFoundError(f"no trained VAE in {vae_folder}: run the vae stage first")
    tokenizer = mini_tokenizer()
    text_encoder, transformer = (trained_t2v(config, len(tokenizer)) if config.init else
                                 (build_text_encoder(config, len(tokenizer)), build_transformer(config)))
    text_encoder, transformer = text_encoder.train().to(device), transformer.train().to(device)

    vae = AutoencoderKLWan.from_pretrained(vae_folder).eval().to(device)
    latents, prompts, cache_seconds = build_cache(work, vae, config, workers)
    del vae
    logger.info("cache: %d clips, latents %s, encoded in %.0f s", len(latents), tuple(latents.shape[1:]),
                cache_seconds)
    parameters = [*text_encoder.parameters(), *transformer.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_schedule(config.warmup, config.steps, config.min_lr))

    ema = EMAModel(parameters, decay=config.ema) if config.ema else None

    def step(s: int, _) -> dict:
        generator = step_generator(config.seed, s)
        losses = t2v_loss(transformer, text_encoder, tokenizer, latents, prompts, generator, config)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        schedule.step()
        if ema:
            ema.step(parameters)
        return {**{name: value.item() for name, value in losses.items()}, "grad_norm": grad_norm.item()}

    def batches(sampler):  # the batch is drawn inside the step, from the cache
        return sampler

    models = {"text_encoder": text_encoder, "transformer": transformer, **({"ema": ema} if ema else {})}
    history = run_steps(stage, config, models, optimizer, schedule, step, batches)
    if ema:  # the last step's weights stay in the stage's checkpoint.pt
        ema.copy_to(parameters)

    def write(folder):
        tokenizer.save_pretrained(Path(folder) / "tokenizer")
        text_encoder.eval().save_pretrained(Path(folder) / "text_encoder")
        transformer.eval().save_pretrained(Path(folder) / "transformer")

    save_folder(final, write)
    metrics = {"config": asdict(config), "cache_seconds": round(cache_seconds, 1), **history}
    save_text(json.dumps(metrics, indent=2), stage / "metrics.json")
    logger.info("stage t2v: done, final loss %.4f", history["final_loss"])
    return final


# ---------------------------------------------------------------------------------------------------------------
# The training loop both stages share: resumable, logged, with progress.


def run_steps(stage: Path, config, models: dict, optimizer, schedule, step, batches, evaluate=None) -> dict:
    """Run step(s, batch) for the stage's remaining steps; checkpoint every config.checkpoint_every steps.

    `batches(sampler)` gives the iterable of batches for the remaining step indices (sampler).
    Returns the loss curve (mean loss per checkpoint interval), the final loss and the wall time.
    """
    checkpoint = stage / "checkpoint.pt"
    start, elapsed, curve = 0, 0.0, []
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True, map_location="cpu")
        if state["config"] != asdict(config):
            raise ValueError(f"{checkpoint} was written with another config: {state['config']}; "
                             f"delete {stage} to start this stage over")
        for name, model in models.items():
            model.load_state_dict(state[name])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, elapsed, curve = state["step"], state["elapsed"], state["curve"]
        logger.info("%s: resuming at step %d of %d", stage.name, start, config.steps)
    else:
        logger.info("%s: starting, config %s", stage.name, json.dumps(asdict(config)))

    interval, begun = [], time.perf_counter() - elapsed
    progress = tqdm(zip(range(start, config.steps), batches(range(start, config.steps))), desc=stage.name,
                    initial=start, total=config.steps, unit="step", dynamic_ncols=True, mininterval=2.0)
    for s, batch in progress:
        clock = time.perf_counter()
        values = step(s, batch)
        interval.append(values["loss"])
        progress.set_postfix(loss=f"{values['loss']:.4f}", s_per_step=f"{time.perf_counter() - clock:.2f}")
        done = s + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            extra = evaluate() if evaluate is not None else {}
            curve.append({"step": done, "loss": float(np.mean(interval)), **extra})
            interval = []
            logger.info("%s step %d/%d: %s, lr %.2e, %.0f s", stage.name, done, config.steps,
                        json.dumps({k: round(v, 4) for k, v in {**values, **curve[-1]}.items()}),
                        schedule.get_last_lr()[0], time.perf_counter() - begun)
            state = {"config": asdict(config), "step": done, "elapsed": time.perf_counter() - begun,
                     "curve": curve, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     **{name: model.state_dict() for name, model in models.items()}}
            atomic_write(checkpoint, functools.partial(torch.save, state))
    progress.close()
    return {"curve": curve, "final_loss": curve[-1]["loss"], "seconds": round(time.perf_counter() - begun, 1)}


def save_folder(folder: Path, write) -> None:
    """write(temporary folder), then move it to `folder`: a folder is complete or absent."""
    temporary = folder.with_name(folder.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    write(temporary)
    shutil.rmtree(folder, ignore_errors=True)
    temporary.rename(folder)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline: evaluation and export.


def assemble_pipeline(work: Path) -> StandInPipeline:
    vae_folder, t2v_folder = work / "vae" / "final", work / "t2v" / "final"
    for folder in (vae_folder, t2v_folder):
        if not folder.exists():
            raise FileNotFoundError(f"{folder} is missing: run the vae and t2v stages first")
    from transformers import PreTrainedTokenizerFast

    pipe = StandInPipeline(
        tokenizer=PreTrainedTokenizerFast.from_pretrained(t2v_folder / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(t2v_folder / "text_encoder").eval(),
        vae=AutoencoderKLWan.from_pretrained(vae_folder).eval(),
        transformer=WanTransformer3DModel.from_pretrained(t2v_folder / "transformer").eval(),
        scheduler=standin_scheduler(MINI_SHIFT), reference_size=REFERENCE_SIZE, sampler_shift=MINI_SHIFT,
        default_height=FRAME_SIZE[0], default_width=FRAME_SIZE[1], default_num_frames=NUM_FRAMES,
        default_fps=MINI_FPS, preprocess_reference=False, default_reference_guidance=MINI_REFERENCE_GUIDANCE,
        default_guidance_scale=MINI_GUIDANCE,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluation_prompts(count: int) -> list[tuple[int, str, str]]:
    """(identity, prompt, prompt split) of held-out identities, alternating train and held-out combinations."""
    cases = []
    for k in range(count):
        identity_id, split = split_identity("test", k), ("train", "test")[k % 2]
        cases.append((identity_id, str(sample_prompt(k, world.identity(identity_id), split)), split))
    return cases


def evaluate_pipeline(work: Path, count: int = 24, steps: int = 20, guidance: float = MINI_GUIDANCE) -> dict:
    """Generate `count` clips without reference; write a contact sheet (generated clip above the mini world's own
    clip of the same prompt) and, when the mini face model is trained, how often each follows its prompt."""
    from PIL import Image, ImageDraw

    from standin_mini.identity import DEFAULT_WEIGHTS, check_prompt

    pipe = assemble_pipeline(work)
    rows, results, started = [], [], time.perf_counter()
    for k, (identity_id, prompt, split) in enumerate(tqdm(evaluation_prompts(count), desc="evaluate", unit="clip")):
        video = pipe(prompt, height=FRAME_SIZE[0], width=FRAME_SIZE[1], num_frames=NUM_FRAMES,
                     num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(k))
        generated = (video.frames[0] * 255).round().astype(np.uint8)
        real = make_clip(identity_id, prompt, NUM_FRAMES, FRAME_SIZE, seed=k).frames
        results.append({"prompt": prompt, "split": split, "generated": generated, "real": real})
        label = Image.new("RGB", (FRAME_SIZE[1] * 9, 12), "white")
        ImageDraw.Draw(label).text((2, 0), f"{k}: {prompt} ({split} combination)", fill="black")
        rows += [np.asarray(label), np.concatenate(list(generated[::2]), 1), np.concatenate(list(real[::2]), 1)]
    seconds = time.perf_counter() - started
    (work / "eval").mkdir(parents=True, exist_ok=True)
    save_image(Image.fromarray(np.concatenate(rows, 0)), work / "eval" / "samples.png")

    metrics = {"clips": count, "steps": steps, "guidance": guidance, "seconds_per_clip": round(seconds / count, 2)}
    if DEFAULT_WEIGHTS.exists():
        for kind in ("generated", "real"):
            checks = [(r["split"], check_prompt(r[kind], r["prompt"])) for r in results]
            for split in ("train", "test", "all"):
                chosen = [c for s, c in checks if split in ("all", s)]
                metrics[f"{kind}_{split}"] = {key: round(float(np.mean([c[key] for c in chosen])), 3)
                                              for key in ("action_ok", "place_ok", "time_ok", "who_ok")}
    else:
        metrics["prompt_checks"] = f"skipped: the mini face model ({DEFAULT_WEIGHTS}) is not trained yet"
    save_text(json.dumps(metrics, indent=2), work / "eval" / "metrics.json")
    logger.info("evaluate: %s", json.dumps(metrics))
    return metrics


def _markdown(title: str, metrics: dict) -> list[str]:
    """A stage's metrics as markdown: the summary as JSON, the curve (one row per checkpoint) as a table."""
    curve = metrics.pop("curve", [])
    lines = [f"## {title}", "", "```json", json.dumps(metrics, indent=1), "```", ""]
    if curve:
        keys = list(curve[0])
        lines += ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
        lines += ["| " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |" for row in curve] + [""]
    return lines


def _continued_record(work: Path) -> list[str]:
    """A continued base's record ends with the record of the base it continued (its VAE and earlier steps), one
    heading level down, so the exported folder tells its whole training."""
    kept = work / "t2v" / "continued_TRAINING.md"
    if not kept.exists():
        return []
    source, body = kept.read_text().split("\n", 1)
    body = re.sub(r"^(#+) ", r"\1# ", body, flags=re.MULTILINE)
    return [f"## The base this run continued ({source})", "", body.strip(), ""]


def export(work: Path, out: Path) -> Path:
    """Save the trained pipeline as a diffusers folder (safetensors) with TRAINING.md beside its configs."""
    pipe = assemble_pipeline(work)
    assert past_taps_are_zero(pipe.vae)
    save_folder(out, lambda folder: pipe.save_pretrained(folder, safe_serialization=True))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    lines = ["# Mini base model: training record", "",
             ("Wan's own classes at tiny sizes, trained from scratch on a CPU on the mini world by "
              "`mini/standin_mini/train_base.py` (stages `vae`, `t2v`, `evaluate`, `export`; its docstring has the "
              "commands). This file is written by the `export` stage."), "",
             "Parameters: " + ", ".join(f"{name} {sum(p.numel() for p in getattr(pipe, name).parameters()):,}"
                                        for name in ("vae", "text_encoder", "transformer"))
             + f"; folder size {size / 2**20:.1f} MiB.", ""]
    for name, title in (("vae", "Stage 1: frame-wise VAE"), ("t2v", "Stage 2: text encoder + transformer"),
                        ("eval", "Generated clips without reference (prompt checks by the mini face model)")):
        path = work / name / "metrics.json"
        if path.exists():
            lines += _markdown(title, json.loads(path.read_text()))
    lines += _continued_record(work)
    save_text("\n".join(lines), out / "TRAINING.md")
    logger.info("export: %s (%.1f MiB)", out, size / 2**20)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Command line.


def _config(cls, args):
    """cls's defaults with --set key=value overrides."""
    values = {}
    types = {f.name: type(f.default) for f in fields(cls)}
    for item in args.set or []:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"unknown {cls.__name__} field {key!r}; fields: {sorted(types)}")
        values[key] = tuple(int(v) for v in value.split(",")) if types[key] is tuple else types[key](value)
    return cls(**values)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "t2v", "evaluate", "export"])
    parser.add_argument("--work", type=Path, required=True, help="work folder (checkpoints, cache, logs)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "weights" / "base",
                        help="export: the pipeline folder to write")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--device", default="cpu", help="t2v: where the text encoder and transformer train (cuda: "
                        "minutes instead of an hour; the result differs from the CPU run only by float rounding)")
    parser.add_argument("--workers", type=int, default=1, help="t2v: processes rendering clips for the cache")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, all cores; 1 when other work shares the CPU)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(args.work / f"{args.stage}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler, logging.StreamHandler()])
    if args.stage == "vae":
        train_vae(args.work, _config(VaeConfig, args))
    elif args.stage == "t2v":
        train_t2v(args.work, _config(T2VConfig, args), args.device, args.workers)
    elif args.stage == "evaluate":
        evaluate_pipeline(args.work)
    else:
        export(args.work, args.out)


if __name__ == "__main__":
    main()
