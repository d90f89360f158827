"""Training Stand-In adapters on a frozen Wan base (docs/method.md; docs/training.md).

Objective (flow matching, as the sampler expects): x_t = (1 - sigma) x0 + sigma * noise, the model regresses
the velocity noise - x0 with a plain MSE, timestep = 1000 * sigma. sigma = shift(u) = s*u / (1 + (s-1)*u) with
s = 5, the sampler's own shift, and u ~ U(0, 1) by default: the sampler visits sigma_i = shift(1 - i/N), i.e.
u uniform, so training sees the noise levels at which the adapter will be used, weighted as sampling visits
them (half of them above sigma 0.83, where layout and identity are decided). `logit_normal` (u = sigmoid(z),
z ~ N(0, 1), as SD3 trains) is the alternative that favours the middle levels.

Wan2.2 (two experts, --expert): a run trains one expert's adapter, on that expert's noise levels only (timestep
at or above the base's boundary for `transformer`, below it for `transformer_2`, as the pipeline switches; see
ExpertRange); the other expert is never loaded. Two runs give the _high / _low pair that the pipeline loads.

Only the reference LoRAs train; the base is frozen bit for bit. One process or many (accelerate: DDP, or
FSDP2 sharding with --fsdp, see parallel.py). What a step computes depends only on the config and the step
(see data.py), so interrupting and resuming a run gives exactly the uninterrupted run's adapter.
"""

import dataclasses
import json
import logging
import shutil
import time
import weakref
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from standin.checkpoint import AdapterFileError, load_adapter, save_adapter
from standin.io import atomic_write, save_text
from standin.models import StandInAdapter, StandInModel
from standin.train import parallel, run_state
from standin.train.config import TrainConfig
from standin.train.data import (
    PreparedDataset,
    PromptEncoder,
    SampleStream,
    StepBatches,
    dataset_fingerprint,
    is_named_dataset,
    named_dataset,
    position_seed,
    vae_latents,
)
from standin.train.validation import (
    encode_case_prompts,
    face_backend,
    run_validation,
    validation_cases,
    validation_clips,
)

logger = logging.getLogger("standin.train")


VALIDATION_LEVELS = 4  # noise levels per clip of an expert run's validation loss


def shifted_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def level_cdf(u: torch.Tensor, sampling: str) -> torch.Tensor:
    """P(U <= u) for the unshifted level U the sampler draws: uniform, or logit-normal (U = sigmoid(z))."""
    return u if sampling == "uniform" else torch.special.ndtr(torch.logit(u))


def level_quantile(p: torch.Tensor, sampling: str) -> torch.Tensor:
    """The inverse of level_cdf."""
    return p if sampling == "uniform" else torch.sigmoid(torch.special.ndtri(p))


class ExpertRange:
    """The noise levels one Wan2.2 expert denoises: timestep t = 1000 sigma with t >= boundary for "high"
    (`transformer`), t < boundary for "low" (`transformer_2`): the pipeline's own test (`t >= boundary`: the
    high-noise expert), equality included.

    sigma(u) turns a draw u of the run's sampler into a draw conditioned on that range, with no extra draws (a
    rejection loop would make a sample's level depend on how many draws it took; here it stays a function of its
    stream position, so resume stays exact). The shift is increasing, so the range is u in [u_b, 1) (high) or
    [0, u_b) (low), u_b = sigma_b / (s - (s-1) sigma_b) the inverse shift of sigma_b = boundary / 1000. With F the
    sampler's CDF of u, F(u) is uniform on [0, 1), so F^-1(F(lo) + F(u) (F(hi) - F(lo))) has exactly the law of u
    given u in [lo, hi): the levels the sampler visits within the expert's range, in the proportions it visits
    them. Rounding cannot cross the boundary: sigmas are clamped to the float32 values on the range's side."""

    def __init__(self, expert: str, boundary: float, shift: float, sampling: str):
        self.expert, self.boundary, self.shift, self.sampling = expert, boundary, shift, sampling
        sigma_b = torch.tensor(boundary / 1000, dtype=torch.float64)
        u_b = sigma_b / (shift - (shift - 1) * sigma_b)
        lo, hi = (u_b, torch.tensor(1.0, dtype=torch.float64)) if expert == "high" else (torch.zeros_like(u_b), u_b)
        self.cdf_range = level_cdf(lo, sampling), level_cdf(hi, sampling)
        # the smallest float32 sigma whose timestep (sigma * 1000 in float32, as the model gets it) is >= boundary
        first, up, down = torch.tensor(boundary / 1000), torch.tensor(2.0), torch.tensor(-1.0)
        while first * 1000 < boundary:
            first = torch.nextafter(first, up)
        while torch.nextafter(first, down) * 1000 >= boundary:
            first = torch.nextafter(first, down)
        self.sigma_bounds = (first.item(), 1.0) if expert == "high" else (0.0, torch.nextafter(first, down).item())

    def sigma(self, u: torch.Tensor) -> torch.Tensor:
        """float32 sigmas of the range from draws u of the sampler."""
        return self.sigma_at(level_cdf(u.double(), self.sampling))

    def sigma_at(self, q: torch.Tensor) -> torch.Tensor:
        """The q-quantiles (q in [0, 1)) of the range's sigmas."""
        low, high = self.cdf_range
        u = level_quantile(low + q.double() * (high - low), self.sampling)
        return shifted_sigma(u, self.shift).float().clamp(*self.sigma_bounds)


class Trainer:
    """Set up from a TrainConfig (resuming the run in config.output if asked), then `train()`."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator | None = None):
        if config.shift is None:  # training sees noise levels in the proportions the base's sampler visits them
            from standin.loading import sampler_shift

            config = dataclasses.replace(config, shift=sampler_shift(config.base))
        self.config = config
        if accelerator is None:
            cuda = torch.cuda.is_available()
            precision = config.mixed_precision or ("bf16" if cuda else "no")
            accelerator = Accelerator(mixed_precision=precision, cpu=not cuda)
        self.accelerator = accelerator
        self.device = accelerator.device
        self.is_main = accelerator.is_main_process
        self.run_dir = Path(config.output)
        self.adapter_path = self.run_dir / run_state.final_adapter_file(config.expert)
        self._check_config()
        self.lock = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # One run per folder: a second `standin train` into it stops here, before it reads or writes anything.
            self.lock = run_state.RunLock(self.run_dir).acquire()
            if self.lock.took_over is not None:
                logger.warning("took over the lock of process %s, which is no longer running (a killed run)",
                               self.lock.took_over.get("pid"))
            weakref.finalize(self, self.lock.release)  # a Trainer dropped without train() frees the folder too
        try:
            global_batch = config.batch_size * accelerator.num_processes * config.grad_accum
            self.defining = self._normalized(config.defining(global_batch))
            self.data_fingerprint = dataset_fingerprint(config.data, config.mini_length)
            self.resumed_from = self._resume_folder()
            state = run_state.read_training_state(self.resumed_from) if self.resumed_from else None
            if state is not None:
                self._check_resumable(state)
            self.start_step = state["step"] if state else 0
            self._load_models()
            self._load_data()
            self._build_optimizer(state)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    # ---- setup ----------------------------------------------------------------------------------------------
    def _check_config(self) -> None:
        c = self.config
        for name in ("steps", "batch_size", "grad_accum", "rank", "checkpoint_every", "keep_checkpoints"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(c, name)}")
        if c.timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"timestep_sampling must be uniform or logit_normal, got {c.timestep_sampling!r}")
        if not c.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {c.max_grad_norm}")
        if c.fsdp and self.accelerator.num_processes < 2:
            raise ValueError("--fsdp shards the model over processes: launch two or more (accelerate launch)")
        if c.expert not in (None, "high", "low"):
            raise ValueError(f"expert must be high or low, got {c.expert!r}")
        from standin.loading import has_two_experts

        two_experts = has_two_experts(c.base)
        if two_experts and c.expert is None:
            raise ValueError("this base has two experts (Wan2.2): train one at a time, each into its own output "
                             "folder, with --expert high (the high-noise `transformer`) or --expert low (the "
                             "low-noise `transformer_2`); see docs/training.md")
        if not two_experts and c.expert is not None:
            raise ValueError(f"--expert {c.expert}: this base has one transformer; --expert is for two-expert "
                             "bases (Wan2.2)")

    def _resume_folder(self) -> Path | None:
        latest = run_state.latest_checkpoint(self.run_dir)
        finished = [name for name in ("report.json", self.adapter_path.name) if (self.run_dir / name).exists()]
        if latest is None and finished:  # a finished run whose checkpoints are gone: a new run would replace it
            raise FileExistsError(f"{self.run_dir} holds a run's {' and '.join(finished)} but no checkpoint to resume "
                                  "from; choose another output folder (or move those files away)")
        if latest is not None and not self.config.resume:
            raise FileExistsError(f"{self.run_dir} already holds a run (checkpoint {latest.name}); pass --resume to "
                                  "continue it, or choose another output folder")
        return latest if self.config.resume else None

    @staticmethod
    def _normalized(defining: dict) -> dict:
        """base and data as absolute resolved paths where they are local folders (not hub ids or dataset names),
        so that the same folder given relative or absolute, or through a link, is the same setting."""
        normalized = dict(defining)
        for key in ("base", "data"):
            value = normalized.get(key)
            if isinstance(value, str) and not (key == "data" and is_named_dataset(value)) and Path(value).exists():
                normalized[key] = str(Path(value).resolve())
        return normalized

    def _check_resumable(self, state: dict) -> None:
        """Refuse a resume that would not continue the checkpoint's run: fewer steps than it has done, other
        settings, other data."""
        c, step, folder = self.config, state["step"], self.resumed_from
        then = state["config"].get("expert")
        if then != c.expert:
            trains = f"the {then}-noise expert of a Wan2.2 base" if then else "a one-transformer base's adapter"
            raise ValueError(f"--resume with --expert {c.expert}: the run in {self.run_dir} trains {trains}; resume it "
                             "with its own --expert, and train another expert in another output folder")
        if c.steps < step:
            raise ValueError(f"--steps {c.steps} is below the step of the checkpoint to resume ({folder}, step "
                             f"{step}): a run cannot be shortened; pass --steps {step} or more, or choose another "
                             "output folder")
        self._check_unchanged(state["config"])
        saved = state.get("data") if isinstance(state.get("data"), dict) else {}
        fingerprint = saved.get("fingerprint")
        then = (fingerprint or {}).get("clips", saved.get("dataset_size"))
        now = self.data_fingerprint["clips"]
        if then is not None and then != now:
            raise ValueError(f"--resume with changed data: {c.data} had {then} clips at {folder.name}, it has {now} "
                             "now; resume with the run's own data, or start a new run in another output folder")
        if fingerprint is not None and fingerprint != self.data_fingerprint:
            raise ValueError(f"--resume with changed data: the manifest or the clip files of {c.data} changed since "
                             f"{folder.name} (same number of clips, {now}, but other contents); resume with the run's "
                             "own data, or start a new run in another output folder")

    def _check_unchanged(self, saved: dict) -> None:
        saved = self._normalized(saved)
        changed = {k: (saved.get(k), v) for k, v in self.defining.items() if saved.get(k) != v}
        if changed:
            raise ValueError("--resume with settings that change what the run computes: "
                             + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))

    def _load_models(self) -> None:
        from standin.loading import load_pipeline

        c = self.config
        dtype = torch.bfloat16 if self.accelerator.mixed_precision == "bf16" else torch.float32
        # Loaded on the CPU and placed piece by piece: a sharded base never has to fit on one GPU whole. For Wan2.2
        # the trained expert alone, as the pipeline's `transformer`.
        self.pipe = load_pipeline(c.base, device="cpu", dtype=dtype, expert=c.expert)
        self.pipe.set_progress_bar_config(disable=True)
        self.expert_range = None
        if c.expert is not None:
            if self.pipe.config.boundary_ratio is None:
                raise ValueError(f"{c.base} has two experts but no boundary_ratio in its model_index.json: which "
                                 "timesteps each expert denoises is unknown")
            boundary = self.pipe.config.boundary_ratio * self.pipe.scheduler.config.num_train_timesteps
            self.expert_range = ExpertRange(c.expert, boundary, c.shift, c.timestep_sampling)
        torch.manual_seed(c.seed)  # the same initial adapter in every process (FSDP does not broadcast it)
        if self.resumed_from is not None:
            try:
                adapter = load_adapter(self.resumed_from / run_state.ADAPTER_FILE, self.pipe.transformer)
            except AdapterFileError as error:
                raise run_state.damaged(self.resumed_from, run_state.ADAPTER_FILE, str(error)) from None
        else:
            adapter = StandInAdapter.for_transformer(self.pipe.transformer, c.rank, attention=c.attention,
                                                     positions=c.positions)
        model = StandInModel(self.pipe.transformer, adapter=adapter).freeze_base()
        if c.gradient_checkpointing:  # diffusers' own: each block is recomputed in backward, reference pass included
            model.transformer.enable_gradient_checkpointing()
        if c.fsdp:
            parallel.shard_model(model, self.device)
            self.wrapped = model
        else:
            model.to(self.device)
            self.wrapped = self.accelerator.prepare(model)  # DistributedDataParallel with several processes
        self.model = model
        self.pipe.set_standin_adapter(model.adapter)  # validation generates with the live adapter
        self.pipe.vae.to(self.device)
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def _load_data(self) -> None:
        c = self.config
        reference_size = self.pipe.config.reference_size
        if is_named_dataset(c.data):  # an installed package's dataset (e.g. "mini"), rendered at the size asked
            dataset = named_dataset(c.data, "train", c.mini_length, c.frames, c.height, c.width, reference_size)
            self.pre_encoded = False
        else:
            dataset = PreparedDataset(c.data, reference_size)
            self.pre_encoded = dataset.encoded_with is not None
            if self.pre_encoded:
                self._check_encoded(dataset.encoded_with)
        # Clip size (of validation videos too) and fps: the dataset's, whatever its source, unless asked otherwise.
        settings = dataset.settings
        frames, height, width = (c.frames or settings["num_frames"], c.height or settings["height"],
                                 c.width or settings["width"])
        self.fps = settings["fps"]
        self.clip_size = (frames, height, width)
        try:  # validation generates at this size: refuse it now, not after hours of training
            self.pipe.check_sizes(height, width, frames)
        except ValueError as error:
            raise ValueError(f"clip size {width}x{height}, {frames} frames (--width/--height/--frames, or the "
                             f"dataset's): {error}") from None
        self.dataset_size = len(dataset)

        # The text encoder runs every step only for pixel data. For pre-encoded data it stays on the CPU, encodes
        # the validation prompts once and is dropped (11 GB for Wan's UMT5-XXL).
        if not self.pre_encoded:
            self.pipe.text_encoder.to(self.device)
        self.prompts = PromptEncoder(self.pipe, self.pipe.text_encoder.device)

        self.batches = StepBatches(c.batch_size, self.accelerator.num_processes, self.accelerator.process_index,
                                   c.grad_accum, self.start_step, c.steps)
        self.loader = torch.utils.data.DataLoader(
            SampleStream(dataset, c.seed), batch_sampler=self.batches, num_workers=c.num_workers,
            pin_memory=self.device.type == "cuda",
        )

        self.val_cases, self.face_backend = [], None
        if c.val_count > 0 and c.expert is not None:
            # The other expert is not in memory to generate videos with: the trained expert's loss on the clips
            # (validation_loss), encoded now, while the text encoder is here.
            clips = validation_clips(c.val_data or c.data, c.val_count, reference_size, self.clip_size)
            self.val_cases = [(clip["prompt"], *(tensor.cpu() for tensor in self.model_inputs(
                torch.utils.data.default_collate([clip])))) for clip in clips]
        elif c.val_count > 0:
            val_data = c.val_data or c.data
            self.val_cases = validation_cases(val_data, c.val_count, reference_size, self.clip_size)
            encode_case_prompts(self.val_cases, self.prompts)
            if self.is_main:
                self.face_backend = face_backend(c.face_backend, val_data)
        if self.pre_encoded:
            self.pipe.register_modules(text_encoder=None)
            self.prompts = None

    def _check_encoded(self, encoded_with: dict) -> None:
        config = self.pipe.transformer.config
        expected = {"latent_channels": config.in_channels, "text_dim": config.text_dim,
                    "reference_size": self.pipe.config.reference_size}
        wrong = {k: (encoded_with.get(k), v) for k, v in expected.items() if encoded_with.get(k) != v}
        if wrong:
            raise ValueError(f"{self.config.data} was pre-encoded with {encoded_with.get('base')}, which does not fit "
                             f"this base ({', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in wrong.items())})")

    def _build_optimizer(self, state: dict | None) -> None:
        c = self.config
        self.optimizer = torch.optim.AdamW(self.trainable, lr=c.lr, weight_decay=c.weight_decay)
        self.lr_scheduler = get_scheduler(c.lr_scheduler, self.optimizer, num_warmup_steps=c.warmup_steps,
                                          num_training_steps=c.steps)
        if state is None:
            return
        try:
            parallel.load_optimizer_state(self.model, self.optimizer, state["optimizer"], sharded=c.fsdp)
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            run_state.restore_rng_states(state["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise run_state.damaged(self.resumed_from, run_state.STATE_FILE,
                                      f"its optimizer, schedule or RNG state does not load: {reason}") from None

    # ---- one step -------------------------------------------------------------------------------------------
    def model_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clean latents x0 in float32, prompt embeddings, reference latents), on the training device."""
        if "latents" in batch:
            return (batch["latents"].to(self.device, torch.float32), batch["prompt_embeds"].to(self.device),
                    batch["reference_latents"].to(self.device))
        latents = vae_latents(self.pipe.vae, batch["video"]).to(self.device, torch.float32)
        return latents, self.prompts(batch["prompt"]).to(self.device), vae_latents(self.pipe.vae, batch["reference"])

    def noise_and_sigma(self, shape, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's noise and noise level from its own generator (data.py: seeded by its stream position)."""
        c = self.config
        noise, u = [], []
        for position in positions:
            generator = torch.Generator().manual_seed(position_seed(c.seed, position))
            draw = torch.rand((), generator=generator)
            if c.timestep_sampling == "logit_normal":
                draw = torch.sigmoid(torch.randn((), generator=generator))
            u.append(draw)
            noise.append(torch.randn(shape, generator=generator))
        u = torch.stack(u)
        sigma = shifted_sigma(u, c.shift) if self.expert_range is None else self.expert_range.sigma(u)
        return torch.stack(noise).to(self.device), sigma.to(self.device)

    def loss(self, batch: dict, backward_scale: float | None = None) -> torch.Tensor:
        """The batch's flow-matching loss; with backward_scale, also backpropagates loss * backward_scale, inside
        the reference stream, where gradient checkpointing recomputes the blocks with their reference."""
        latents, prompt_embeds, reference_latents = self.model_inputs(batch)
        noise, sigma = self.noise_and_sigma(latents.shape[1:], batch["position"].tolist())
        return self.flow_loss(latents, prompt_embeds, reference_latents, noise, sigma, backward_scale)

    def flow_loss(self, latents, prompt_embeds, reference_latents, noise, sigma, backward_scale=None) -> torch.Tensor:
        """The loss at noise levels sigma (see loss); reference_latents None: without the reference (the base's)."""
        s = sigma.view(-1, 1, 1, 1, 1)
        noisy, target = (1 - s) * latents + s * noise, noise - latents
        dtype = self.model.transformer.dtype
        with (nullcontext() if reference_latents is None
              else self.model.reference(reference_latents.to(dtype), latents.shape)):
            with self.accelerator.autocast():
                prediction = self.wrapped(noisy.to(dtype), sigma * 1000, prompt_embeds.to(dtype))[0]
            loss = F.mse_loss(prediction.float(), target)
            if backward_scale is not None:
                self.accelerator.backward(loss * backward_scale)
        return loss

    def train_step(self, batches) -> dict:
        """One optimizer step over grad_accum micro-batches; the loss is the mean over the global batch."""
        c = self.config
        total = torch.zeros((), device=self.device)
        for micro in range(c.grad_accum):
            batch = next(batches)
            # DDP reduces gradients on the last micro-step only; FSDP reduce-scatters every one (sharded sums).
            sync = c.fsdp or micro == c.grad_accum - 1
            with nullcontext() if sync else self.accelerator.no_sync(self.wrapped):
                loss = self.loss(batch, backward_scale=1 / c.grad_accum)
            total += loss.detach()
        grad_norm = self.accelerator.clip_grad_norm_(self.trainable, c.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.accelerator.reduce(total / c.grad_accum, reduction="mean")
        if isinstance(grad_norm, parallel.DTensor):
            grad_norm = grad_norm.full_tensor()
        return {"loss": loss.item(), "grad_norm": float(grad_norm), "lr": lr}

    # ---- checkpoints and validation -------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> None:
        adapter_state = parallel.full_state_dict(self.model.adapter)  # collectives: every process takes part
        optimizer_state = parallel.optimizer_state(self.model, self.optimizer)
        if self.is_main:
            training_state = {
                "step": step, "optimizer": optimizer_state, "lr_scheduler": self.lr_scheduler.state_dict(),
                "rng": run_state.rng_states(), "config": self.defining,
                "data": {"samples_seen": step * self.batches.global_batch, "dataset_size": self.dataset_size,
                         "fingerprint": self.data_fingerprint},
            }
            adapter = self.model.adapter
            metadata = {"base": self.config.base, "data": self.config.data, "attention": adapter.attention,
                        "positions": adapter.positions}
            if self.expert_range is not None:  # which file of the pair this is (the pipeline checks it)
                metadata.update(expert=self.config.expert, boundary=self.expert_range.boundary)
            folder = run_state.write_checkpoint(self.run_dir, step, adapter_state, training_state, metadata,
                                                  self.config.keep_checkpoints)
            if step == self.config.steps:
                save_adapter(adapter_state, self.adapter_path, {**metadata, "step": str(step)})
            logger.info("checkpoint %s", folder)
        self.accelerator.wait_for_everyone()

    def validate(self, step: int) -> list[dict]:
        """Every process generates (a sharded model needs them all); the main process saves and measures."""
        c = self.config
        folder = self.run_dir / "validation" / f"step-{step:07d}" if self.is_main else None
        if self.expert_range is not None:
            results = self.validation_loss()
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                save_text(json.dumps(results, indent=2), folder / "results.json")
        else:
            frames, height, width = self.clip_size
            results = run_validation(self.pipe, self.val_cases, folder, height=height, width=width,
                                     num_frames=frames, steps=c.val_steps, guidance=c.val_guidance, seed=c.seed,
                                     fps=self.fps, backend=self.face_backend)
        if self.is_main:
            logger.info("validation at step %d: %s", step, json.dumps(results))
        self.accelerator.wait_for_everyone()
        return results

    @torch.no_grad()
    def validation_loss(self) -> list[dict]:
        """An expert run's validation: the trained expert's loss on each validation clip at the midpoints of the
        quartiles of its noise levels, with fixed noise (so steps compare), with the reference and without it
        (the frozen base's loss, which a useful adapter lowers). No video: it would need the other expert."""
        sigmas = self.expert_range.sigma_at((torch.arange(VALIDATION_LEVELS) + 0.5) / VALIDATION_LEVELS)
        results = []
        for number, (prompt, latents, prompt_embeds, reference_latents) in enumerate(self.val_cases):
            generator = torch.Generator().manual_seed(self.config.seed + number)
            latents, prompt_embeds = latents.to(self.device), prompt_embeds.to(self.device)
            with_reference, without = [], []
            for sigma in sigmas:
                noise = torch.randn(latents.shape, generator=generator).to(self.device)
                sigma = sigma[None].to(self.device)
                with_reference.append(self.flow_loss(latents, prompt_embeds, reference_latents.to(self.device), noise,
                                                     sigma).item())
                without.append(self.flow_loss(latents, prompt_embeds, None, noise, sigma).item())
            results.append({"case": number, "prompt": prompt, "loss": sum(with_reference) / len(with_reference),
                            "loss_without_reference": sum(without) / len(without)})
        return results

    # ---- the run --------------------------------------------------------------------------------------------
    def _metrics_file(self) -> Path:
        """metrics.jsonl, without the records of steps a previous session did after its last checkpoint."""
        path = self.run_dir / "metrics.jsonl"
        kept = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the line a kill cut short
                    continue
                step = record.get("step") if isinstance(record, dict) else None
                if isinstance(step, int) and step <= self.start_step:
                    kept.append(line + "\n")
        save_text("".join(kept), path)
        return path

    def _log_to_file(self) -> logging.Handler:
        handler = logging.FileHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        return handler

    def train(self) -> dict | None:
        """Run to config.steps; the report on the main process, None on the others."""
        c = self.config
        metrics, log_handler = None, self._log_to_file() if self.is_main else None
        try:
            if self.lock is not None and self.lock.took_over is not None:
                logger.warning("took over the run folder's lock %s from process %s (started %s), which is no "
                               "longer running", self.lock.path, self.lock.took_over.get("pid"),
                               self.lock.took_over.get("started", "?"))
            if self.resumed_from is not None:
                logger.info("resumed from %s at step %d", self.resumed_from, self.start_step)
            if self.is_main and self.start_step == c.steps and not self.adapter_path.exists():
                # resumed at exactly its last checkpoint (a shorter target than first planned): the run's adapter
                atomic_write(self.adapter_path, partial(
                    shutil.copyfile, self.resumed_from / run_state.ADAPTER_FILE))
            finished = self._finished_report()
            if finished is not None:
                logger.info("the run is already at step %d of %d: nothing to do; report.json left as it is",
                            self.start_step, c.steps)
                return finished if self.is_main else None
            logger.info("config %s; %d processes, global batch %d, %d clips%s", json.dumps(dataclasses.asdict(c)),
                        self.accelerator.num_processes, self.batches.global_batch, self.dataset_size,
                        " (pre-encoded)" if self.pre_encoded else "")
            metrics = self._metrics_file().open("a") if self.is_main else None
            batches = iter(self.loader)
            bar = tqdm(total=c.steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True,
                       disable=not (self.is_main and c.progress))
            losses, validation, started = [], None, time.perf_counter()
            for step in range(self.start_step, c.steps):
                tick = time.perf_counter()
                record = {"step": step + 1, **self.train_step(batches)}
                record["seconds"] = time.perf_counter() - tick
                losses.append(record["loss"])
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    logger.info("step %(step)d loss %(loss).6f grad_norm %(grad_norm).4f lr %(lr).3g "
                                "%(seconds).3fs", record)
                bar.update()
                bar.set_postfix(loss=f"{record['loss']:.4f}", s_per_step=f"{record['seconds']:.2f}")
                done = step + 1
                if done % c.checkpoint_every == 0 or done == c.steps:
                    self.save_checkpoint(done)
                if self.val_cases and (done == c.steps or (c.validate_every and done % c.validate_every == 0)):
                    validation = self.validate(done)
            bar.close()
            if self.start_step == c.steps and self.val_cases:  # finished, but the report was never written
                validation = self.validate(c.steps)
            seconds = time.perf_counter() - started
            report = self.report(losses, validation, seconds)
            if self.is_main:
                text = json.dumps(report, indent=2)
                save_text(text, self.run_dir / "report.json")
                logger.info("report: %s", text)
            return report if self.is_main else None
        finally:
            if metrics is not None:
                metrics.close()
            if log_handler is not None:
                logger.removeHandler(log_handler)
                log_handler.close()
            if self.lock is not None:
                self.lock.release()

    def _finished_report(self) -> dict | None:
        """The report of a run resumed at its last step, if it has one: it is returned, never rewritten (a
        resume that ran nothing has no losses to report). None when there are steps to run, or no report yet (a
        kill after the last checkpoint, during the final validation: the run then validates and reports)."""
        if self.start_step < self.config.steps:
            return None
        try:
            report = json.loads((self.run_dir / "report.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        return report if isinstance(report, dict) and report.get("steps") == self.config.steps else None

    def report(self, losses: list[float], validation: list[dict] | None, seconds: float) -> dict:
        c, steps = self.config, len(losses)
        tail = losses[-max(1, steps // 10):] if losses else []
        report = {
            "run_dir": str(self.run_dir),
            "adapter": str(self.adapter_path),
            "expert": c.expert,
            "steps": c.steps,
            "resumed_from_step": self.start_step if self.resumed_from else None,
            "processes": self.accelerator.num_processes,
            "global_batch": self.batches.global_batch,
            "samples_seen": c.steps * self.batches.global_batch,
            "dataset_size": self.dataset_size,
            "pre_encoded": self.pre_encoded,
            "trainable_parameters": sum(p.numel() for p in self.trainable),
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "loss_mean_last_10pct": sum(tail) / len(tail) if tail else None,
            "seconds": round(seconds, 2),
            "steps_per_second": round(steps / seconds, 3) if steps else None,
            "validation": validation,
        }
        if torch.cuda.is_available():
            report["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return report


def train(config: TrainConfig, accelerator: Accelerator | None = None) -> dict | None:
    return Trainer(config, accelerator).train()
