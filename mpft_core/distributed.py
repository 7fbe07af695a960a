"""The device- and DDP-sensitive parts of training, as plain ``torch.distributed`` functions.

The Ray Train loop (``pipelines/training.py``) and ``make gpu-check`` (``bench/gpu_check.py``, which runs without
Ray) call these same functions, so what the check proves on a GPU machine holds for the Ray job:

* device: each process trains on the device it is handed (Ray Train's per-worker device), never a bare ``"cuda"``;
* restore order: the detector is on its device *before* the optimizer is built and its state loaded, so the
  optimizer's moments land next to the parameters (loaded while the parameters sat on the CPU, they would stay there
  and the first step after a resume on a GPU fails);
* checkpoints are written from a CPU copy of the unwrapped module's state; the wrapped module is never moved,
  because moving parameters under ``DistributedDataParallel`` loses the gradient hooks it registered on them (from
  the next epoch that rank stops joining the all-reduce: a hang or silently diverging replicas);
* mixed precision: on CUDA a ``GradScaler`` whose state is checkpointed and restored with the optimizer's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .backbone import UriResolver
from .checkpoint import load_checkpoint, save_checkpoint
from .config import MethodConfig
from .detector import MPFTDetector, build_detector
from .optim import make_grad_scaler, make_optimizer, make_scheduler

TRAIN_STATE_FILE = "train_state.pt"


@dataclass
class TrainingSetup:
    """Everything one training process holds. ``model`` is what the step calls (DDP-wrapped when the process group
    has more than one rank); ``detector`` is the plain module inside it (validation, checkpoints)."""

    detector: MPFTDetector
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Optional[torch.amp.GradScaler]
    device: torch.device
    start_epoch: int = 0
    global_step: int = 0
    resumed: bool = False


def setup_training(method: MethodConfig, device: torch.device, *, total_steps: int,
                   resolve_uri: Optional[UriResolver] = None, resume_from: Optional[Path] = None) -> TrainingSetup:
    """Build (or restore from the checkpoint folder ``resume_from``) the detector, optimizer, schedule and scaler on
    ``device``, in the order that keeps every tensor on it, and wrap the detector for data parallelism."""
    device = concrete_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and default CUDA allocations follow the current device
    # A resume rebuilds the recorded architecture and loads its weights (no pretrained download), under this run's
    # detector config (masking, trainable part), which the optimizer below is built from as well.
    detector = (load_checkpoint(resume_from, config=method.detector) if resume_from
                else build_detector(method.detector, resolve_uri=resolve_uri))
    detector.to(device)
    optimizer = make_optimizer(detector, method.optim)
    scheduler = make_scheduler(optimizer, method.optim, total_steps=total_steps)
    scaler = make_grad_scaler(method.optim, device)
    setup = TrainingSetup(detector=detector, model=detector, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                          device=device)
    if resume_from:
        restore_training_state(setup, Path(resume_from))
    setup.model = wrap_data_parallel(detector, device)
    return setup


def concrete_device(device: torch.device | str) -> torch.device:
    """``device`` with its CUDA index filled in (``"cuda"`` means the current device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def wrap_data_parallel(detector: MPFTDetector, device: torch.device) -> nn.Module:
    """The detector in ``DistributedDataParallel`` when the process group has more than one rank, else itself.

    DDP broadcasts rank 0's parameters at construction, so every replica starts from the same weights."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return detector
    if device.type == "cuda":
        return DistributedDataParallel(detector, device_ids=[device.index], output_device=device.index)
    return DistributedDataParallel(detector)


def save_training_checkpoint(setup: TrainingSetup, directory: Path, *, epoch: int,
                             extra: Optional[dict] = None) -> Path:
    """Write the detector (``model.safetensors`` + ``mpft.json``, from a CPU copy of its state: nothing is moved)
    and ``train_state.pt`` (optimizer, schedule, scaler, epoch, step) into ``directory``."""
    directory = Path(directory)
    save_checkpoint(setup.detector, directory,
                    extra={"epoch": epoch, "global_step": setup.global_step, **(extra or {})})
    torch.save({"optimizer": setup.optimizer.state_dict(),
                "scheduler": setup.scheduler.state_dict() if setup.scheduler is not None else None,
                "scaler": setup.scaler.state_dict() if setup.scaler is not None else None,
                "epoch": epoch, "global_step": setup.global_step}, directory / TRAIN_STATE_FILE)
    return directory


def restore_training_state(setup: TrainingSetup, directory: Path) -> None:
    """Load optimizer / schedule / scaler state and the step count; the detector must already be on its device."""
    if setup.detector.device != setup.device:
        raise RuntimeError("move the detector to its device before restoring the optimizer state")
    # Our own file, tensors and plain numbers only: weights_only refuses anything else.
    state = torch.load(directory / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    setup.optimizer.load_state_dict(state["optimizer"])  # moves each state tensor to its parameter's device
    if setup.scheduler is not None and state.get("scheduler") is not None:
        setup.scheduler.load_state_dict(state["scheduler"])
    if setup.scaler is not None and state.get("scaler") is not None:
        setup.scaler.load_state_dict(state["scaler"])
    setup.start_epoch, setup.global_step, setup.resumed = int(state["epoch"]) + 1, int(state["global_step"]), True


def broadcast_from_rank0(obj: dict) -> dict:
    """Rank 0's ``obj`` on every rank (all workers must report identical metrics; only rank 0 computed them)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def parameter_digest(module: nn.Module) -> str:
    """sha256 of every parameter's bytes, in name order: equal digests mean bit-identical replicas."""
    digest = hashlib.sha256()
    for name, param in sorted(getattr(module, "module", module).named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def replica_digests(module: nn.Module) -> list[str]:
    """Every rank's ``parameter_digest`` (a collective: all ranks must call it)."""
    mine = parameter_digest(module)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    gathered: list[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return [str(d) for d in gathered]
