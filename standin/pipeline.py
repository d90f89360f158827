"""StandInPipeline: Wan text-to-video with a reference identity, in diffusers' pipeline idiom.

It is diffusers' WanPipeline (same components, same prompt encoding and latent preparation, loadable with
from_pretrained from any Wan2.1 / Wan2.2 diffusers folder) with its own denoising loop:
- the reference image is preprocessed, VAE-encoded and run through the reference stream ONCE per generation
  (per expert for Wan2.2); every step and both guidance branches reuse its keys and values;
- both guidance branches run as one batch sharing that cache (or one after the other, when memory asks);
- the defaults are the published checkpoints' (docs/method.md, sampling).
"""

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from diffusers.utils import BaseOutput

from standin.checkpoint import load_adapter, read_metadata
from standin.models.adapter import StandInAdapter
from standin.models.reference import install_reference_attention, reference_stream, video_grid

logger = logging.getLogger(__name__)

# Wan's standard negative prompt, which the published Stand-In examples use.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
REFERENCE_SIZE = 512
SAMPLER_SHIFT = 5.0


@dataclass
class StandInPipelineOutput(BaseOutput):
    frames: Any  # np.ndarray [B, F, H, W, 3] in [0, 1], list of PIL frame lists, torch tensor, or latents
    reference: Any  # the reference exactly as the model saw it (after preprocessing): an image, a list for several


def standin_scheduler(shift: float = SAMPLER_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    """Euler flow matching; shift 5 is the sampler of the published checkpoints (docs/method.md, sampling)."""
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def standin_sigmas(num_inference_steps: int) -> np.ndarray:
    """sigma_i = 1 - i/N for i = 0..N-1, before the shift (docs/method.md, sampling)."""
    return 1.0 - np.arange(num_inference_steps) / num_inference_steps


def _latent_statistics(vae, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    config = vae.config
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    return mean, torch.tensor(config.latents_std).view(1, -1, 1, 1, 1).to(latents)


def normalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents -> what the transformer sees: per channel (z - latents_mean) / latents_std (Wan's convention,
    for videos and references alike)."""
    mean, std = _latent_statistics(vae, latents)
    return (latents - mean) / std


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse, written as diffusers' WanPipeline writes it (z / (1 / std) + mean), so videos match it to the bit."""
    mean, std = _latent_statistics(vae, latents)
    return latents / (1.0 / std) + mean


def check_memory(pipe, height: int, width: int, num_frames: int, batch: int = 1) -> None:
    """Refuse, before anything is allocated, a video size the base cannot position or memory cannot hold.

    RoPE: the base's rotary tables have rope_max_seq_len positions per axis, so the token grid
    (latent frames / p_t, height / (s p_h), width / (s p_w)) must fit in them (s: the VAE's spatial factor).

    Memory, in bytes, at the peak of a generation (weights are already loaded, so they are not counted; what is
    compared is what is still available: psutil's available memory on the CPU, free + reserved-unused memory on a
    CUDA device). With b = batch (1 here: one video, guidance branches one after the other, the least any
    generation of this size needs; batched guidance doubles the transformer term), N video tokens, R = the tokens
    of one reference, D = heads x head_dim, Fd = the feed-forward width, e = the transformer's element size:
      latents     4 x b x C x F' x h x w x 4                       (latents, noise, velocity, scheduler step)
      transformer b x (N + R) x (8 D + 2 Fd) x e                   (one block's token activations: input, norm,
                                                                    q, k, v, rotated q/k, attention out, ffn x2)
                  + b x heads x N x (N + R) x 4                    only when the attention backend materialises
                                                                    the scores (diffusers' _native_math; torch's
                                                                    SDPA on CPU and CUDA runs flash/efficient
                                                                    kernels that do not, measured on CPU)
      decode      8 x 3 x F x H x W x 4                            (the whole video in float32: decoder outputs,
                                                                    concatenation, clamping, post-processing)
                  + t x H x W x c x k x e_vae                      (one decoded chunk of t = the VAE's temporal
                                                                    factor frames at full resolution, c = the
                                                                    decoder's full-resolution channels; k = 54 on
                                                                    the CPU, where a 3x3x3 convolution unfolds its
                                                                    input (27 c per pixel, twice), 12 on CUDA)
    peak = latents + max(transformer, decode) when the VAE shares the transformer's device, else each is checked
    on its own device. Measured on the mini model (CPU, float32, guidance batched, b = 2; peak RSS growth of a
    1-step generation minus that of the 64x64 default): 256x256x17 0.33 GiB estimated, 0.34 measured; 128x128x33
    0.11 estimated, 0.16 measured (the decoder's working set is most of it; the estimate is an approximation,
    not a bound)."""
    import psutil

    transformer = pipe._experts()["transformer"]
    config, vae = transformer.config, pipe.vae
    p_t, p_h, p_w = config.patch_size
    spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    latent_frames, latent_h, latent_w = (num_frames - 1) // temporal + 1, height // spatial, width // spatial
    grid = (latent_frames // p_t, latent_h // p_h, latent_w // p_w)
    limit = config.rope_max_seq_len
    if max(grid) > limit:
        raise ValueError(
            f"{width}x{height} with {num_frames} frames is a token grid of {grid[0]} x {grid[1]} x {grid[2]} "
            f"(time x height x width), beyond this base's RoPE table of {limit} positions per axis (rope_max_seq_len): "
            f"at most {limit * spatial * p_h} pixels on a side and {(limit * p_t - 1) * temporal + 1} frames")

    tokens = grid[0] * grid[1] * grid[2]
    reference_side = pipe.config.reference_size // (spatial * p_h)
    reference_tokens = reference_side * reference_side
    heads, dim = config.num_attention_heads, config.num_attention_heads * config.attention_head_dim
    element = torch.finfo(transformer.dtype).bits // 8
    latents = 4 * batch * config.in_channels * latent_frames * latent_h * latent_w * 4
    blocks = batch * (tokens + reference_tokens) * (8 * dim + 2 * config.ffn_dim) * element
    processor = next((m.processor for m in transformer.modules() if hasattr(m, "processor")), None)
    backend = getattr(processor, "_attention_backend", None)
    if backend is None:  # dispatch_attention_fn then runs the globally active backend
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        backend = _AttentionBackendRegistry.get_active_backend()[0]
    if str(getattr(backend, "value", backend)) == "_native_math":
        blocks += batch * heads * tokens * (tokens + reference_tokens) * 4
    decoder_base = getattr(vae.config, "decoder_base_dim", None) or vae.config.base_dim
    full_channels = decoder_base * vae.config.dim_mult[0]
    device = pipe._execution_device
    vae_device = vae.device
    if any(getattr(vae, hook, None) is not None for hook in ("_hf_hook", "_diffusers_hook")):
        vae_device = device  # offloaded: its hooks bring it to the execution device to decode
    per_pixel = 54 if vae_device.type == "cpu" else 12
    decode = (8 * 3 * num_frames * height * width * 4
              + temporal * height * width * full_channels * per_pixel * (torch.finfo(vae.dtype).bits // 8))

    def available(device: torch.device) -> int:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return psutil.virtual_memory().available

    gib = 2**30
    needs = ([(device, latents + max(blocks, decode))] if torch.device(vae_device) == torch.device(device)
             else [(device, latents + blocks), (vae_device, decode)])
    for where, needed in needs:
        if where.type not in ("cpu", "cuda"):
            continue
        free = available(where)
        if needed > free:
            raise ValueError(
                f"{width}x{height} with {num_frames} frames needs about {needed / gib:.2f} GiB at its peak on {where} "
                f"(transformer {blocks / gib:.2f} GiB for {tokens} tokens, VAE decode {decode / gib:.2f} GiB), "
                f"{free / gib:.2f} GiB available: generate a smaller or shorter video")


class StandInPipeline(WanPipeline):
    def __init__(self, tokenizer, text_encoder, vae, scheduler, transformer=None, transformer_2=None,
                 boundary_ratio: float | None = None, expand_timesteps: bool = False,
                 reference_size: int = REFERENCE_SIZE, sampler_shift: float = SAMPLER_SHIFT,
                 default_height: int = 480, default_width: int = 832, default_num_frames: int = 81,
                 default_fps: int = 25, preprocess_reference: bool = True,
                 default_reference_guidance: float = 1.0, default_guidance_scale: float = 5.0):
        super().__init__(tokenizer, text_encoder, vae, scheduler, transformer, transformer_2, boundary_ratio,
                         expand_timesteps)
        # What a base was made for, saved in its model_index.json so that every caller follows the base:
        # sampler_shift, the Euler shift it was trained with (5 for Wan; the mini model, at 272 tokens a clip, a
        # lower one); the video size and playback rate generated when none is asked for (Wan: 832x480, 81
        # frames, 25 fps); whether references are face-cropped first (the mini world draws them cropped); the
        # text and identity guidance used when none is asked for (Wan: 5 and 1, the published sampler; where a
        # base's own measurement on held-out identities found better ones, those: the mini model's are 2 and 4).
        self.register_to_config(reference_size=reference_size, sampler_shift=sampler_shift,
                                default_height=default_height, default_width=default_width,
                                default_num_frames=default_num_frames, default_fps=default_fps,
                                preprocess_reference=preprocess_reference,
                                default_reference_guidance=default_reference_guidance,
                                default_guidance_scale=default_guidance_scale)
        # Stand-In weights, one per expert; not pipeline components, so save_pretrained keeps the base untouched.
        self.adapters: dict[str, StandInAdapter] = {}

    # ---- adapters -------------------------------------------------------------------------------------------
    def _experts(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self, name) for name in ("transformer", "transformer_2") if getattr(self, name, None)}

    def set_standin_adapter(self, adapter: StandInAdapter, expert: str = "transformer") -> None:
        transformer = self._experts().get(expert)
        if transformer is None:
            raise ValueError(f"this pipeline has no {expert}")
        install_reference_attention(transformer)
        self.adapters[expert] = adapter.to(transformer.patch_embedding.weight.device)

    def to(self, *args, **kwargs):
        """Move the pipeline as diffusers does, and each adapter with its expert (adapters stay float32)."""
        super().to(*args, **kwargs)
        for name, adapter in self.adapters.items():
            adapter.to(self._experts()[name].patch_embedding.weight.device)
        return self

    def load_standin_adapter(self, path, path_2=None) -> None:
        """Load the Stand-In adapter file(s): one for Wan2.1; for Wan2.2 the high-noise file (for `transformer`)
        then the low-noise file (for `transformer_2`)."""
        experts = self._experts()
        if len(experts) == 2 and path_2 is None:
            raise ValueError("this Wan2.2 pipeline has two experts: give the *_high and the *_low adapter files")
        if len(experts) == 1 and path_2 is not None:
            raise ValueError("this pipeline has one transformer, but two adapter files were given")
        for expert, file, role in zip(experts, (path, path_2), ("high", "low")):
            adapter = load_adapter(file, experts[expert])
            trained_for = read_metadata(file).get("expert")  # `standin train --expert` records it
            if len(experts) == 2 and trained_for not in (None, role):
                raise ValueError(f"{file} is the {trained_for}-noise expert's adapter, given as the {role}-noise one "
                                 "(the *_high file goes first, then the *_low file)")
            self.set_standin_adapter(adapter, expert)

    # ---- reference ------------------------------------------------------------------------------------------
    def prepare_reference_image(self, image, preprocess: bool = True) -> PIL.Image.Image:
        """The square reference the model sees: preprocessed (face crop, white background) or only squared."""
        from standin.preprocess import load_image, preprocess_reference
        from standin.preprocess.crop import pad_to_square

        size = self.config.reference_size
        if preprocess:
            result = preprocess_reference(image, size=size)
            if result.fallback_reason:
                logger.warning("reference preprocessing: %s", result.fallback_reason)
            return result.image
        image = PIL.Image.fromarray(pad_to_square(np.asarray(load_image(image))).image)
        return image if image.size == (size, size) else image.resize((size, size), PIL.Image.BOX)

    @torch.no_grad()
    def encode_reference_image(self, image: PIL.Image.Image) -> torch.Tensor:
        """Square RGB image -> normalised VAE latent [1, C, 1, h, w] (posterior mean), like video latents."""
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
        pixels = pixels.permute(2, 0, 1)[None, :, None].to(self.vae.device, self.vae.dtype)
        return normalize_latents(self.vae, self.vae.encode(pixels).latent_dist.mean)

    # ---- generation -----------------------------------------------------------------------------------------
    def check_sizes(self, height: int, width: int, num_frames: int, batch: int = 1) -> None:
        multiple = self.vae_scale_factor_spatial * self._experts()["transformer"].config.patch_size[1]
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
        step = self.vae_scale_factor_temporal
        if num_frames < 1 or (num_frames - 1) % step:
            raise ValueError(f"num_frames must be {step}k+1 (e.g. 81, 49, 17), got {num_frames}")
        check_memory(self, height, width, num_frames, batch)

    def _set_timesteps(self, num_inference_steps: int, device) -> torch.Tensor:
        if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            self.scheduler.set_timesteps(sigmas=standin_sigmas(num_inference_steps).tolist(), device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps

    def _velocity(self, model, latents, timestep, prompt_embeds, negative_prompt_embeds, guidance_scale,
                  batch_guidance: bool, attention_kwargs, stream=None, reference_scale: float = 1.0):
        """Guided velocity; both text branches see the reference (through the expert's stream). With
        reference_scale g_ref != 1 a third branch without the reference guides the identity too:
        v = v(noref, uncond) + g_ref (v(ref, uncond) - v(noref, uncond)) + g_text (v(ref, cond) - v(ref, uncond))."""

        def forward(x, embeds, branch):
            # Named as WanPipeline names them, so diffusers' caching hooks (FirstBlockCache, ...) keep one state
            # per branch.
            with model.cache_context(branch):
                t = timestep.expand(x.shape[0])
                return model(x, t, embeds, attention_kwargs=attention_kwargs, return_dict=False)[0]

        if negative_prompt_embeds is None:
            cond = uncond = forward(latents, prompt_embeds, "cond")
            velocity = cond
        else:
            if batch_guidance:
                both = forward(torch.cat([latents, latents]), torch.cat([prompt_embeds, negative_prompt_embeds]),
                               "cond_uncond")
                cond, uncond = both.chunk(2)
            else:
                cond = forward(latents, prompt_embeds, "cond")
                uncond = forward(latents, negative_prompt_embeds, "uncond")
            velocity = uncond + guidance_scale * (cond - uncond)
        if stream is None or reference_scale == 1.0:
            return velocity
        with stream.muted():
            no_reference = forward(latents, prompt_embeds if negative_prompt_embeds is None else negative_prompt_embeds,
                                   "no_reference")
        return velocity + (reference_scale - 1.0) * (uncond - no_reference)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        reference_image=None,
        negative_prompt: str | list[str] | None = WAN_NEGATIVE_PROMPT,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float | None = None,
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        preprocess_reference: bool | None = None,
        cache_reference: bool = True,
        batch_guidance: bool | str = "auto",
        reference_guidance: float | None = None,
        reference_guidance_steps: int | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
    ):
        """Generate a video of the reference identity doing what the prompt says.

        reference_image: PIL image, array or path; a list of them puts several identities in one video (zero-shot,
            the published multi-identity scheme: which person lands where is left to the prompt); None generates
            exactly what the base Wan model would.
        height, width, num_frames, preprocess_reference, guidance_scale: None takes the base's own
            (config.default_height, ..., config.default_guidance_scale: 5 for Wan).
        cache_reference: compute the reference keys/values once (exact); False recomputes them in every forward,
            as the official implementation does (for comparison and benchmarks).
        batch_guidance: run both guidance branches as one batch (True), one after the other (False), or batched
            until the GPU runs out of memory, then sequential ("auto"). All give the same video.
        reference_guidance: g_ref (None: the base's config.default_reference_guidance, 1 for Wan); 1 is the
            published sampler. Above 1, a third branch without the reference (one more forward per step,
            base-model cost) pushes the video towards the identity, as text guidance pushes it towards the prompt
            (see _velocity). reference_guidance_steps: only in the first N steps (None: all),
            where layout and identity are decided.
        """
        config = self.config
        height = config.default_height if height is None else height
        width = config.default_width if width is None else width
        num_frames = config.default_num_frames if num_frames is None else num_frames
        if guidance_scale is None:
            guidance_scale = config.default_guidance_scale
        if preprocess_reference is None:
            preprocess_reference = config.preprocess_reference
        experts = self._experts()
        if "transformer" not in experts:
            raise ValueError("StandInPipeline needs `transformer` (the high-noise expert for Wan2.2)")
        if reference_guidance is None:
            reference_guidance = config.default_reference_guidance
        if not math.isfinite(reference_guidance) or reference_guidance < 0:
            raise ValueError(f"reference_guidance must be a finite number >= 0, got {reference_guidance}")
        if config.expand_timesteps:
            raise NotImplementedError("expand_timesteps (Wan2.2 TI2V-5B's per-token timesteps) is not supported: "
                                      "the published Stand-In adapters are for the 14B models")
        if reference_image is not None and set(self.adapters) != set(experts):
            raise ValueError(
                f"a reference image needs a Stand-In adapter for each expert {sorted(experts)}; "
                f"loaded: {sorted(self.adapters)} (call load_standin_adapter)"
            )
        # The batch the transformer sees: every video, twice where both guidance branches share one forward (with
        # "auto" on a GPU the loop falls back to one branch at a time when memory runs out).
        prompts = (prompt_embeds.shape[0] if prompt_embeds is not None
                   else 1 if isinstance(prompt, str) else len(prompt or []))
        batched = guidance_scale > 1.0 and (batch_guidance is True or (
            batch_guidance == "auto" and self._execution_device.type != "cuda"))
        self.check_sizes(height, width, num_frames, max(1, prompts) * num_videos_per_prompt * (1 + batched))
        self.check_inputs(prompt, negative_prompt if prompt_embeds is None else None, height, width, prompt_embeds,
                          negative_prompt_embeds, callback_on_step_end_tensor_inputs, guidance_scale_2)
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        device = self._execution_device
        if guidance_scale_2 is None:
            guidance_scale_2 = guidance_scale

        # 1. Reference first: a bad image fails before any expensive work.
        reference = None
        if reference_image is not None:
            several = isinstance(reference_image, (list, tuple))
            images = [self.prepare_reference_image(image, preprocess_reference)
                      for image in (reference_image if several else [reference_image])]
            if not images:
                raise ValueError("reference_image is an empty list: give at least one image, or None")
            reference_latents = [self.encode_reference_image(image) for image in images]
            reference = images if several else images[0]

        # 2. Text.
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt if prompt_embeds is None else None, guidance_scale > 1.0, num_videos_per_prompt,
            prompt_embeds, negative_prompt_embeds, max_sequence_length, device,
        )
        transformer_dtype = experts["transformer"].dtype
        prompt_embeds = prompt_embeds.to(transformer_dtype)
        if guidance_scale <= 1.0:
            negative_prompt_embeds = None
        elif negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(transformer_dtype)

        # 3. Noise and timesteps.
        timesteps = self._set_timesteps(num_inference_steps, device)
        latents = self.prepare_latents(
            prompt_embeds.shape[0], experts["transformer"].config.in_channels, height, width, num_frames,
            torch.float32, device, generator, latents,
        )
        grid = video_grid(experts["transformer"], latents.shape)
        boundary = None
        if self.config.boundary_ratio is not None and "transformer_2" in experts:
            boundary = self.config.boundary_ratio * self.scheduler.config.num_train_timesteps

        # 4. One reference stream per expert for this loop: it runs inside the expert's forwards (where offloading
        # hooks bring the weights); with the cache, the expert's first forward records the reference keys and
        # values and later ones reuse them. Vanilla-attention adapters (an ablation) make the reference depend on
        # the video: nothing to cache.
        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)
        streams = {}
        with contextlib.ExitStack() as stack, self.progress_bar(total=len(timesteps)) as progress_bar:
            if reference is not None:
                reference_latents = [latents.to(device) for latents in reference_latents]
                for name, model in experts.items():
                    adapter = self.adapters[name].to(device)
                    cache = cache_reference and adapter.attention == "restricted"
                    streams[model] = stack.enter_context(reference_stream(model, adapter, reference_latents, grid,
                                                                          cache))
            for i, t in enumerate(timesteps):
                if self._interrupt:
                    break
                self._current_timestep = t
                high_noise = boundary is None or t >= boundary
                model = experts["transformer"] if high_noise else experts["transformer_2"]
                scale = guidance_scale if high_noise else guidance_scale_2
                args = (model, latents.to(transformer_dtype), t, prompt_embeds, negative_prompt_embeds, scale)
                in_window = reference_guidance_steps is None or i < reference_guidance_steps
                extra = dict(stream=streams.get(model), reference_scale=reference_guidance if in_window else 1.0)
                if batch_guidance == "auto":
                    try:
                        velocity = self._velocity(*args, True, attention_kwargs, **extra)
                    except torch.cuda.OutOfMemoryError:
                        logger.warning("out of memory with batched guidance; running the branches one by one")
                        torch.cuda.empty_cache()
                        batch_guidance = False
                        velocity = self._velocity(*args, False, attention_kwargs, **extra)
                else:
                    velocity = self._velocity(*args, bool(batch_guidance), attention_kwargs, **extra)
                latents = self.scheduler.step(velocity.float(), t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds,
                               "negative_prompt_embeds": negative_prompt_embeds}
                    callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        self._current_timestep = None

        # 5. Decode.
        if output_type == "latent":
            video = latents
        else:
            latents = denormalize_latents(self.vae, latents.to(self.vae.device, self.vae.dtype))
            video = self.vae.decode(latents, return_dict=False)[0]
            video = self.video_processor.postprocess_video(video, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return video, reference
        return StandInPipelineOutput(frames=video, reference=reference)

