"""Optimiser, learning-rate schedule and one training step for the MPFT detector.

AdamW with two parameter groups (the pre-trained backbone learns slowly, the fresh head fast; docs/METHOD.md), a
per-step schedule, and a ``train_step`` shared by the Ray Train loop and the examples. Mixed precision is used only
on CUDA and only when a ``GradScaler`` is passed (``make_grad_scaler`` returns one when the config asks for AMP).
Every function also accepts the detector wrapped in ``DistributedDataParallel`` (as Ray Train hands it over).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .config import OptimConfig
from .detector import MPFTDetector
from .transforms import Preprocess, normalize


def unwrap(model: torch.nn.Module) -> MPFTDetector:
    """The detector itself, whether or not it is wrapped in (Distributed)DataParallel."""
    return getattr(model, "module", model)


def make_optimizer(detector: MPFTDetector, optim_cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only: group ``backbone`` and group ``head``, each with its own lr."""
    core = unwrap(detector)
    backbone = [p for p in core.visual.parameters() if p.requires_grad]
    head = [p for p in core.head.parameters() if p.requires_grad]
    groups = []
    if backbone:
        backbone_lr = optim_cfg.resolved_backbone_lr(core.config.trainable)
        groups.append({"name": "backbone", "params": backbone, "lr": backbone_lr})
    if head:
        groups.append({"name": "head", "params": head, "lr": optim_cfg.head_lr})
    if not groups:
        raise ValueError("the detector has no trainable parameters")
    return torch.optim.AdamW(groups, weight_decay=optim_cfg.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule over ``total_steps`` optimiser steps.

    ``cosine`` decays every group's lr to 0 at the last step; ``step`` multiplies it by ``step_gamma`` once per
    epoch (``total_steps / epochs`` steps); ``constant`` keeps it.
    """
    total_steps = max(1, int(total_steps))
    if optim_cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
        )
    if optim_cfg.schedule == "step":
        steps_per_epoch = max(1, total_steps // optim_cfg.epochs)
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=steps_per_epoch, gamma=optim_cfg.step_gamma)
    if optim_cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise ValueError(f"unknown schedule {optim_cfg.schedule!r}")


def make_grad_scaler(optim_cfg: OptimConfig, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A GradScaler when AMP is requested and the device is CUDA; None otherwise (full fp32)."""
    if optim_cfg.amp and torch.device(device).type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def train_step(
    detector: MPFTDetector,
    images_uint8_nhwc: torch.Tensor,
    labels: Union[torch.Tensor, Sequence[float]],
    optimizer: torch.optim.Optimizer,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    *,
    preprocess: Optional[Preprocess] = None,
) -> float:
    """One optimiser step on a cropped uint8 ``[N, S, S, 3]`` batch; labels 1 = generated, 0 = real.

    Normalises on the detector's device (with ``preprocess``, default the detector's own), applies TAM (training
    mode), BCE-with-logits loss, backward, step, and advances the scheduler. Returns the batch loss.
    """
    core = unwrap(detector)
    preprocess = preprocess or core.preprocess
    detector.train()
    device = core.device
    x = normalize(images_uint8_nhwc.to(device, non_blocking=True), preprocess.mean, preprocess.std)
    y = torch.as_tensor(labels, dtype=torch.float32).to(device).reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {y.shape[0]} labels")

    use_amp = scaler is not None and device.type == "cuda"
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
        logits = detector(x)  # through the wrapper, so DDP synchronises gradients
    loss = F.binary_cross_entropy_with_logits(logits.float(), y)
    if use_amp:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(loss.detach())
