"""Benchmark: the cost of Texture-Aware Masking inside one MPFT training step, and `fill` vs `drop` masking.

    .venv/bin/python bench/train_step.py                 # all parts, 7 timed repeats per mode
    .venv/bin/python bench/train_step.py --quick         # 3 repeats (a few minutes on a 2-core CPU)
    .venv/bin/python bench/train_step.py --part tam      # only the TAM share of a `fill` step

Setup: open_clip ViT-B-16 with random weights (nothing downloaded), full fine-tuning, batch 8 of 224 px crops, TAM
with the `diversity` texture score at ratio 0.5, fp32 on the CPU with 2 torch threads. Every timed step is a complete
`mpft_core.optim.train_step` (normalise, TAM, forward, BCE, backward, AdamW) on the same batch.

Parts:
* ``tam``: time spent in ``compute_mask`` during each step, measured inside the step (the detector's reference to
  ``compute_mask`` is wrapped with a timer), as a share of the whole step. Also timed on its own on the same batch,
  as a cross-check. Target: <= 3 % of the step.
* ``mask-modes``: step time of ``fill`` vs ``drop`` at ratio 0.5. Target: ``drop`` >= 1.6x faster per step.
* ``ray``: training samples/s of 1 vs 2 Ray Train workers (the real loop of ``pipelines/training.py``, DDP over
  gloo) on the tiny ``mpft-tiny-224`` config, from an in-memory dataset so that only the training side is measured.
  Both runs use the same 2 torch threads in total (1 worker x 2 threads vs 2 workers x 1 thread); samples/s is the
  loop's own per-epoch figure, the first epoch (warm-up) left out. On 2 cores this shows what data-parallelism costs
  or gains when the cores are already busy; the gain it exists for comes with more nodes or GPUs.

The modes are interleaved (and their order alternates every repeat) so that background load hits both alike, and
the figures are medians. Results go to ``bench/results/train_step.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import mpft_core.detector as detector_module  # noqa: E402
from mpft_core import BackboneConfig, DetectorConfig, MaskConfig, OptimConfig, build_detector  # noqa: E402
from mpft_core.optim import make_optimizer, train_step  # noqa: E402
from mpft_core.tam import compute_mask  # noqa: E402
from mpft_core.transforms import denormalize, normalize  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BACKBONE = "ViT-B-16"
BATCH_SIZE = 8
MASK_RATIO = 0.5
TORCH_THREADS = 2
TARGET_TAM_SHARE = 0.03  # TAM must cost at most 3 % of a training step
TARGET_DROP_SPEEDUP = 1.6  # drop must make a step at least 1.6x faster than fill at ratio 0.5


# --------------------------------------------------------------------------------------------------- measuring


class MaskTimer:
    """Wraps the detector module's ``compute_mask`` so the time TAM takes *inside* a real step is recorded."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def installed(self) -> Iterator[MaskTimer]:
        original = detector_module.compute_mask

        def timed_compute_mask(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        detector_module.compute_mask = timed_compute_mask
        try:
            yield self
        finally:
            detector_module.compute_mask = original

    def reset(self) -> None:
        self.seconds = 0.0


def fixed_batch(image_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One uint8 NHWC batch reused by every step. TAM's cost does not depend on pixel content, only on the shape."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (BATCH_SIZE, image_size, image_size, 3), dtype=torch.uint8, generator=generator)
    labels = torch.tensor([0.0, 1.0] * (BATCH_SIZE // 2))
    return images, labels


def set_mask_mode(detector, mode: str) -> None:
    # The detector reads its mask config at every forward, so one model (same weights) serves both modes.
    detector.config.mask = MaskConfig(strategy="tam", texture="diversity", ratio=MASK_RATIO, mode=mode)


def measure_steps(
    modes: list[str], repeats: int, log: Callable[[str], None], backbone: str = BACKBONE
) -> tuple[dict[str, list[dict]], list[float]]:
    """Time ``repeats`` full training steps per mask mode, interleaved; each record holds step and in-step TAM time.

    Also returns ``compute_mask`` timed on its own on the same batch (cross-check of the in-step figure).
    """
    torch.manual_seed(0)
    config = DetectorConfig(backbone=BackboneConfig(name=backbone, pretrained=None), trainable="full")
    detector = build_detector(config)
    optimizer = make_optimizer(detector, OptimConfig(schedule="constant"))
    images, labels = fixed_batch(detector.preprocess.image_size)
    timer = MaskTimer()
    records: dict[str, list[dict]] = {mode: [] for mode in modes}

    def one_step(mode: str) -> dict:
        set_mask_mode(detector, mode)
        timer.reset()
        start = time.perf_counter()
        train_step(detector, images, labels, optimizer)
        return {"step_s": time.perf_counter() - start, "tam_s": timer.seconds}

    with timer.installed():
        for mode in modes:  # warm-up: first-call allocations, AdamW state creation
            warm = one_step(mode)
            log(f"  warm-up {mode:5s} step {warm['step_s']:.2f} s")
        for repeat in range(repeats):
            # Alternate the order so a load spike at a fixed point of each round does not always hit the same mode.
            order = modes if repeat % 2 == 0 else list(reversed(modes))
            for mode in order:
                record = one_step(mode)
                records[mode].append(record)
                log(f"  repeat {repeat + 1}/{repeats} {mode:5s} step {record['step_s']:.2f} s, "
                    f"TAM {1000 * record['tam_s']:.1f} ms")
    return records, measure_mask_alone(detector, images, max(10, 3 * repeats))


def measure_mask_alone(detector, images: torch.Tensor, repeats: int) -> list[float]:
    """``compute_mask`` on its own, on exactly what a step hands it: the batch normalised, denormalised, clamped."""
    preprocess = detector.preprocess
    x = normalize(images, preprocess.mean, preprocess.std)
    pixels01 = denormalize(x, preprocess.mean, preprocess.std).clamp_(0.0, 1.0)
    mask_cfg = detector.config.mask
    compute_mask(pixels01, detector.patch_size, mask_cfg)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        compute_mask(pixels01, detector.patch_size, mask_cfg)
        seconds.append(time.perf_counter() - start)
    return seconds


# --------------------------------------------------------------------------------------------------- summarising


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def summarise_tam(records: dict[str, list[dict]], alone_s: list[float]) -> dict:
    fill = records["fill"]
    step_s = median([r["step_s"] for r in fill])
    in_step_s = median([r["tam_s"] for r in fill])
    share = median([r["tam_s"] / r["step_s"] for r in fill])
    summary = {
        "mode": "fill",
        "step_s_median": step_s,
        "tam_in_step_s_median": in_step_s,
        "tam_alone_s_median": median(alone_s),
        "tam_share_median": share,
        "target_max_share": TARGET_TAM_SHARE,
        "pass": share <= TARGET_TAM_SHARE,
    }
    if "drop" in records:
        drop = records["drop"]
        summary["tam_share_in_drop_step_median"] = median([r["tam_s"] / r["step_s"] for r in drop])
    return summary


def summarise_mask_modes(records: dict[str, list[dict]]) -> dict:
    fill_s = median([r["step_s"] for r in records["fill"]])
    drop_s = median([r["step_s"] for r in records["drop"]])
    # Paired ratios (fill and drop of the same round ran back to back) are less sensitive to slow drifts in load.
    paired = [f["step_s"] / d["step_s"] for f, d in zip(records["fill"], records["drop"], strict=True)]
    speedup = fill_s / drop_s
    return {
        "ratio": MASK_RATIO,
        "fill_step_s_median": fill_s,
        "drop_step_s_median": drop_s,
        "speedup_of_medians": speedup,
        "speedup_paired_median": median(paired),
        "fill_samples_per_s": BATCH_SIZE / fill_s,
        "drop_samples_per_s": BATCH_SIZE / drop_s,
        "target_min_speedup": TARGET_DROP_SPEEDUP,
        "pass": speedup >= TARGET_DROP_SPEEDUP,
    }


def machine_info() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def render_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Training-step benchmark (bench/train_step.py)",
        "",
        f"- when: {result['finished_utc']}; command: `{result['command']}`",
        f"- machine: {m['cpu_model']}, {m['logical_cores']} logical cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}",
        f"- load average (1/5/15 min) at start {result['load_average_start']}, at end {result['load_average_end']} "
        "(figures are medians over interleaved repeats, which background load hits alike)",
        f"- setup: {result['setup']['backbone']} random weights, full fine-tuning, batch {BATCH_SIZE} x 224 px, "
        f"fp32 CPU, TAM `diversity` at ratio {MASK_RATIO}; {result['repeats']} timed steps per mode after one "
        "warm-up step",
        "",
        "| figure | value | target | result |",
        "|---|---|---|---|",
    ]
    tam = result.get("tam")
    if tam:
        if "mask_modes" not in result:  # otherwise the mode comparison below shows it
            lines.append(f"| `fill` step time (median) | {tam['step_s_median']:.2f} s | | |")
        lines += [
            f"| TAM time inside the step (median) | {1000 * tam['tam_in_step_s_median']:.1f} ms | | |",
            f"| TAM time alone, same batch (median) | {1000 * tam['tam_alone_s_median']:.1f} ms | | |",
            f"| TAM share of a `fill` step | {100 * tam['tam_share_median']:.2f} % | <= {100 * TARGET_TAM_SHARE:.0f} % "
            f"| {'PASS' if tam['pass'] else 'FAIL'} |",
        ]
        if "tam_share_in_drop_step_median" in tam:
            lines.append(f"| TAM share of a `drop` step | {100 * tam['tam_share_in_drop_step_median']:.2f} % | | |")
    modes = result.get("mask_modes")
    if modes:
        lines += [
            f"| `fill` step time (median) | {modes['fill_step_s_median']:.2f} s "
            f"({modes['fill_samples_per_s']:.2f} samples/s) | | |",
            f"| `drop` step time (median) | {modes['drop_step_s_median']:.2f} s "
            f"({modes['drop_samples_per_s']:.2f} samples/s) | | |",
            f"| `drop` speed-up over `fill` (ratio of medians) | {modes['speedup_of_medians']:.2f}x "
            f"| >= {TARGET_DROP_SPEEDUP}x | {'PASS' if modes['pass'] else 'FAIL'} |",
            f"| `drop` speed-up, median of paired rounds | {modes['speedup_paired_median']:.2f}x | | |",
        ]
    ray_part = result.get("ray")
    if ray_part:
        lines += [
            f"| Ray Train, 1 worker x {TORCH_THREADS} threads ({ray_part['backbone']}, median) "
            f"| {ray_part['samples_per_s_1_worker']:.1f} samples/s | | |",
            f"| Ray Train, 2 workers x {TORCH_THREADS // 2} thread (median) "
            f"| {ray_part['samples_per_s_2_workers']:.1f} samples/s | | |",
            f"| 2 workers / 1 worker | {ray_part['speedup_2_over_1']:.2f}x | | |",
        ]
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- entry point

PARTS = ("tam", "mask-modes", "ray")

RAY_BACKBONE = "mpft-tiny-224"
RAY_ROWS = 512
RAY_BATCH_PER_WORKER = 16


def measure_ray_scaling(log, epochs: int, rounds: int) -> dict:
    """Samples/s of the Ray Train loop with 1 and 2 workers, alternating, ``rounds`` runs each."""
    import tempfile

    import numpy as np
    import ray

    from mpft_core.config import MethodConfig
    from pipelines import training
    from pipelines.runtime import init_ray, shutdown_ray
    from pipelines.storage import StorageConfig

    init_ray(num_cpus=2)
    rng = np.random.default_rng(0)
    rows = [{"image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), "label": i % 2, "view_height": 224,
             "view_width": 224} for i in range(RAY_ROWS)]
    train_ds = ray.data.from_items(rows).materialize()
    val_ds = ray.data.from_items([{**r, "path": f"mem://{i}", "subset": "bench"} for i, r in enumerate(rows[:32])])
    val_ds = val_ds.materialize()
    method = MethodConfig.from_dict({
        "detector": {"backbone": {"name": RAY_BACKBONE, "pretrained": None}, "mask": {"ratio": MASK_RATIO}},
        "optim": {"epochs": epochs, "batch_size": RAY_BATCH_PER_WORKER},
    })
    per_run: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as root:
        for round_index in range(rounds):
            for workers in (1, 2) if round_index % 2 == 0 else (2, 1):
                loop = training.LoopConfig(
                    method=method.to_dict(), storage=StorageConfig().to_dict(reveal_secrets=True),
                    steps_per_epoch=training.steps_per_epoch(RAY_ROWS, RAY_BATCH_PER_WORKER, workers),
                    torch_threads=TORCH_THREADS // workers, log_every_steps=10**9)
                trainer = training.build_trainer(
                    name=f"bench-{workers}w-{round_index}", loop_config=loop, logger=None, train_ds=train_ds,
                    val_ds=val_ds, checkpoint_root=root, storage_cfg=StorageConfig(), num_workers=workers,
                    use_gpu=False, cpus_per_worker=0.5, keep_checkpoints=epochs, max_failures=0)
                result = trainer.fit()
                reported = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["epoch"])
                rates = [m["train_samples_per_s"] for m in reported[1:]]  # epoch 0 includes warm-up
                per_run[workers].append(median(rates))
                log(f"ray: {workers} worker(s), round {round_index}: {median(rates):.1f} samples/s")
    shutdown_ray()
    one, two = median(per_run[1]), median(per_run[2])
    return {"backbone": RAY_BACKBONE, "rows": RAY_ROWS, "batch_per_worker": RAY_BATCH_PER_WORKER, "epochs": epochs,
            "rounds": rounds, "samples_per_s_1_worker": one, "samples_per_s_2_workers": two,
            "speedup_2_over_1": two / one, "runs": per_run}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per mask mode (median reported)")
    parser.add_argument("--quick", action="store_true", help="3 repeats per mode")
    parser.add_argument("--backbone", default=BACKBONE,
                        help="only for a quick smoke run of the script itself (e.g. mpft-tiny-224)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where train_step.{json,md} go")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(TORCH_THREADS)
    parts = set(PARTS) if args.part == "all" else {args.part}
    # TAM alone needs only `fill` steps; comparing modes needs both (and then yields the TAM share for free).
    modes = ["fill", "drop"] if "mask-modes" in parts else ["fill"]

    def log(message: str) -> None:
        print(message, flush=True)

    result: dict = {
        "command": " ".join(["bench/train_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "load_average_start": load_average(),
        "repeats": repeats,
        "setup": {"backbone": args.backbone, "pretrained": None, "batch_size": BATCH_SIZE, "image_size": 224,
                  "trainable": "full", "mask": {"strategy": "tam", "texture": "diversity", "ratio": MASK_RATIO}},
    }
    if parts & {"tam", "mask-modes"}:
        log(f"{args.backbone}, batch {BATCH_SIZE}, modes {modes}, {repeats} repeats, torch threads {TORCH_THREADS}")
        records, mask_alone_s = measure_steps(modes, repeats, log, backbone=args.backbone)
        result["steps"] = records
    if "ray" in parts:
        result["ray"] = measure_ray_scaling(log, epochs=3, rounds=1 if args.quick else 2)
    if "tam" in parts:
        result["tam"] = summarise_tam(records, mask_alone_s)
    if "mask-modes" in parts:
        result["mask_modes"] = summarise_mask_modes(records)
    result["load_average_end"] = load_average()
    result["finished_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_step.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = render_markdown(result)
    (args.out / "train_step.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
