"""Videos longer than the model's frame count: overlapping windows, blended where they overlap.

A video of `total` frames no longer than the model's window (81 frames for Wan, 17 for the mini model) goes through
in one piece, padded at the end to the next frame count the VAE accepts (t k + 1, t its temporal factor) by
repeating its last frame. A longer one is cut into windows of exactly the model's frame count, as few as a stride
of about three quarters of a window allows, spread evenly, each starting at a multiple of t, so that every window's
latent frames line up with the latent frames of the whole video: window latent k is whole-video latent
start / t + k. The windows draw their noise from one noise tensor for the whole video, so in an overlap two
windows start from the same noise and nearly the same pasted latents. The last window ends less than t frames
after the video (those frames are padding, the last frame repeated). Decoded windows are blended with linear ramps
across each overlap (two windows' weights sum to one); the padding is cut off at the end.
"""

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class WindowPlan:
    total: int  # frames of the video
    length: int  # frames of every window (t k + 1)
    starts: list  # first frame of each window, multiples of the temporal factor
    temporal: int  # the VAE's temporal factor t

    @property
    def padded(self) -> int:
        """Frames processed: the video, then its last frame repeated up to the end of the last window."""
        return self.starts[-1] + self.length

    def overlap(self, first: int, second: int) -> int:
        """Frames windows `first` and `second` share."""
        return max(0, self.starts[first] + self.length - self.starts[second])

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal + 1

    def latent_slice(self, window: int) -> slice:
        """The latent frames of window `window` within the latents of the whole (padded) video."""
        start = self.starts[window] // self.temporal
        return slice(start, start + self.latent_frames(self.length))

    def weights(self, window: int) -> np.ndarray:
        """[length] blending weights of a window's frames: a linear ramp up across the overlap with the previous
        window, down across the overlap with the next, 1 elsewhere (two windows' weights sum to one)."""
        local = np.arange(self.length, dtype=np.float64)
        weight = np.ones(self.length)
        if window > 0:
            weight = np.minimum(weight, (local + 1) / (self.overlap(window - 1, window) + 1))
        if window < len(self.starts) - 1:
            weight = np.minimum(weight, (self.length - local) / (self.overlap(window, window + 1) + 1))
        return weight


def default_stride(window: int, temporal: int) -> int:
    """About three quarters of the window, a multiple of the temporal factor (81 -> 60, 17 -> 12)."""
    span = window - 1
    overlap = max(temporal, int(round(span / 4 / temporal)) * temporal)
    return max(temporal, span - overlap)


def plan_windows(total: int, window: int, temporal: int, stride: int | None = None) -> WindowPlan:
    """Windows covering `total` frames for a model that makes `window` frames at a time (window = t k + 1)."""
    if total < 1:
        raise ValueError("the video has no frames")
    if window < 1 or (window - 1) % temporal:
        raise ValueError(f"the window must be {temporal}k+1 frames, got {window}")
    if total <= window:
        return WindowPlan(total=total, length=(total - 1 + temporal - 1) // temporal * temporal + 1, starts=[0],
                          temporal=temporal)
    stride = default_stride(window, temporal) if stride is None else stride
    if stride < temporal or stride % temporal or stride >= window:
        raise ValueError(f"the stride must be a multiple of {temporal} below {window}, got {stride}")
    # As few windows as the stride allows, spread evenly; the last one ends less than t frames after the video.
    count = 1 + math.ceil((total - window) / stride)
    last = math.ceil((total - window) / temporal) * temporal
    starts = [k * last // ((count - 1) * temporal) * temporal for k in range(count)]
    return WindowPlan(total=total, length=window, starts=starts, temporal=temporal)


def pad_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """The first `count` frames, the last one repeated when there are fewer."""
    if len(frames) >= count:
        return frames[:count]
    return np.concatenate([frames, np.repeat(frames[-1:], count - len(frames), axis=0)])


def blend(plan: WindowPlan, windows: list) -> np.ndarray:
    """Each window's frames ([length, ...] arrays, floats) placed at its start and blended; [total, ...]."""
    if len(windows) != len(plan.starts):
        raise ValueError(f"{len(windows)} windows for a plan of {len(plan.starts)}")
    shape = np.asarray(windows[0]).shape[1:]
    total = np.zeros((plan.padded, *shape))
    weight = np.zeros(plan.padded)
    for k, (start, frames) in enumerate(zip(plan.starts, windows)):
        w = plan.weights(k)
        total[start:start + plan.length] += w.reshape(-1, *[1] * len(shape)) * np.asarray(frames, dtype=np.float64)
        weight[start:start + plan.length] += w
    return (total / weight.reshape(-1, *[1] * len(shape)))[:plan.total]
