"""Typed configuration of the method.

Every knob of the method (docs/METHOD.md) is a field here, so a run's behaviour is fully described by one object that
is saved next to its outputs (``to_dict``) and can be rebuilt from YAML/JSON (``from_dict``). Unknown keys are
rejected: a typo in a sweep config must fail loudly instead of silently training the default.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class InputError(ValueError):
    """A bad input a person can fix (a manifest's rows, a location, a model reference): the CLI prints its message
    as one line with exit status 2. Any other ValueError is a bug and keeps its traceback."""


class StrictModel(BaseModel):
    """A config section: unknown keys are rejected, assignments validated, and it round-trips through plain dicts.

    Validation errors never quote the offending input: a misspelt key next to a credential (``secret_kye: ...``)
    would otherwise print the credential into a terminal or a CI log.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict | None):
        return cls.model_validate(data or {})


class BackboneConfig(StrictModel):
    """Which open_clip vision tower, and where its weights come from."""

    name: str = "ViT-L-14"
    # open_clip pretrained tag ("openai"), a local checkpoint file, an s3:// URI, or None for random init (tests).
    pretrained: Optional[str] = "openai"
    # The MLP activation the weights were trained with (weights do not carry it). None: the tag's, the weight
    # file's own statement, or for random init the architecture's; a weight file that states none needs it here.
    activation: Optional[Literal["gelu", "quick_gelu"]] = None


class MaskConfig(StrictModel):
    """Texture-Aware Masking. Applied in training only; evaluation and scoring always see the whole image."""

    strategy: Literal["tam", "random", "none"] = "tam"
    texture: Literal["diversity", "gradient", "variance", "highfreq"] = "diversity"
    ratio: float = Field(0.5, ge=0.0, le=0.9)
    mode: Literal["fill", "drop"] = "fill"


class DetectorConfig(StrictModel):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    trainable: Literal["full", "last-k", "probe"] = "full"
    last_k: int = Field(2, ge=1)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)


class OptimConfig(StrictModel):
    # None picks the docs/METHOD.md default for the trainable policy: 1e-5 (full) or 5e-5 (last-k).
    backbone_lr: Optional[float] = None
    head_lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_gamma: float = 0.7
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    amp: bool = True  # only takes effect on CUDA
    seed: int = 0

    def resolved_backbone_lr(self, trainable: str) -> float:
        if self.backbone_lr is not None:
            return self.backbone_lr
        return 5e-5 if trainable == "last-k" else 1e-5


def _low_to_high(bounds: tuple) -> tuple:
    """A ``[lo, hi]`` range with ``lo > hi`` is a typo, not an empty range: refuse it."""
    low, high = bounds
    if low > high:
        raise ValueError(f"a [lo, hi] range needs lo <= hi, got [{low}, {high}]")
    return bounds


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Quality = Annotated[int, Field(ge=1, le=100)]  # libjpeg's scale
Sigma = Annotated[float, Field(gt=0.0)]  # pixels of the model input
Scale = Annotated[float, Field(gt=0.0, lt=1.0)]  # a shrink factor; 1 would be no degradation


class JpegDegrade(StrictModel):
    """With probability ``p``, re-encode the crop as JPEG at a quality drawn uniformly from ``quality`` (ends
    included)."""

    p: Probability = 0.0
    quality: Annotated[tuple[Quality, Quality], AfterValidator(_low_to_high)] = (50, 95)


class BlurDegrade(StrictModel):
    """With probability ``p``, Gaussian-blur the crop with a σ drawn uniformly from ``sigma``."""

    p: Probability = 0.0
    sigma: Annotated[tuple[Sigma, Sigma], AfterValidator(_low_to_high)] = (0.5, 2.0)


class DownscaleDegrade(StrictModel):
    """With probability ``p``, shrink the crop by a factor drawn uniformly from ``scale`` and scale it back up to its
    size (bicubic both ways; ``mpft_core.degrade.shrink_and_restore`` says why)."""

    p: Probability = 0.0
    scale: Annotated[tuple[Scale, Scale], AfterValidator(_low_to_high)] = (0.5, 0.9)


class DegradeConfig(StrictModel):
    """Per-sample degradations of the training crops, so that the detector cannot learn a pristine file's format
    traces (real photos are found recompressed and resized). Every ``p`` is 0 by default: the paper's recipe
    trains on pristine files. Applied in the order downscale, blur, JPEG (``mpft_core.degrade``)."""

    downscale: DownscaleDegrade = Field(default_factory=DownscaleDegrade)
    blur: BlurDegrade = Field(default_factory=BlurDegrade)
    jpeg: JpegDegrade = Field(default_factory=JpegDegrade)

    @property
    def enabled(self) -> bool:
        """Whether any degradation can happen at all (otherwise the training loop leaves crops untouched)."""
        return any(op.p > 0 for op in (self.downscale, self.blur, self.jpeg))


class AugmentConfig(StrictModel):
    """Training-time crops. The decode stage cuts one random window per file, ``crop_jitter`` x the input size
    larger than the model input; every epoch the training loop takes a fresh random crop of the input size from it,
    and a random horizontal flip. Crops (and so the phase of the pixel grid against a generator's upsampling or JPEG
    blocks) then differ between epochs even when the decoded set is cached.

    The default 0 keeps one crop per file (flipped anew each epoch): jitter helped the training generator but hurt
    held-out ones on the demo corpus (README, crop jitter). ``degrade`` (off by default) then degrades each crop."""

    crop_jitter: float = Field(0.0, ge=0.0, le=1.0)
    degrade: DegradeConfig = Field(default_factory=DegradeConfig)

    def window(self, image_size: int) -> int:
        """Side of the decoded training window for a model input of ``image_size``."""
        return image_size + round(image_size * self.crop_jitter)


class ThresholdConfig(StrictModel):
    """How the decision thresholds are chosen on the validation split (never on test labels).

    ``threshold``: score >= it is "generated" (the binary decision the metrics use). ``real_threshold`` (never above
    it): score < it is "real"; scores in between are "uncertain"."""

    # None keeps 0.5; otherwise the threshold that gives this false-positive rate on real validation images.
    target_fpr: Optional[float] = Field(None, gt=0.0, lt=1.0)
    # None: no uncertain band (real_threshold = threshold). Otherwise the real_threshold below which at most this
    # fraction of generated validation images fall, lowered to threshold if it lands above it.
    target_miss_rate: Optional[float] = Field(None, gt=0.0, lt=1.0)


class MethodConfig(StrictModel):
    """The method part of a training run: model, masking, optimiser, calibration."""

    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)
