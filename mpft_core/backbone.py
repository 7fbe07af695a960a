"""Backbone factory: an open_clip vision transformer plus the preprocessing it was trained with.

Weights come from one of four sources, chosen by ``BackboneConfig.pretrained``:

* an open_clip pretrained tag such as ``"openai"`` (read from the local Hugging Face cache when offline);
* a local ``.safetensors`` file holding an open_clip CLIP state dict;
* an ``s3://`` URI, turned into a local file by the ``resolve_uri`` callable the pipelines layer supplies
  (this package never talks to object storage itself);
* ``None``: random init (tests, or when a checkpoint's weights are loaded afterwards).

The tiny architectures in ``mpft_core/configs/*.json`` are registered with open_clip so they can be named like any
built-in model. Only the vision tower is kept; the text tower is discarded right after construction.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import open_clip
import torch.nn as nn
from open_clip.transformer import VisionTransformer

from .config import BackboneConfig
from .transforms import Preprocess

SHIPPED_CONFIG_DIR = Path(__file__).parent / "configs"
S3_SCHEME = "s3://"

UriResolver = Callable[[str], "str | os.PathLike[str]"]

_shipped_configs_registered = False


def register_shipped_configs() -> None:
    """Make the JSON architectures in ``mpft_core/configs`` known to open_clip (safe to call repeatedly)."""
    global _shipped_configs_registered
    if not _shipped_configs_registered:
        open_clip.add_model_config(SHIPPED_CONFIG_DIR)
        _shipped_configs_registered = True


def shipped_config_names() -> list[str]:
    """Names of the architectures shipped with this package, e.g. ``["mpft-small-224", "mpft-tiny-224", ...]``."""
    return sorted(p.stem for p in SHIPPED_CONFIG_DIR.glob("*.json"))


def input_size(cfg: BackboneConfig) -> int:
    """Side of the square model input in pixels, read from the architecture config (no model is built).

    The data pipeline crops to this size before any worker has built the model; it equals
    ``create_backbone(cfg)[1].image_size`` because open_clip sizes the preprocessing from the tower.
    """
    register_shipped_configs()
    model_cfg = open_clip.get_model_config(cfg.name.replace("/", "-"))
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {cfg.name!r}; shipped tiny configs: {shipped_config_names()}")
    size = model_cfg["vision_cfg"].get("image_size", 224)
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"{cfg.name!r}: non-square input {size} is not supported")
        size = size[0]
    return int(size)


def create_backbone(
    cfg: BackboneConfig, *, resolve_uri: Optional[UriResolver] = None
) -> tuple[VisionTransformer, Preprocess]:
    """Build the open_clip vision tower named ``cfg.name`` with weights from ``cfg.pretrained``.

    Args:
        cfg: model name (built-in open_clip or shipped tiny config) and weight source.
        resolve_uri: ``uri -> local path``; required only when ``cfg.pretrained`` is an ``s3://`` URI.

    Returns:
        ``(visual, preprocess)``: the vision tower (CPU, fp32) and the image size / normalisation it expects,
        taken from the open_clip model's own preprocess config.

    Raises:
        ValueError: unknown model, unknown tag, missing resolver, non-safetensors file, or a tower without a patch
            grid (TAM needs a ViT).
    """
    register_shipped_configs()
    if cfg.name.replace("/", "-") not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {cfg.name!r}; shipped tiny configs: {shipped_config_names()}")

    weights, tag_cfg = _resolve_weights(cfg, resolve_uri)
    with _random_init_warning_silenced(weights is None):
        model = open_clip.create_model(
            cfg.name,
            pretrained=weights,
            # open_clip only warns when a tag was trained with QuickGELU but the named config uses GELU (e.g.
            # ViT-L-14 + "openai"); the features would silently be off, so follow the tag.
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
        )
    visual = model.visual
    _require_patch_grid(visual, cfg.name)
    # Dropping the CLIP wrapper here releases the text tower once `model` goes out of scope.
    del model
    return visual, _preprocess_of(visual)


@contextmanager
def _random_init_warning_silenced(active: bool):
    """Hide open_clip's "initialized randomly" warning when random init is what the config asked for."""

    def drop_random_init_warning(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()  # open_clip logs through the root logger
    if active:
        root.addFilter(drop_random_init_warning)
    try:
        yield
    finally:
        if active:
            root.removeFilter(drop_random_init_warning)


def _resolve_weights(cfg: BackboneConfig, resolve_uri: Optional[UriResolver]) -> tuple[Optional[str], dict]:
    """Turn ``cfg.pretrained`` into what open_clip accepts (tag or local path) plus the tag's config, if a tag."""
    source = cfg.pretrained
    if source is None:
        return None, {}
    if source.startswith(S3_SCHEME):
        if resolve_uri is None:
            raise ValueError(
                f"backbone weights {source!r} are in object storage, but no resolve_uri callable was given; "
                "pass resolve_uri=<uri -> local path> (the pipelines layer provides one)"
            )
        return _checked_weights_file(Path(resolve_uri(source)), origin=source), {}
    if "://" in source:
        raise ValueError(f"unsupported weights URI {source!r}: only s3:// URIs, local files and open_clip tags work")
    if os.path.exists(source):
        return _checked_weights_file(Path(source), origin=source), {}
    name = cfg.name.replace("/", "-")  # open_clip accepts "ViT-L/14" for "ViT-L-14"
    tag_cfg = open_clip.get_pretrained_cfg(name, source)
    if not tag_cfg:
        raise ValueError(
            f"{source!r} is neither an existing file nor an open_clip pretrained tag of {cfg.name!r}; "
            f"known tags: {open_clip.list_pretrained_tags_by_model(name)}"
        )
    return source, tag_cfg


def _checked_weights_file(path: Path, *, origin: str) -> str:
    # open_clip would torch.load (unpickle) anything that is not .safetensors; this project loads tensors only.
    if not path.is_file():
        raise ValueError(f"backbone weights {origin!r} resolved to {str(path)!r}, which is not a file")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"backbone weights {origin!r} must be a .safetensors file holding an open_clip state dict "
            f"(got {path.name!r}); convert pickled checkpoints with safetensors.torch.save_file first"
        )
    return str(path)


def _require_patch_grid(visual: nn.Module, name: str) -> None:
    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"{name!r} has a {type(visual).__name__} image tower; MPFT needs an open_clip VisionTransformer "
            "because Texture-Aware Masking works on its patch grid"
        )
    if visual.patch_size[0] != visual.patch_size[1] or visual.image_size[0] != visual.image_size[1]:
        raise ValueError(f"{name!r}: only square images and square patches are supported")
    if visual.pool_type not in ("tok", "avg"):
        raise ValueError(f"{name!r}: pool_type {visual.pool_type!r} gives no single image embedding")


def _preprocess_of(visual: VisionTransformer) -> Preprocess:
    pp = open_clip.get_model_preprocess_cfg(visual)
    size = pp.get("size", visual.image_size)
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"non-square preprocess size {size} is not supported")
        size = size[0]
    return Preprocess(
        image_size=int(size),
        mean=tuple(float(v) for v in pp["mean"]),
        std=tuple(float(v) for v in pp["std"]),
    )
