"""Detector checkpoints as plain data: ``model.safetensors`` (all tensors) + ``mpft.json`` (everything else).
Writing and loading a detector need torch and open_clip; reading and checking the files' description does not
(``mpft_core.checkpoint_format``, what drivers use).

Nothing is ever unpickled: a checkpoint from an untrusted bucket can at worst hold wrong numbers, never code.
Loading rebuilds the recorded architecture (activation and vision config included: weights do not carry them) with
random init (no download), then loads the tensors strictly, so a checkpoint restores on a machine without network
access or the original weights, as the same function that was trained.

Format versions: 2 records the ``architecture``. Version 1 did not; its towers were built with QuickGELU when the
recorded open_clip tag or the architecture config named it (OpenAI weights, ``*-quickgelu`` models) and with GELU
otherwise (weight files, random init), and are rebuilt so. ``real_threshold`` (the lower end of the uncertain
band) is optional in both: a checkpoint without it has no band.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import open_clip
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbone import Architecture, resolve_architecture
from .checkpoint_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    PathLike,
    checkpoint_files,
    read_checkpoint_meta,
    recorded_real_threshold,
)
from .config import DetectorConfig
from .detector import MPFTDetector, build_detector
from .transforms import Preprocess


def save_checkpoint(detector: MPFTDetector, directory: PathLike, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``mpft.json`` into ``directory`` (created if needed); returns the directory.

    ``extra`` is any JSON-serialisable run information (metrics, dataset hash, step) stored alongside.
    """
    detector = getattr(detector, "module", detector)  # unwrap DistributedDataParallel: keys without "module."
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        # backbone.pretrained records where training started; the weights themselves are in model.safetensors.
        "detector": detector.config.to_dict(),
        "architecture": detector.architecture.to_dict(),
        "preprocess": detector.preprocess.to_dict(),
        "threshold": detector.threshold,
        "real_threshold": detector.real_threshold,
        "extra": extra or {},
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
    }
    meta_text = json.dumps(meta, indent=2, sort_keys=True)  # fail on unserialisable `extra` before writing anything
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in detector.state_dict().items()}
    # Write-then-rename, so a reader never sees a half-written file (checkpoints are read while training runs).
    _atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT_NAME}))
    _atomic_write(directory / META_FILE, lambda tmp: tmp.write_text(meta_text, encoding="utf-8"))
    return directory


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu",
                    config: DetectorConfig | None = None) -> MPFTDetector:
    """Rebuild a detector from a checkpoint directory or its ``model.safetensors``; returned in eval mode.

    ``config`` replaces the recorded detector config (masking, dropout, trainable part: a resumed run follows its
    own config); the tower is always the recorded architecture, and ``config`` must name the same one.

    Raises:
        ValueError: for anything that is not safetensors + JSON (e.g. a pickled ``.pt``), a malformed checkpoint, or
            a ``config`` for another architecture.
    """
    directory, weights_path = checkpoint_files(Path(path))
    meta = read_checkpoint_meta(directory)
    architecture = recorded_architecture(meta)
    config = _config_for(architecture, config or DetectorConfig.from_dict(meta["detector"]))

    architecture_only = config.model_copy(deep=True)
    architecture_only.backbone.pretrained = None
    detector = build_detector(architecture_only, architecture=architecture)
    detector.load_state_dict(_read_tensors(weights_path), strict=True)

    detector.config = config
    # The recorded preprocessing wins: a random-init rebuild only knows open_clip's defaults, not the tag's.
    detector.preprocess = Preprocess.from_dict(meta["preprocess"])
    detector.threshold = float(meta["threshold"])
    real_threshold = recorded_real_threshold(meta)
    # No band recorded: keep following ``threshold``, so a caller that moves the threshold opens no band by accident.
    detector.real_threshold = None if real_threshold == detector.threshold else real_threshold
    return detector.to(map_location).eval()


def _config_for(architecture: Architecture, config: DetectorConfig) -> DetectorConfig:
    """``config`` with the recorded activation filled in; ValueError if it names another model or activation."""
    backbone = config.backbone
    if backbone.name.replace("/", "-") != architecture.name:
        raise ValueError(f"the checkpoint holds a {architecture.name!r} tower, not {backbone.name!r}")
    if backbone.activation not in (None, architecture.activation):
        raise ValueError(f"the checkpoint's tower uses {architecture.activation}, not {backbone.activation}")
    return config.model_copy(update={"backbone": backbone.model_copy(update={"activation": architecture.activation})})


def recorded_architecture(meta: dict) -> Architecture:
    """The architecture a checkpoint's tower was built with (format 1: what that version's training built)."""
    backbone = DetectorConfig.from_dict(meta["detector"]).backbone
    if "architecture" in meta:
        architecture = Architecture.from_dict(meta["architecture"])
        if architecture.name != backbone.name.replace("/", "-"):
            raise ValueError(f"inconsistent {META_FILE}: the detector names {backbone.name!r} but the recorded "
                             f"architecture is {architecture.name!r}")
        return architecture
    name = backbone.name.replace("/", "-")
    tag_cfg = open_clip.get_pretrained_cfg(name, backbone.pretrained or "")
    quick_gelu = tag_cfg.get("quick_gelu") or (open_clip.get_model_config(name) or {}).get("quick_gelu")
    legacy = backbone.model_copy(update={"pretrained": None, "activation": "quick_gelu" if quick_gelu else "gelu"})
    return resolve_architecture(legacy)


def _read_tensors(weights_path: Path) -> dict[str, torch.Tensor]:
    if not weights_path.is_file():
        raise ValueError(f"checkpoint weights {str(weights_path)!r} are missing")
    try:
        return load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(weights_path)!r} is not a valid safetensors file: {err}") from err


def _atomic_write(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed save (disk full, unserialisable tensor) leaves no hidden half-file
        raise
