"""The checkpoint's files and their description, readable without torch or open_clip.

A driver that only needs to know what a checkpoint is (a scoring job shipping it to its actors, a training run
checking what its workers wrote) reads ``mpft.json`` and the safetensors header through this module; importing
torch and open_clip to do so would cost a command seconds before its first row (``mpft_core.checkpoint`` builds and
loads detectors).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO, Union

WEIGHTS_FILE = "model.safetensors"
META_FILE = "mpft.json"
FORMAT_NAME = "mpft-detector"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

PathLike = Union[str, os.PathLike]


def read_checkpoint_meta(path: PathLike) -> dict:
    """The parsed ``mpft.json`` of a checkpoint directory (or of the directory holding ``model.safetensors``)."""
    directory, _ = checkpoint_files(Path(path))
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


def recorded_real_threshold(meta: dict) -> float:
    """The checkpoint's ``real_threshold``; one written without it (before the uncertain band existed, or with the
    key null) has no band, so it equals ``threshold``. ValueError if it lies above ``threshold``."""
    if isinstance(meta.get("threshold"), bool) or not isinstance(meta.get("threshold"), (int, float)):
        raise ValueError(f"inconsistent {META_FILE}: threshold {meta.get('threshold')!r} is not a number")
    threshold = float(meta["threshold"])
    if meta.get("real_threshold") is None:
        return threshold
    if isinstance(meta["real_threshold"], bool) or not isinstance(meta["real_threshold"], (int, float)):
        raise ValueError(f"inconsistent {META_FILE}: real_threshold {meta['real_threshold']!r} is not a number")
    real_threshold = float(meta["real_threshold"])
    if not real_threshold <= threshold:
        raise ValueError(f"inconsistent {META_FILE}: real_threshold {real_threshold} is above threshold {threshold}")
    return real_threshold


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


def checkpoint_files(path: Path) -> tuple[Path, Path]:
    """(directory, weights file) for a checkpoint directory or a path to its ``.safetensors`` file."""
    if path.is_dir():
        return path, path / WEIGHTS_FILE
    if path.suffix == ".safetensors":
        return path.parent, path
    raise ValueError(
        f"refusing to load {str(path)!r}: MPFT checkpoints are a directory with {WEIGHTS_FILE} + {META_FILE} "
        "(pickled .pt/.pth/.bin files are never loaded)"
    )
