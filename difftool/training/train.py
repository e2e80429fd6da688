"""The training loop for the pixel-space superres and inpaint models: reproducible and resumable.

Formulation: a denoiser conditioned by channel concatenation predicts the clean sample
(``prediction_type="sample"``) from a noised one. For superres the sample is the residual between the
high-resolution image and the bicubic upsample of its low-resolution version; the network is an
:class:`~difftool.plugins.builtin.srnet.SRNet` (``arch="srnet"``, one scale per run) or, for inpaint
and the first superres model, a diffusers ``UNet2DModel`` (the scale a class label). Few-step sampling
works because the network is trained mostly at the timesteps a 1-, 2- or 4-step "trailing" DDIM
schedule visits; ``one_step_fraction`` of the batch at t=999, where the input residual is pure noise,
trains the 1-step sample to be the best mean estimate (what PSNR rewards).

Checkpoints (``OUT/checkpoint/``) are safetensors plus JSON (never pickle): weights, EMA weights,
optimizer moments, step and random states. A rerun with the same output folder resumes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difftool.core.atomic import atomic_write_bytes
from difftool.core.devices import cpu_supports_bf16
from difftool.plugins.builtin.pixel_model import save_pixel_model, upsample

NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "sample",
    "timestep_spacing": "trailing",
    "clip_sample": False,
}
#: Timesteps that 1-, 2- and 4-step trailing schedules visit; half of the training batch uses them.
FEW_STEP_TIMESTEPS = (999, 749, 499, 249)


@dataclass
class TrainConfig:
    task: str
    steps: int = 6000
    batch: int = 12
    crop: int = 64
    lr: float = 1e-3
    seed: int = 0
    scales: list[int] = field(default_factory=lambda: [2, 4])
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    layers_per_block: int = 1
    inference_steps: int = 2
    #: Inpaint: the model's default ``--texture`` (detail copied into the fill; 0 = smooth).
    inference_texture: float = 0.0
    threads: int = 0
    save_every: int = 200
    ema_decay: float = 0.999
    bf16: bool = True
    #: Share of superres crops degraded by a clean bicubic downscale (the rest: blur, noise, JPEG).
    clean_fraction: float = 0.5
    #: ``classic`` (:func:`degrade_for_superres`) or ``real`` (:func:`degrade_real`: second-order, JPEG 30-95).
    degradation: str = "classic"
    #: ``real`` degradation: shares of its kinds (default :data:`~difftool.training.degrade.REAL_MIX`).
    real_mix: dict[str, float] | None = None
    #: Share of the batch trained at the timesteps few-step sampling visits (the rest: uniform).
    few_step_fraction: float = 0.5
    #: Share of the batch trained at t=999 (the 1-step sample), on top of ``few_step_fraction``.
    one_step_fraction: float = 0.0
    #: ``unet`` (diffusers UNet2DModel), ``srnet`` (superres only, one scale) or ``inpaintnet``.
    arch: str = "unet"
    #: Inpaint: weight of the texture loss (local gradient energy of the fill against the photo's).
    texture_weight: float = 0.0
    #: ``l1`` or ``l2`` (what PSNR measures: the mean of the plausible fills rather than their median).
    loss: str = "l1"
    channels: int = 64
    blocks: int = 16
    init: str | None = None
    folders: list[str] = field(default_factory=list)
    builtin_data: bool = True
    #: ``cpu`` or ``cuda`` (bf16 autocast there whatever the CPU supports; checkpoints stay device-free).
    device: str = "cpu"
    #: Processes making batches ahead (0: in the loop, from one sequential random stream); with workers,
    #: batch ``i`` is a function of ``(seed, i)`` alone (:mod:`difftool.training.loader`).
    workers: int = 0

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> TrainConfig:
        defaults: dict[str, Any] = {}
        if task == "inpaint":
            defaults = {"crop": 96, "batch": 8, "block_out_channels": [32, 64, 128, 128], "inference_steps": 2}
        elif task != "superres":
            raise ValueError(f"unknown training task {task!r}; use superres or inpaint")
        return cls(task=task, **{**defaults, **{k: v for k, v in overrides.items() if v is not None}})

    def __post_init__(self) -> None:
        if self.real_mix is not None:  # checked here, not at the first crop inside a worker
            from difftool.training.degrade import check_mix

            check_mix(self.real_mix)

    @classmethod
    def from_file(cls, path: Path) -> TrainConfig:
        return cls(**json.loads(Path(path).read_text()))


def build_unet(config: TrainConfig) -> torch.nn.Module:
    if config.arch == "srnet":
        from difftool.plugins.builtin.srnet import SRNet

        if config.task != "superres" or len(config.scales) != 1:
            raise ValueError("arch srnet trains a superres model for one scale: set scales to [2] or [4]")
        return SRNet(scale=config.scales[0], channels=config.channels, blocks=config.blocks)
    if config.arch == "inpaintnet":
        from difftool.plugins.builtin.inpaintnet import InpaintNet

        if config.task != "inpaint":
            raise ValueError("arch inpaintnet trains an inpaint model: set task to inpaint")
        dilations = tuple([1, 2, 4, 8] * max(1, config.blocks // 4))
        return InpaintNet(channels=config.channels, fine_channels=config.channels // 2, dilations=dilations)
    from diffusers import UNet2DModel

    levels = len(config.block_out_channels)
    return UNet2DModel(
        in_channels=6 if config.task == "superres" else 7,
        out_channels=3,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=8,
        add_attention=False,
        num_class_embeds=len(config.scales) if config.task == "superres" else None,
    )


def make_batch(config: TrainConfig, pool: Any, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """One batch: ``target`` (clean sample), ``cond`` (concatenated channels), ``weight`` and ``labels``."""
    from difftool.training.degrade import degrade_for_superres, degrade_real, random_mask

    crops = [pool.crop(config.crop, rng) for _ in range(config.batch)]
    hr = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2) * 2 - 1
    if config.task == "superres":
        scale_index = rng.integers(0, len(config.scales), size=config.batch)
        ups, lows = [], []
        for crop, index in zip(crops, scale_index, strict=True):
            scale = config.scales[index]
            if config.degradation == "real":
                low = degrade_real(crop, scale, rng, config.real_mix)
            else:
                low = degrade_for_superres(crop, scale, rng, clean_fraction=config.clean_fraction)
            low = torch.from_numpy(low).permute(2, 0, 1)[None] * 2 - 1
            lows.append(low)
            ups.append(upsample(low, scale))
        up = torch.cat(ups)
        return {"target": hr - up, "cond": up, "labels": torch.from_numpy(scale_index), "weight": torch.ones_like(hr)}
    masks = torch.from_numpy(np.stack([random_mask(config.crop, rng) for _ in crops]))[:, None]
    cond = torch.cat([hr * (1 - masks), masks], dim=1)
    return {"target": hr, "cond": cond, "labels": None, "weight": 0.2 + masks.expand_as(hr)}


class Trainer:
    """Owns the model, EMA, optimizer, random states and checkpoints of one training run."""

    def __init__(self, config: TrainConfig, out: Path) -> None:
        from diffusers import DDIMScheduler

        self.config, self.out = config, Path(out)
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("device cuda: PyTorch sees no CUDA GPU here; set device to cpu")
            torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest kernels once
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.model = build_unet(config)
        if config.arch == "srnet":  # start from the bicubic upsample: a zero residual
            torch.nn.init.zeros_(self.model.tail.weight)
            torch.nn.init.zeros_(self.model.tail.bias)
        if config.init:
            from difftool.plugins.builtin.pixel_model import load_pixel_model

            self.model.load_state_dict(load_pixel_model(Path(config.init), config.task).unet.state_dict())
        # oneDNN's convolutions are about 10% faster on NHWC (measured on this CPU); the UNet's GroupNorm
        # would change its bits, so the other architectures keep their layout
        self.memory_format = torch.channels_last if config.arch == "srnet" else torch.contiguous_format
        self.model = self.model.to(self.device, memory_format=self.memory_format)
        self.ema = build_unet(config).to(self.device)
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=0.0)
        self.alphas = DDIMScheduler.from_config(NOISE_SCHEDULE).alphas_cumprod.float().to(self.device)
        self.rng = np.random.default_rng(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.losses: list[float] = []
        self.autocast = config.bf16 and (self.device.type != "cpu" or cpu_supports_bf16())

    # --- checkpoints --------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def save(self) -> None:
        from safetensors.torch import save

        folder = self.checkpoint_dir
        folder.mkdir(parents=True, exist_ok=True)
        optimizer = self.optimizer.state_dict()
        moments = {
            f"{index}.{key}": value.cpu().contiguous()
            for index, state in optimizer["state"].items()
            for key, value in state.items()
        }
        atomic_write_bytes(folder / "model.safetensors", save(_contiguous(self.model.state_dict())))
        atomic_write_bytes(folder / "ema.safetensors", save(_contiguous(self.ema.state_dict())))
        atomic_write_bytes(folder / "optimizer.safetensors", save({**moments, "generator": self.generator.get_state()}))
        state = {
            "step": self.step,
            "config": asdict(self.config),
            "param_groups": optimizer["param_groups"],
            "numpy_rng": self.rng.bit_generator.state,
            "losses": self.losses[-2000:],
        }
        atomic_write_bytes(folder / "state.json", json.dumps(state, default=int).encode())  # written last

    def resume(self) -> bool:
        from safetensors.torch import load_file

        folder = self.checkpoint_dir
        if not (folder / "state.json").is_file():
            return False
        state = json.loads((folder / "state.json").read_text())
        self.model.load_state_dict(load_file(folder / "model.safetensors"))
        self.ema.load_state_dict(load_file(folder / "ema.safetensors"))
        tensors = load_file(folder / "optimizer.safetensors")
        self.generator.set_state(tensors.pop("generator"))
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
        self.rng.bit_generator.state = state["numpy_rng"]
        self.step = int(state["step"])
        self.losses = list(state.get("losses", []))
        return True

    def export(self, path: Path | None = None, extra_meta: dict[str, Any] | None = None) -> Path:
        """Write the EMA weights as an fp16 model folder (what tasks load)."""
        config = self.config
        meta: dict[str, Any] = {
            "task": config.task,
            "name": f"difftool-{config.task}",
            "target": "residual" if config.task == "superres" else "image",
            "steps": config.inference_steps,
            "scheduler": "ddim",
            "trained_steps": self.step,
            **(extra_meta or {}),
        }
        if config.task == "superres":
            meta["scales"] = list(config.scales)
        if config.arch == "inpaintnet":  # it fills the hole itself: sample from noise, no pre-fill
            meta["fill"] = "noise"
            meta["context"] = 256  # its pyramid fill and global average gain from a wide view
        if config.inference_texture:
            meta["texture"] = config.inference_texture
        model = build_unet(config)
        model.load_state_dict(self.ema.state_dict())
        return save_pixel_model(model, path or self.out / "model", meta, NOISE_SCHEDULE, fp16=True)

    # --- training -----------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        warmup = min(200, self.config.steps // 10 + 1)
        if step < warmup:
            return self.config.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.config.steps - warmup)
        return self.config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def sample_timesteps(self, batch: int) -> torch.Tensor:
        return sample_timesteps(self.config, batch, self.generator)

    def train_step(self, pool: Any, batch: dict[str, Any] | None = None) -> float:
        """One optimizer step on ``batch`` (made ahead: :mod:`~difftool.training.loader`) or on one made here."""
        if batch is None:
            batch = make_batch(self.config, pool, self.rng)
            batch["t"] = self.sample_timesteps(batch["target"].shape[0])
            batch["noise"] = torch.randn(batch["target"].shape, generator=self.generator)
        # noise and timesteps come from CPU generators (reproducible on any device), then travel with the batch
        on = {k: v.to(self.device, non_blocking=True) if v is not None else None for k, v in batch.items()}
        target, t, weight = on["target"], on["t"], on["weight"]
        a = self.alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * target + (1 - a).sqrt() * on["noise"]
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            inputs = torch.cat([noisy, on["cond"]], dim=1).contiguous(memory_format=self.memory_format)
            pred = self.model(inputs, t, class_labels=on["labels"]).sample
        error = pred.float() - target
        error = error.square() if self.config.loss == "l2" else error.abs()
        loss = (error if weight is None else error * weight).mean()  # None: all ones (the loader drops them)
        if self.config.texture_weight:
            loss = loss + self.config.texture_weight * texture_loss(pred.float(), target, on["cond"][:, 3:4])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                e.lerp_(p, 1 - self.config.ema_decay)
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def fit(
        self,
        pool: Any,
        progress: bool = True,
        stop_after: int | None = None,
        deadline: float | None = None,
        on_step: Callable[[Trainer], None] | None = None,
    ) -> None:
        """Train to ``config.steps`` (or ``stop_after`` more steps), checkpointing every ``save_every``.

        ``deadline`` (a ``time.monotonic()`` value): stop after the step that passes it, with a checkpoint
        and an export, as at the end. ``on_step(trainer)`` runs after each step (logging).
        """
        from tqdm import tqdm

        end = self.config.steps if stop_after is None else min(self.config.steps, self.step + stop_after)
        bar = tqdm(total=self.config.steps, initial=self.step, disable=not progress, desc=f"train {self.config.task}")
        stream = None
        if self.config.workers and self.step < end:
            from difftool.training.loader import batches

            stream = batches(self.config, pool, self.step, end, step_batch, pin=self.device.type == "cuda")
        while self.step < end:
            self.train_step(pool, next(stream) if stream is not None else None)
            bar.update(1)
            if on_step is not None:
                on_step(self)
            if self.step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(self.losses[-50:]):.4f}", lr=f"{self.lr_at(self.step):.1e}")
            late = deadline is not None and time.monotonic() >= deadline
            if self.step % self.config.save_every == 0 or self.step == end or late:
                self.save()
                self.export()
            if late:
                break
        del stream  # ends the worker processes
        bar.close()


def sample_timesteps(config: TrainConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Training timesteps: uniform, the few-step schedules' (``few_step_fraction``) and 999 (``one_step_fraction``)."""
    uniform = torch.randint(0, 1000, (batch,), generator=generator)
    few = torch.tensor(FEW_STEP_TIMESTEPS)[torch.randint(0, 4, (batch,), generator=generator)]
    draw = torch.rand(batch, generator=generator)
    picked = torch.where(draw < config.few_step_fraction, few, uniform)
    last = draw >= 1 - config.one_step_fraction
    return torch.where(last, torch.full_like(picked, 999), picked)


def step_batch(config: TrainConfig, pool: Any, step: int) -> dict[str, Any]:
    """Batch ``step`` of a run with workers, from ``(seed, step)`` alone: ``make_batch``'s keys plus the
    timesteps ``t`` and the ``noise`` (from a CPU generator seeded from the same stream); ``weight`` None
    for superres (all ones: not worth moving between processes)."""
    rng = np.random.default_rng([config.seed, step])
    batch = make_batch(config, pool, rng)
    generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
    batch["t"] = sample_timesteps(config, batch["target"].shape[0], generator)
    batch["noise"] = torch.randn(batch["target"].shape, generator=generator)
    if config.task == "superres":
        batch["weight"] = None
    return batch


def local_detail(x: torch.Tensor, window: int = 9) -> torch.Tensor:
    """Local RMS gradient magnitude (B x 1 x H-1 x W-1): how much detail each neighbourhood holds."""
    import torch.nn.functional as F

    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    energy = (dx.square() + dy.square()).mean(dim=1, keepdim=True)
    return F.avg_pool2d(energy, window, stride=1, padding=window // 2, count_include_pad=False).add(1e-6).sqrt()


def texture_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, scales: int = 3) -> torch.Tensor:
    """L1 between the fill's and the photo's local detail inside the mask, at 1, 1/2 and 1/4 resolution.

    A regression loss alone rewards the average of every plausible fill, a smear; this term asks for
    as much detail as the photo has there, without asking where each edge goes. The coarser scales
    stop a pixel-level dither (a checkerboard) from passing for texture.
    """
    import torch.nn.functional as F

    total = pred.new_zeros(())
    for scale in range(scales):
        if scale:
            pred, target, mask = (F.avg_pool2d(x, 2) for x in (pred, target, mask))
        inside = (mask[..., :-1, :-1] > 0.5).to(pred.dtype)
        difference = (local_detail(pred) - local_detail(target)).abs() * inside
        total = total + difference.sum() / inside.sum().clamp_min(1.0)
    return total / scales


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}
