"""Detector checkpoints as plain data: ``model.safetensors`` (all tensors) + ``mpft.json`` (everything else).

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
from typing import BinaryIO, Union

import open_clip
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbone import Architecture, resolve_architecture
from .config import DetectorConfig
from .detector import MPFTDetector, build_detector
from .transforms import Preprocess

WEIGHTS_FILE = "model.safetensors"
META_FILE = "mpft.json"
FORMAT_NAME = "mpft-detector"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

PathLike = Union[str, os.PathLike]


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


def read_checkpoint_meta(path: PathLike) -> dict:
    """The parsed ``mpft.json`` of a checkpoint directory (or of the directory holding ``model.safetensors``)."""
    directory, _ = _checkpoint_files(Path(path))
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{str(directory)!r} is not an MPFT checkpoint: {META_FILE} is missing")
    return parse_checkpoint_meta(meta_path.read_bytes(), origin=str(meta_path))


def parse_checkpoint_meta(data: bytes, *, origin: str) -> dict:
    """``mpft.json``'s bytes as a dict; ValueError naming ``origin`` if it is not a readable MPFT description."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{origin!r} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{origin!r} is not an MPFT checkpoint description")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"unsupported MPFT checkpoint format version {meta.get('format_version')!r}")
    if not isinstance(meta.get("detector"), dict) or not isinstance(meta.get("preprocess"), dict):
        raise ValueError(f"{origin!r} lacks the detector or preprocess description")
    recorded_real_threshold(meta)  # an inverted band is refused where the file is read, not inside a scoring actor
    return meta


def check_safetensors_layout(handle: BinaryIO, size: int, *, origin: str) -> None:
    """ValueError unless ``handle`` (a seekable binary file of ``size`` bytes) is a whole safetensors file: a valid
    header whose tensors end exactly at the end of the file. Reads only the header, so a remote file can be checked
    without downloading it; a truncated upload or a half-written copy fails here."""
    handle.seek(0)
    head = handle.read(8)
    header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < header_len <= size - 8:
        raise ValueError(f"{origin!r} is not a safetensors file (no valid header; the file has {size} bytes)")
    try:
        header = json.loads(handle.read(header_len))
    except ValueError as err:
        raise ValueError(f"{origin!r} is not a safetensors file (header: {err})") from err
    if not isinstance(header, dict):
        raise ValueError(f"{origin!r} is not a safetensors file (the header is not a JSON object)")
    data_end = max((_tensor_end(entry, origin) for key, entry in header.items() if key != "__metadata__"), default=0)
    if data_end != size - 8 - header_len:
        raise ValueError(f"{origin!r} is truncated or padded: its header describes {data_end} bytes of tensors, "
                         f"the file holds {size - 8 - header_len}")


def _tensor_end(entry, origin: str) -> int:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{origin!r} is not a safetensors file (a tensor entry has no valid data_offsets)")
    return offsets[1]


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu",
                    config: DetectorConfig | None = None) -> MPFTDetector:
    """Rebuild a detector from a checkpoint directory or its ``model.safetensors``; returned in eval mode.

    ``config`` replaces the recorded detector config (masking, dropout, trainable part: a resumed run follows its
    own config); the tower is always the recorded architecture, and ``config`` must name the same one.

    Raises:
        ValueError: for anything that is not safetensors + JSON (e.g. a pickled ``.pt``), a malformed checkpoint, or
            a ``config`` for another architecture.
    """
    directory, weights_path = _checkpoint_files(Path(path))
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


def recorded_real_threshold(meta: dict) -> float:
    """The checkpoint's ``real_threshold``; one written without it (before the uncertain band existed, or with the
    key null) has no band, so it equals ``threshold``. ValueError if it lies above ``threshold``."""
    if not isinstance(meta.get("threshold"), (int, float)):
        raise ValueError(f"inconsistent {META_FILE}: no numeric threshold")
    threshold = float(meta["threshold"])
    if meta.get("real_threshold") is None:
        return threshold
    real_threshold = float(meta["real_threshold"])
    if not real_threshold <= threshold:
        raise ValueError(f"inconsistent {META_FILE}: real_threshold {real_threshold} is above threshold {threshold}")
    return real_threshold


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


def _checkpoint_files(path: Path) -> tuple[Path, Path]:
    """(directory, weights file) for a checkpoint directory or a path to its ``.safetensors`` file."""
    if path.is_dir():
        return path, path / WEIGHTS_FILE
    if path.suffix == ".safetensors":
        return path.parent, path
    raise ValueError(
        f"refusing to load {str(path)!r}: MPFT checkpoints are a directory with {WEIGHTS_FILE} + {META_FILE} "
        "(pickled .pt/.pth/.bin files are never loaded)"
    )


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
