"""Step 3 and 4 of the face swap (docs/swap.md): SDEdit of the pasted video with Stand-In, and background
consistency. StandInSwapPipeline is StandInPipeline (same components, same denoising loop, same reference stream)
with two changes, both through the hooks StandInPipeline already has:

- the sampler's schedule is compressed to start at `strength` (`_set_timesteps`), as the published face-swap
  scheduler does it (DiffSynth's FlowMatchScheduler with sigma_min 0 and one extra step): for N steps the
  unshifted sigmas are strength (1 - i/N), i = 0..N-1, then shifted (s sigma / (1 + (s - 1) sigma)); every step is
  kept, spread over the lower noise range. With strength 0.85 and shift 5 the first sigma is 4.25 / 4.4 = 0.966;
  with strength 1 the schedule is the generation's, to the bit;
- the loop starts from the pasted video's latents x0 noised to that first sigma, (1 - sigma_0) x0 + sigma_0 noise
  (`latents=`), and with background consistency a step-end callback puts (1 - sigma_{i+1}) x0 + sigma_{i+1} noise
  (the same noise) back outside the mask after step i, and x0 itself after the last step.
The latent mask is the pixel mask at latent resolution: a latent cell is inside when any pixel of the frames and
pixels it encodes has mask > 0.5 (the published code samples the mask at the cells' centres, nearest-exact, and
thresholds at 0.75, which can leave a cell of face outside the mask; taking all the cell's pixels cannot).
"""

import inspect

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler

from standin.pipeline import StandInPipeline, normalize_latents, standin_sigmas

DEFAULT_STRENGTH = 0.85  # the published default


def swap_sigmas(num_inference_steps: int, strength: float) -> np.ndarray:
    """Unshifted sigmas of the face-swap sampler: strength (1 - i/N), i = 0..N-1."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return strength * standin_sigmas(num_inference_steps)


def shifted_sigma(sigma: float, shift: float) -> float:
    """The sampler's time shift, s sigma / (1 + (s - 1) sigma) (docs/method.md section 5)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


class StandInSwapPipeline(StandInPipeline):
    _swap_strength: float | None = None

    @classmethod
    def from_standin(cls, pipe: StandInPipeline) -> "StandInSwapPipeline":
        """The swap pipeline over an existing StandInPipeline's components and adapters (nothing copied)."""
        names = [p for p in inspect.signature(StandInPipeline.__init__).parameters if p != "self"]
        components = pipe.components
        settings = {k: pipe.config[k] for k in names if k in pipe.config and k not in components}
        swap = cls(**{k: v for k, v in components.items() if k in names}, **settings)
        swap.adapters = pipe.adapters
        swap.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        return swap

    # ---- schedule -------------------------------------------------------------------------------------------
    def _set_timesteps(self, num_inference_steps: int, device) -> torch.Tensor:
        if self._swap_strength is None:
            return super()._set_timesteps(num_inference_steps, device)
        if not isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError("face swap needs the flow-matching Euler scheduler (standin_scheduler)")
        sigmas = swap_sigmas(num_inference_steps, self._swap_strength)
        self.scheduler.set_timesteps(sigmas=sigmas.tolist(), device=device)
        return self.scheduler.timesteps

    # ---- video and mask at latent resolution ----------------------------------------------------------------
    @torch.no_grad()
    def encode_video(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames [F, H, W, 3] -> normalised latents [1, C, f, h, w] (posterior mean), float32."""
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0
        pixels = pixels.permute(3, 0, 1, 2)[None].to(self.vae.device, self.vae.dtype)
        return normalize_latents(self.vae, self.vae.encode(pixels).latent_dist.mean).float()

    def latent_mask(self, masks: np.ndarray) -> torch.Tensor:
        """Pixel masks [F, H, W] in [0, 1] -> bool [1, 1, f, h, w]: a latent cell is inside when any pixel of the
        frames and the spatial block it encodes (frame 0 alone, then groups of t frames) has mask > 0.5."""
        t, s = self.vae_scale_factor_temporal, self.vae_scale_factor_spatial
        inside = torch.from_numpy(np.asarray(masks) > 0.5).float()[None, None]  # [1, 1, F, H, W]
        first = F.max_pool3d(inside[:, :, :1], (1, s, s))
        rest = F.max_pool3d(inside[:, :, 1:], (t, s, s)) if inside.shape[2] > 1 else first[:, :, :0]
        return torch.cat([first, rest], dim=2) > 0

    # ---- swap -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def swap(self, pasted: np.ndarray, masks: np.ndarray, reference_image, prompt: str = "",
             strength: float = DEFAULT_STRENGTH, keep_background: bool = False, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, num_inference_steps: int = 20, output_type: str = "np",
             **kwargs):
        """Denoise the pasted video (uint8 [F, H, W, 3], F = t k + 1, sides multiples of 16) from `strength` with
        the reference. `noise` ([1, C, f, h, w]; drawn from `generator` when None) is the noise of SDEdit and of
        background consistency. Other keyword arguments go to StandInPipeline.__call__ (guidance_scale,
        negative_prompt, preprocess_reference, ...). Returns the pipeline's output (frames, reference)."""
        if pasted.ndim != 4 or masks.shape != pasted.shape[:3]:
            raise ValueError(f"pasted frames [F, H, W, 3] and masks [F, H, W] expected, got {list(pasted.shape)} "
                             f"and {list(masks.shape)}")
        frames, height, width = pasted.shape[:3]
        self.check_sizes(height, width, frames)
        device = self._execution_device
        original = self.encode_video(pasted).to(device)
        if noise is None:
            noise = torch.randn(original.shape, generator=generator, dtype=torch.float32)
        if tuple(noise.shape) != tuple(original.shape):
            raise ValueError(f"noise must be {list(original.shape)}, got {list(noise.shape)}")
        noise = noise.to(device, torch.float32)
        self._swap_strength = float(strength)
        try:
            self._set_timesteps(num_inference_steps, device)  # __call__ sets the same schedule again
            sigmas = self.scheduler.sigmas.to(device)  # N sigmas, then the terminal 0
            start = (1.0 - sigmas[0]) * original + sigmas[0] * noise
            callback = None
            if keep_background:
                inside = self.latent_mask(masks).to(device)

                def callback(pipe, i, t, tensors):
                    if i + 1 >= num_inference_steps:
                        target = original  # after the last step: the clean original, exactly
                    else:
                        target = (1.0 - sigmas[i + 1]) * original + sigmas[i + 1] * noise
                    return {"latents": torch.where(inside, tensors["latents"], target)}

            return super().__call__(prompt=prompt, reference_image=reference_image, height=height, width=width,
                                    num_frames=frames, num_inference_steps=num_inference_steps, latents=start,
                                    output_type=output_type, callback_on_step_end=callback, **kwargs)
        finally:
            self._swap_strength = None
