"""Quickstart: the MPFT core library on its own (no Ray, no MLflow, no downloads), in about ten seconds on a CPU.

    .venv/bin/python examples/quickstart.py

Builds a tiny detector, shows which patches Texture-Aware Masking hides, trains ten steps on random data, then saves
and reloads a checkpoint. Swap the backbone for ``BackboneConfig(name="ViT-L-14", pretrained="openai")`` to get the
real method (needs the weights in the local Hugging Face cache).
"""

from __future__ import annotations

import tempfile

import torch

from mpft_core import (
    BackboneConfig,
    DetectorConfig,
    MaskConfig,
    OptimConfig,
    build_detector,
    compute_mask,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    pick_device,
    read_checkpoint_meta,
    save_checkpoint,
    train_step,
)

# %% 1. A tiny detector: 32x32 images, 8px patches -> a 4x4 patch grid. Random init, so nothing is downloaded.
torch.manual_seed(0)
config = DetectorConfig(
    backbone=BackboneConfig(name="mpft-tiny-32", pretrained=None),
    mask=MaskConfig(strategy="tam", texture="diversity", ratio=0.5, mode="drop"),
    trainable="full",
)
device = pick_device()
detector = build_detector(config).to(device)
print(f"device={device}  grid={detector.grid_size}x{detector.grid_size}  patch={detector.patch_size}px")
print(f"preprocess={detector.preprocess}")

# %% 2. TAM on a batch whose left half is noise and right half flat: the noisy (textured) half is what gets hidden.
pixels = torch.full((2, 3, 32, 32), 0.5)
pixels[:, :, :, :16] = torch.rand(2, 3, 32, 16)
mask = compute_mask(pixels, detector.patch_size, config.mask)
print("TAM mask of image 0 (1 = hidden):")
print(mask[0].view(detector.grid_size, detector.grid_size).int())

# %% 3. Ten training steps on random uint8 crops (labels: 1 = generated, 0 = real).
optim_cfg = OptimConfig(backbone_lr=1e-4, head_lr=1e-2, schedule="cosine")
optimizer = make_optimizer(detector, optim_cfg)
scheduler = make_scheduler(optimizer, optim_cfg, total_steps=10)
images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
labels = torch.tensor([0, 1] * 8)
losses = [train_step(detector, images, labels, optimizer, scheduler) for _ in range(10)]
print("losses:", " ".join(f"{loss:.3f}" for loss in losses))

# %% 4. Save (safetensors + JSON), reload, and check the reloaded model scores identically.
probabilities = detector.score_uint8(images[:4])
with tempfile.TemporaryDirectory() as tmp:
    directory = save_checkpoint(detector, tmp, extra={"steps": len(losses), "last_loss": losses[-1]})
    print("checkpoint files:", sorted(p.name for p in directory.iterdir()))
    print("extra:", read_checkpoint_meta(directory)["extra"])
    restored = load_checkpoint(directory, map_location=device)
restored_probabilities = restored.score_uint8(images[:4])
print("P(generated):", [round(p, 4) for p in probabilities.tolist()])
print("identical after reload:", torch.equal(probabilities, restored_probabilities))
