"""`mpft pretrain-standin --out standin.safetensors`: a small open_clip ViT pre-trained here on real photos only.

A stand-in for CLIP weights where none can be downloaded (mpft_core/pretrain.py says what it is and is not): the
vision tower is trained contrastively on crops of the demo corpus's *training* photos
(``jobs.sample_corpus.TRAIN_PHOTOS``; the held-out photos feed every validation folder, so a backbone that saw them
would leak), then written as a ``.safetensors`` weight file that ``backbone.pretrained`` loads. The contrastive loss
on views of the held-out photos, before and after, is reported as a check that it learnt something that carries
over; they are never trained on.

The file records the settings and a hash of the photos it was made from. Run again with the same settings, the
command leaves the file alone; with other settings it refuses unless ``--force``. Settings left unset take
``PretrainConfig``'s defaults: they are stated once, in mpft_core/pretrain.py, which imports torch, which building
the `mpft` parser must not.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jobs.common import UsageError

PROGRESS_LINES = 10  # about this many loss lines per run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="the .safetensors weight file to write (a local path)")
    parser.add_argument("--model", help="open_clip model name or shipped config (default: mpft-tiny-32)")
    parser.add_argument("--steps", type=int, help="optimiser steps (default: PretrainConfig's, about 2-3 minutes "
                                                  "for mpft-tiny-32 on 2 CPU cores)")
    parser.add_argument("--region", type=int, help="side of the photo windows the views are cut from (default: 64; "
                                                   "at least the model's input size)")
    parser.add_argument("--seed", type=int, help="seed of the initial weights, crops and augmentations (default: 0)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out even if it was made with other settings (or is not a stand-in)")


def main(args: argparse.Namespace) -> int:
    out = checked_output(args.out)
    from jobs.sample_corpus import HELDOUT_PHOTOS, TRAIN_PHOTOS, load_photo
    from mpft_core.pretrain import PretrainConfig, pretrain, provenance, save_standin

    cfg = PretrainConfig(**given(model=args.model, steps=args.steps, seed=args.seed, region=args.region))
    photos = [load_photo(name) for name in TRAIN_PHOTOS]
    if out.exists() and not args.force:
        refuse_other_settings(out, provenance(cfg, photos))
        print(f"{out} is up to date: it was made with these settings and photos; nothing to do (--force remakes it)")
        print_usage(out, cfg.model)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    standin = pretrain(photos, cfg, heldout_photos=[load_photo(name) for name in HELDOUT_PHOTOS],
                       on_progress=lambda step, loss: print(f"step {step}/{cfg.steps}: loss {loss:.4f}", flush=True),
                       progress_every=max(1, cfg.steps // PROGRESS_LINES))
    save_standin(standin, out)
    print(json.dumps({
        "path": str(out), "model": cfg.model, "steps": cfg.steps, "seed": cfg.seed,
        "seconds": round(time.monotonic() - started, 1),
        "first_loss": round(standin.losses[0], 4), "last_loss": round(standin.losses[-1], 4),
        "heldout_loss": {name: round(value, 4) for name, value in standin.heldout_losses.items()},
    }))
    print_usage(out, cfg.model)
    return 0


def checked_output(location: str) -> Path:
    """``--out`` as a local path; UsageError for a URI, a name not ending in .safetensors (the weights loader reads
    nothing else) or a folder."""
    if "://" in location:
        raise UsageError(f"--out must be a local path, got {location!r}; upload the file afterwards if needed")
    if not location.endswith(".safetensors"):
        raise UsageError(f"--out must name a .safetensors file, got {location!r}")
    out = Path(location)
    if out.is_dir():
        raise UsageError(f"--out {location!r} is a folder; name the .safetensors file to write")
    return out


def refuse_other_settings(out: Path, wanted: dict) -> None:
    """UsageError unless the weight file at ``out`` records exactly ``wanted`` (settings and photos)."""
    from mpft_core.pretrain import recorded_provenance

    try:
        recorded = recorded_provenance(out)
    except (ValueError, OSError):
        recorded = None
    if recorded is None:
        raise UsageError(f"{out} exists and was not made by `mpft pretrain-standin`; pass --force to replace it")
    if recorded != wanted:
        raise UsageError(f"{out} was made with other settings ({differences(recorded, wanted)}); "
                         "pass --force to replace it, or choose another --out")


def differences(recorded: dict, wanted: dict) -> str:
    """What differs between a file's recorded provenance and this run's, as ``key: there -> here`` items."""
    there, here = recorded.get("config") or {}, wanted["config"]
    items = [f"{key}: {there.get(key)!r} there, {here.get(key)!r} here"
             for key in sorted(set(there) | set(here)) if there.get(key) != here.get(key)]
    if recorded.get("photos_sha256") != wanted["photos_sha256"]:
        items.append("other training photos")
    return "; ".join(items) or "an unreadable record"


def print_usage(out: Path, model: str) -> None:
    print("use it in a job config:\n"
          f"  method.detector.backbone.name: {model}\n"
          f"  method.detector.backbone.pretrained: {out.resolve()}")


def given(**options) -> dict:
    """The options that were given on the command line (not None)."""
    return {name: value for name, value in options.items() if value is not None}
