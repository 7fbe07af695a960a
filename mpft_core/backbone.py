"""Backbone factory: an open_clip vision transformer plus the preprocessing it was trained with.

Weights come from one of four sources, chosen by ``BackboneConfig.pretrained``:

* an open_clip pretrained tag such as ``"openai"`` (read from the local Hugging Face cache when offline);
* a local ``.safetensors`` file holding an open_clip CLIP state dict;
* an ``s3://`` URI, turned into a local file by the ``resolve_uri`` callable the pipelines layer supplies
  (this package never talks to object storage itself);
* ``None``: random init (tests, or when a checkpoint's weights are loaded afterwards).

The tiny architectures in ``mpft_core/configs/*.json`` are registered with open_clip so they can be named like any
built-in model. Only the vision tower is kept; the text tower is discarded right after construction.

Weights do not say how the network around them was built: the OpenAI CLIP weights were trained with QuickGELU, but
open_clip's plain ``ViT-L-14`` config uses GELU, and an activation has no tensors, so a strict load into the wrong
one succeeds and silently computes a different function. Every tower therefore comes with an ``Architecture``
(activation, embedding width, vision config) resolved once from the weight source and recorded in checkpoints, and
a weight file must say which activation it was trained with (metadata written by ``save_clip_weights``) or be told
(``BackboneConfig.activation``); nothing is guessed.
"""

from __future__ import annotations

import copy
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import open_clip
import torch.nn as nn
from open_clip.transformer import QuickGELU, VisionTransformer
from safetensors import safe_open
from safetensors.torch import save_file

from .config import BackboneConfig
from .transforms import Preprocess

SHIPPED_CONFIG_DIR = Path(__file__).parent / "configs"
S3_SCHEME = "s3://"
ACTIVATIONS = ("gelu", "quick_gelu")
# safetensors metadata key under which a weight file states the activation its weights were trained with
WEIGHTS_ACTIVATION_KEY = "mpft.activation"

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


@dataclass(frozen=True)
class Architecture:
    """What rebuilding a tower needs that its weights do not carry: the open_clip name, the MLP activation, and the
    vision config and embedding width as they were when the tower was built (so a later open_clip release that
    changes a built-in config cannot change a saved model)."""

    name: str
    activation: str  # "gelu" or "quick_gelu"
    embed_dim: int
    vision_cfg: dict

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Architecture":
        if data.get("activation") not in ACTIVATIONS:
            raise ValueError(f"recorded architecture has activation {data.get('activation')!r}; expected {ACTIVATIONS}")
        return cls(name=str(data["name"]), activation=data["activation"], embed_dim=int(data["embed_dim"]),
                   vision_cfg=dict(data["vision_cfg"]))


class Backbone(NamedTuple):
    visual: VisionTransformer
    preprocess: Preprocess
    architecture: Architecture


def create_backbone(
    cfg: BackboneConfig, *, resolve_uri: Optional[UriResolver] = None, architecture: Optional[Architecture] = None
) -> Backbone:
    """Build the open_clip vision tower named ``cfg.name`` with weights from ``cfg.pretrained``.

    Args:
        cfg: model name (built-in open_clip or shipped tiny config), weight source and, where the source does not
            say it, the activation the weights were trained with.
        resolve_uri: ``uri -> local path``; required only when ``cfg.pretrained`` is an ``s3://`` URI.
        architecture: rebuild exactly this recorded architecture (checkpoint reload) instead of resolving one.

    Returns:
        ``(visual, preprocess, architecture)``: the vision tower (CPU, fp32), the image size / normalisation it
        expects (from the open_clip model's own preprocess config), and the architecture it was built with.

    Raises:
        ValueError: unknown model, unknown tag, missing resolver, non-safetensors file, an activation that
            contradicts the weights' own or that nobody states for a weight file, or a tower without a patch grid
            (TAM needs a ViT).
    """
    model, architecture = _create_clip(cfg, resolve_uri, architecture)
    visual = model.visual
    _require_patch_grid(visual, cfg.name)
    # Dropping the CLIP wrapper here releases the text tower once `model` goes out of scope.
    del model
    return Backbone(visual, _preprocess_of(visual), architecture)


def export_clip_weights(cfg: BackboneConfig, path: "str | os.PathLike[str]", *,
                        resolve_uri: Optional[UriResolver] = None) -> Architecture:
    """Write the weights ``cfg`` names (a tag from the local hub cache, or a file) as a ``.safetensors`` weight file
    that states its activation, e.g. the OpenAI ViT-L/14 weights for a cluster without network access."""
    register_shipped_configs()
    model, architecture = _create_clip(cfg, resolve_uri, None)
    save_clip_weights(model, path, architecture.activation)
    return architecture


def _create_clip(cfg: BackboneConfig, resolve_uri: Optional[UriResolver], architecture: Optional[Architecture]):
    """The whole open_clip CLIP model (both towers) for ``cfg``, built with ``architecture`` (resolved if None)."""
    register_shipped_configs()
    if cfg.name.replace("/", "-") not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {cfg.name!r}; shipped tiny configs: {shipped_config_names()}")
    weights, tag_cfg = _resolve_weights(cfg, resolve_uri)
    if architecture is None:
        architecture = resolve_architecture(cfg, weights_file=weights if not tag_cfg else None, tag_cfg=tag_cfg)
    quick_gelu = architecture.activation == "quick_gelu"
    with _random_init_warning_silenced(weights is None):
        model = open_clip.create_model(
            cfg.name,
            pretrained=weights,
            # force_quick_gelu keeps open_clip's tag check quiet; the keyword arguments replace the named config's
            # values, so the tower is built exactly as recorded (GELU included, when a config says QuickGELU).
            force_quick_gelu=quick_gelu,
            quick_gelu=quick_gelu,
            embed_dim=architecture.embed_dim,
            vision_cfg=copy.deepcopy(architecture.vision_cfg),
        )
    built = tower_activation(model.visual)
    if built != architecture.activation:
        raise RuntimeError(f"asked open_clip for {architecture.activation} but {cfg.name!r} was built with {built}")
    return model, architecture


def resolve_architecture(cfg: BackboneConfig, *, weights_file: Optional[str] = None,
                         tag_cfg: Optional[dict] = None) -> Architecture:
    """The architecture to build for ``cfg``: open_clip's config for the name plus the activation the weights need.

    The activation comes from the open_clip tag (``tag_cfg``), from the weight file's metadata (``weights_file``),
    or, for random init, from the architecture config; ``cfg.activation`` may state it and must then agree. A weight
    file that does not state it needs ``cfg.activation``.
    """
    register_shipped_configs()
    model_cfg = open_clip.get_model_config(cfg.name.replace("/", "-"))
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {cfg.name!r}; shipped tiny configs: {shipped_config_names()}")
    if tag_cfg:
        stated, origin = _activation_name(tag_cfg.get("quick_gelu", False)), f"open_clip tag {cfg.pretrained!r}"
    elif weights_file is not None:
        stated, origin = weights_activation(weights_file), f"weight file {cfg.pretrained!r}"
    else:
        stated, origin = None, None
    activation = _agreed_activation(cfg, stated, origin, default=_activation_name(model_cfg.get("quick_gelu", False)))
    return Architecture(name=cfg.name.replace("/", "-"), activation=activation, embed_dim=int(model_cfg["embed_dim"]),
                        vision_cfg=model_cfg["vision_cfg"])


def _agreed_activation(cfg: BackboneConfig, stated: Optional[str], origin: Optional[str], *, default: str) -> str:
    if stated is not None and cfg.activation is not None and stated != cfg.activation:
        raise ValueError(f"backbone.activation is {cfg.activation!r} but the {origin} was trained with {stated!r}; "
                         "remove backbone.activation or correct it")
    if stated is not None:
        return stated
    if cfg.activation is not None:
        return cfg.activation
    if cfg.pretrained is not None:  # a weight file that does not say how it was trained
        raise ValueError(
            f"the weight file {cfg.pretrained!r} does not say which activation its weights were trained with; set "
            "backbone.activation: quick_gelu (OpenAI CLIP weights) or gelu (most LAION/DataComp weights), or write "
            "the file with mpft_core.backbone.save_clip_weights"
        )
    return default


def _activation_name(quick_gelu) -> str:
    return "quick_gelu" if quick_gelu else "gelu"


def tower_activation(visual: nn.Module) -> str:
    """The activation the tower's MLPs actually use ("quick_gelu" or "gelu"), read off the modules."""
    kinds = {"quick_gelu" if isinstance(m, QuickGELU) else "gelu"
             for m in visual.modules() if isinstance(m, (QuickGELU, nn.GELU))}
    if len(kinds) != 1:
        raise ValueError(f"cannot tell the tower's activation: found {sorted(kinds) or 'none'}")
    return kinds.pop()


def weights_activation(path: "str | os.PathLike[str]") -> Optional[str]:
    """The activation a ``.safetensors`` weight file says it was trained with, or None when it does not say."""
    with safe_open(str(path), framework="pt") as f:
        stated = (f.metadata() or {}).get(WEIGHTS_ACTIVATION_KEY)
    if stated is not None and stated not in ACTIVATIONS:
        raise ValueError(f"{str(path)!r} states activation {stated!r}; expected one of {ACTIVATIONS}")
    return stated


def save_clip_weights(model: nn.Module, path: "str | os.PathLike[str]", activation: str) -> None:
    """Write an open_clip CLIP model's full state dict as a ``.safetensors`` weight file that states ``activation``
    (loadable as ``BackboneConfig.pretrained``; e.g. OpenAI weights exported for an offline cluster)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    built = tower_activation(model.visual)
    if built != activation:
        raise ValueError(f"the model's tower uses {built}, not {activation}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={WEIGHTS_ACTIVATION_KEY: activation})


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
