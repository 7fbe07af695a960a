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
import json
import logging
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import open_clip
import torch.nn as nn
from open_clip.model import CLIPVisionCfg
from open_clip.transformer import QuickGELU, VisionTransformer
from safetensors.torch import save_file

from .config import BackboneConfig
from .transforms import Preprocess

SHIPPED_CONFIG_DIR = Path(__file__).parent / "configs"
S3_SCHEME = "s3://"
ACTIVATIONS = ("gelu", "quick_gelu")
# safetensors metadata keys under which a weight file states what its weights do not carry: the activation they
# were trained with, and the input normalisation (a tag's mean/std is otherwise lost when its weights become a file)
WEIGHTS_ACTIVATION_KEY = "mpft.activation"
WEIGHTS_PREPROCESS_KEY = "mpft.preprocess"
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

UriResolver = Callable[[str], "str | os.PathLike[str]"]

log = logging.getLogger(__name__)

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
    embedding width and the complete vision config (every field, defaults included) as they were when the tower was
    built, so a later open_clip release that changes a built-in config or a default cannot change a saved model."""

    name: str
    activation: str  # "gelu" or "quick_gelu"
    embed_dim: int
    vision_cfg: dict

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Architecture:
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
    model, architecture, stated_preprocess = _create_clip(cfg, resolve_uri, architecture)
    visual = model.visual
    # Dropping the CLIP wrapper here releases the text tower once `model` goes out of scope.
    del model
    preprocess = _preprocess_of(visual)
    if stated_preprocess is not None:
        if stated_preprocess.image_size != preprocess.image_size:
            raise ValueError(f"the weight file {cfg.pretrained!r} states input size {stated_preprocess.image_size}, "
                             f"but {cfg.name!r} takes {preprocess.image_size}")
        preprocess = stated_preprocess
    return Backbone(visual, preprocess, architecture)


def export_clip_weights(cfg: BackboneConfig, path: str | os.PathLike[str], *,
                        resolve_uri: Optional[UriResolver] = None) -> Architecture:
    """Write the weights ``cfg`` names (a tag from the local hub cache, or a file) as a ``.safetensors`` weight file
    that states its activation, e.g. the OpenAI ViT-L/14 weights for a cluster without network access."""
    model, architecture, stated_preprocess = _create_clip(cfg, resolve_uri, None)
    save_clip_weights(model, path, architecture.activation, stated_preprocess)
    return architecture


def _create_clip(cfg: BackboneConfig, resolve_uri: Optional[UriResolver], architecture: Optional[Architecture]):
    """(the whole open_clip CLIP model for ``cfg``, built with ``architecture`` (resolved if None), the input
    normalisation its weight file states or None)."""
    register_shipped_configs()
    if cfg.name.replace("/", "-") not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {cfg.name!r}; shipped tiny configs: {shipped_config_names()}")
    weights, tag_cfg = _resolve_weights(cfg, resolve_uri)
    metadata = weights_metadata(weights) if weights is not None and not tag_cfg else None
    if architecture is None:
        architecture = resolve_architecture(cfg, weights_metadata=metadata, tag_cfg=tag_cfg)
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
    _require_patch_grid(model.visual, cfg.name)
    built = tower_activation(model.visual)
    if built != architecture.activation:
        raise RuntimeError(f"asked open_clip for {architecture.activation} but {cfg.name!r} was built with {built}")
    return model, architecture, _stated_preprocess(metadata, cfg.pretrained)


def resolve_architecture(cfg: BackboneConfig, *, weights_metadata: Optional[dict] = None,
                         tag_cfg: Optional[dict] = None) -> Architecture:
    """The architecture to build for ``cfg``: open_clip's config for the name plus the activation the weights need.

    The activation comes from the open_clip tag (``tag_cfg``), from a weight file's metadata (``weights_metadata``,
    see ``weights_metadata()``), or else from ``cfg.activation`` or an architecture config that names it (e.g.
    ``ViT-B-32-quickgelu``); ``cfg.activation`` must agree with a tag or file that states it. A weight file that
    nothing states it for is refused; random init takes the architecture's default (GELU).
    """
    register_shipped_configs()
    model_cfg = open_clip.get_model_config(cfg.name.replace("/", "-"))
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {cfg.name!r}; shipped tiny configs: {shipped_config_names()}")
    if tag_cfg:
        stated, origin = _activation_name(tag_cfg.get("quick_gelu", False)), f"open_clip tag {cfg.pretrained!r}"
    elif weights_metadata is not None:
        stated, origin = _stated_activation(weights_metadata, cfg.pretrained), f"weight file {cfg.pretrained!r}"
    else:
        stated, origin = None, None
    named = _activation_name(model_cfg["quick_gelu"]) if "quick_gelu" in model_cfg else None
    activation = _agreed_activation(cfg, stated, origin, named=named)
    return Architecture(name=cfg.name.replace("/", "-"), activation=activation, embed_dim=int(model_cfg["embed_dim"]),
                        vision_cfg=asdict(CLIPVisionCfg(**model_cfg["vision_cfg"])))


def _agreed_activation(cfg: BackboneConfig, stated: Optional[str], origin: Optional[str], *,
                       named: Optional[str]) -> str:
    if stated is not None and cfg.activation is not None and stated != cfg.activation:
        raise ValueError(f"backbone.activation is {cfg.activation!r} but the {origin} was trained with {stated!r}; "
                         "remove backbone.activation or correct it")
    if stated is not None:
        return stated
    if cfg.activation is not None:
        return cfg.activation
    if named is not None:
        return named
    if cfg.pretrained is not None:  # a weight file that does not say how it was trained
        raise ValueError(
            f"the weight file {cfg.pretrained!r} does not say which activation its weights were trained with; set "
            "backbone.activation: quick_gelu (OpenAI CLIP weights) or gelu (most LAION/DataComp weights), or write "
            "the file with `mpft export-weights`"
        )
    return "gelu"  # random init of an architecture that names no activation: open_clip's default


def _activation_name(quick_gelu) -> str:
    return "quick_gelu" if quick_gelu else "gelu"


def tower_activation(visual: nn.Module) -> str:
    """The activation the tower's MLPs actually use ("quick_gelu" or "gelu"), read off the modules."""
    kinds = {"quick_gelu" if isinstance(m, QuickGELU) else "gelu"
             for m in visual.modules() if isinstance(m, (QuickGELU, nn.GELU))}
    if len(kinds) != 1:
        raise ValueError(f"cannot tell the tower's activation: found {sorted(kinds) or 'none'}")
    return kinds.pop()


def weights_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a local ``.safetensors`` file (what ``save_clip_weights`` states lives there)."""
    with open(path, "rb") as f:
        return read_weights_metadata(lambda n: (f.seek(0), f.read(n))[1], origin=str(path))


def read_weights_metadata(read_prefix: Callable[[int], bytes], *, origin: str) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file from its first bytes (``read_prefix(n)`` returns the first
    ``n``): the header is a little-endian length and that much JSON, so a remote file need not be downloaded."""
    head = read_prefix(8)
    size = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < size <= MAX_SAFETENSORS_HEADER:
        raise ValueError(f"{origin!r} is not a safetensors file (no valid header)")
    try:
        header = json.loads(read_prefix(8 + size)[8:])
    except ValueError as err:
        raise ValueError(f"{origin!r} is not a safetensors file (header: {err})") from err
    return dict(header.get("__metadata__") or {}) if isinstance(header, dict) else {}


def _stated_activation(metadata: dict, origin) -> Optional[str]:
    stated = metadata.get(WEIGHTS_ACTIVATION_KEY)
    if stated is not None and stated not in ACTIVATIONS:
        raise ValueError(f"weight file {origin!r} states activation {stated!r}; expected one of {ACTIVATIONS}")
    return stated


def _stated_preprocess(metadata: Optional[dict], origin) -> Optional[Preprocess]:
    if not metadata or WEIGHTS_PREPROCESS_KEY not in metadata:
        return None
    try:
        return Preprocess.from_dict(json.loads(metadata[WEIGHTS_PREPROCESS_KEY]))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"weight file {origin!r} states an unreadable preprocess: {err}") from err


def save_clip_weights(model: nn.Module, path: str | os.PathLike[str], activation: str,
                      preprocess: Optional[Preprocess] = None, extra_metadata: Optional[dict[str, str]] = None) -> None:
    """Write an open_clip CLIP model's full state dict as a ``.safetensors`` weight file that states ``activation``
    and the input normalisation (``preprocess``, default the model's own), loadable as ``BackboneConfig.pretrained``
    (e.g. OpenAI weights exported for an offline cluster). ``extra_metadata`` (string values) is stored beside
    them, e.g. what produced the weights; it may not restate the activation or the normalisation."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    extra_metadata = dict(extra_metadata or {})
    if {WEIGHTS_ACTIVATION_KEY, WEIGHTS_PREPROCESS_KEY} & set(extra_metadata):
        raise ValueError(f"extra_metadata may not set {WEIGHTS_ACTIVATION_KEY} or {WEIGHTS_PREPROCESS_KEY}")
    built = tower_activation(model.visual)
    if built != activation:
        raise ValueError(f"the model's tower uses {built}, not {activation}")
    preprocess = preprocess or _preprocess_of(model.visual)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={**extra_metadata, WEIGHTS_ACTIVATION_KEY: activation,
                                            WEIGHTS_PREPROCESS_KEY: json.dumps(preprocess.to_dict())})


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
