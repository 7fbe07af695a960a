"""The MPFT detector: open_clip ViT image tower -> dropout -> linear head, one logit per image (1 = generated).

Texture-Aware Masking is applied inside ``forward`` in training mode only, in one of two ways:

* ``fill``: masked patches' pixels are set to 0 in normalised space (the normalisation mean) and the tower runs on
  the full token grid;
* ``drop``: masked patch tokens are removed before the transformer (FLIP-style), so the step costs less.
  ``encode_visible_patches`` reproduces open_clip 3.3.0's ``VisionTransformer.forward`` step by step with a token
  gather inserted after the positional embedding; with nothing masked it matches the tower's own forward exactly.

Evaluation, ``embed`` and ``score_uint8`` always see the whole image.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from .backbone import Architecture, UriResolver, create_backbone
from .config import DetectorConfig
from .tam import compute_mask
from .transforms import Preprocess, denormalize, normalize


def pick_device() -> torch.device:
    """The current CUDA device if there is one, else the CPU (a distributed worker passes its own device instead)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def fill_masked_patches(x: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Set the pixels of masked patches to 0 (the mean, in normalised space). ``mask`` is bool ``[N, P]``."""
    n, _, h, w = x.shape
    rows, cols = h // patch_size, w // patch_size
    if mask.shape != (n, rows * cols):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match a {rows}x{cols} patch grid")
    pixel_mask = (
        mask.view(n, 1, rows, 1, cols, 1)
        .expand(n, 1, rows, patch_size, cols, patch_size)
        .reshape(n, 1, rows * patch_size, cols * patch_size)
    )
    # Pixels beyond the last full patch never reach the ViT's strided conv; leave them alone.
    pixel_mask = F.pad(pixel_mask, (0, w - cols * patch_size, 0, h - rows * patch_size), value=False)
    return x.masked_fill(pixel_mask, 0.0)


def keep_visible_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N, 1 + P, D]`` tokens (class token first) -> ``[N, 1 + kept, D]``, visible patches in raster order."""
    n, _, width = tokens.shape
    hidden_per_image = mask.sum(dim=1)
    if not bool((hidden_per_image == hidden_per_image[0]).all()):
        raise ValueError("drop mode needs the same number of masked patches in every image")
    kept = mask.shape[1] - int(hidden_per_image[0])
    # nonzero() walks the mask row-major, so each image's visible patch indices come out grouped and ascending.
    visible = (~mask).nonzero()[:, 1].view(n, kept) + 1  # +1 skips the class token
    index = torch.cat([visible.new_zeros(n, 1), visible], dim=1)
    return tokens.gather(1, index.unsqueeze(-1).expand(n, kept + 1, width))


def encode_visible_patches(visual: VisionTransformer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Image embeddings ``[N, D]`` computed from the unmasked patch tokens only (open_clip 3.3.0 order of ops)."""
    tokens = visual.conv1(x)  # [N, width, rows, cols]
    tokens = tokens.reshape(tokens.shape[0], tokens.shape[1], -1).permute(0, 2, 1)
    class_token = visual.class_embedding.view(1, 1, -1).expand(tokens.shape[0], -1, -1).to(tokens.dtype)
    tokens = torch.cat([class_token, tokens], dim=1)
    tokens = tokens + visual.positional_embedding.to(tokens.dtype)
    # Positions are already added, so each kept token still knows where it came from.
    tokens = keep_visible_tokens(tokens, mask)
    tokens = visual.patch_dropout(tokens)
    tokens = visual.ln_pre(tokens)
    tokens = visual.transformer(tokens)
    return _pool_and_project(visual, tokens)


def _pool_and_project(visual: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    if visual.attn_pool is not None:
        # Attentional pooling (CoCa towers) has several variants; reuse open_clip's own implementation.
        pooled, _ = visual._pool(tokens)
    elif visual.final_ln_after_pool:
        pooled = visual.ln_post(_global_pool(visual, tokens))
    else:
        pooled = _global_pool(visual, visual.ln_post(tokens))
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


def _global_pool(visual: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    if visual.pool_type == "avg":
        return tokens[:, 1:].mean(dim=1)
    return tokens[:, 0]


class MPFTDetector(nn.Module):
    """CLIP ViT image tower + dropout + linear head; ``forward`` returns one logit per image (1 = generated).

    Attributes:
        config: the ``DetectorConfig`` it was built from (saved in checkpoints).
        architecture: how the tower was built beyond its weights (activation, vision config; saved in checkpoints).
        preprocess: image size and normalisation the tower expects.
        threshold: decision threshold on the sigmoid probability (0.5 unless calibrated; saved in checkpoints):
            score >= threshold is "generated", the binary decision the metrics use.
        real_threshold: score < real_threshold is "real", scores in between "uncertain" (saved in checkpoints).
            Until set it follows ``threshold`` (no uncertain band); setting it to None restores that. It never
            exceeds ``threshold``: lowering ``threshold`` below it narrows the band to nothing rather than invert it.
        patch_size: ViT patch side in pixels; grid_size: patches per image side (P = grid_size ** 2).
    """

    def __init__(
        self, visual: VisionTransformer, preprocess: Preprocess, config: DetectorConfig, *,
        architecture: Architecture, threshold: float = 0.5, real_threshold: Optional[float] = None,
    ):
        super().__init__()
        self.visual = visual
        self.architecture = architecture
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(visual.output_dim, 1)
        self.config = config
        self.preprocess = preprocess
        self.threshold = float(threshold)
        self.real_threshold = real_threshold
        self.patch_size = int(visual.patch_size[0])
        self.grid_size = int(visual.grid_size[0])
        # Some towers ship deliberately fixed parameters (e.g. sin-cos position tables); no policy unfreezes them.
        self._fixed_parameters = {name for name, p in self.named_parameters() if not p.requires_grad}
        self.apply_trainable_policy(config.trainable, config.last_k)

    @property
    def real_threshold(self) -> float:
        # Code that sets only ``threshold`` must not open an uncertain band by accident, nor invert one.
        return self.threshold if self._real_threshold is None else min(self._real_threshold, self.threshold)

    @real_threshold.setter
    def real_threshold(self, value: Optional[float]) -> None:
        self._real_threshold = None if value is None else float(value)

    # --- trainable policies -------------------------------------------------------------------------------------
    def apply_trainable_policy(self, trainable: str, last_k: int = 2) -> None:
        """Set ``requires_grad`` for ``full`` / ``last-k`` / ``probe``.

        Frozen parts stay in whatever train/eval mode the detector is in: an open_clip ViT has no batch-norm
        statistics and no dropout inside the tower, so freezing via ``requires_grad`` alone is exact.
        """
        trainable_names = set(self._trainable_parameter_names(trainable, last_k)) - self._fixed_parameters
        for name, param in self.named_parameters():
            param.requires_grad_(name in trainable_names)

    def _trainable_parameter_names(self, trainable: str, last_k: int) -> list[str]:
        head = [f"head.{name}" for name, _ in self.head.named_parameters()]
        if trainable == "full":
            return [name for name, _ in self.named_parameters()]
        if trainable == "probe":
            return head
        if trainable == "last-k":
            blocks = self.visual.transformer.resblocks
            if not 1 <= last_k <= len(blocks):
                raise ValueError(f"last_k={last_k} but the tower has {len(blocks)} transformer blocks")
            top_modules = [f"transformer.resblocks.{i}." for i in range(len(blocks) - last_k, len(blocks))]
            top_modules += ["ln_post.", "attn_pool.", "attn_pool_contrastive."]
            return head + [
                f"visual.{name}"
                for name, _ in self.visual.named_parameters()
                if name == "proj" or name.startswith(tuple(top_modules))
            ]
        raise ValueError(f"unknown trainable policy {trainable!r}; choose full, last-k or probe")

    # --- forward passes -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float ``[N, 3, S, S]`` -> logits ``[N]``; masks textured patches when training."""
        self._check_input(x)
        if self._masking_active():
            features = self._masked_features(x)
        else:
            features = self._tower(x)
        return self.head(self.dropout(features)).squeeze(-1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``[N, D]`` of normalised images, never masked (feature-space plots, probes)."""
        self._check_input(x)
        return self._tower(x)

    def score_uint8(self, batch_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        """Probability of "generated" for a uint8 ``[N, S, S, 3]`` batch (already cropped), on CPU as ``[N]``."""
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                x = normalize(batch_uint8_nhwc.to(self.device), self.preprocess.mean, self.preprocess.std)
                return torch.sigmoid(self(x).float()).cpu()
        finally:
            self.train(was_training)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _masking_active(self) -> bool:
        mask_cfg = self.config.mask
        return self.training and mask_cfg.strategy != "none" and mask_cfg.ratio > 0

    def _masked_features(self, x: torch.Tensor) -> torch.Tensor:
        pixels01 = denormalize(x.detach(), self.preprocess.mean, self.preprocess.std).clamp_(0.0, 1.0)
        mask = compute_mask(pixels01, self.patch_size, self.config.mask)
        if self.config.mask.mode == "drop":
            return encode_visible_patches(self.visual, x, mask)
        return self._tower(fill_masked_patches(x, mask, self.patch_size))

    def _tower(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual(x)
        return out[0] if isinstance(out, tuple) else out  # towers built with output_tokens return (pooled, tokens)

    def _check_input(self, x: torch.Tensor) -> None:
        size = self.preprocess.image_size
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (size, size):
            raise ValueError(
                f"expected normalised images [N, 3, {size}, {size}], got {tuple(x.shape)}; "
                "crop with mpft_core.transforms (tile + crop, never resize) and normalise first"
            )
        if not x.is_floating_point():
            raise ValueError(f"expected float input (use transforms.normalize on uint8), got {x.dtype}")


def build_detector(cfg: DetectorConfig, *, resolve_uri: Optional[UriResolver] = None,
                   architecture: Optional[Architecture] = None) -> MPFTDetector:
    """Backbone from ``cfg.backbone`` (see ``create_backbone``) + fresh head, with ``cfg.trainable`` applied.

    The detector's config records the activation the tower was built with, so a saved config says it explicitly.
    """
    backbone = create_backbone(cfg.backbone, resolve_uri=resolve_uri, architecture=architecture)
    config = cfg.model_copy(deep=True)
    config.backbone.activation = backbone.architecture.activation
    return MPFTDetector(backbone.visual, backbone.preprocess, config, architecture=backbone.architecture)
