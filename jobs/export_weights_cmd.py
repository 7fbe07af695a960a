"""`mpft export-weights --model ViT-L-14 --pretrained openai --output ViT-L-14-openai.safetensors`.

Writes open_clip weights as a ``.safetensors`` file that states the activation they were trained with, for clusters
that cannot reach the model hub: upload it and set ``backbone.pretrained`` to its ``s3://`` URI or path. Run it where
the weights can be had (the hub, or a Hugging Face cache that holds them; set ``HF_HUB_OFFLINE=0`` to download).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from jobs.common import add_stack_arguments, storage_from_args

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-L-14")
    parser.add_argument("--pretrained", required=True,
                        help="open_clip tag (e.g. openai) or a .safetensors weight file (local or s3://)")
    parser.add_argument("--activation", choices=["gelu", "quick_gelu"], default=None,
                        help="what a weight file that does not say was trained with (tags know their own)")
    parser.add_argument("--output", required=True, help="destination .safetensors file (local path or s3:// URI)")
    add_stack_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from mpft_core.backbone import export_clip_weights
    from mpft_core.config import BackboneConfig
    from pipelines import storage

    if not args.output.endswith(".safetensors"):
        raise SystemExit(f"--output must name a .safetensors file, got {args.output!r}")
    storage_cfg = storage_from_args(args)
    cfg = BackboneConfig(name=args.model, pretrained=args.pretrained, activation=args.activation)
    resolve = lambda uri: str(storage.fetch_to_local(uri, storage_cfg))  # noqa: E731
    if storage.is_remote(args.output):
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "weights.safetensors"
            architecture = export_clip_weights(cfg, local, resolve_uri=resolve)
            storage.write_bytes(args.output, local.read_bytes(), storage_cfg)
    else:
        architecture = export_clip_weights(cfg, args.output, resolve_uri=resolve)
    print(f"wrote {args.output}: {args.model} weights from {args.pretrained!r}, activation {architecture.activation}")
    return 0
