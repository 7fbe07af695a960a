"""`make gpu-check`: the GPU-only parts of the training and scoring path, without Ray or MLflow.

Drives the functions the Ray Train loop uses (``mpft_core.distributed``: device placement, DDP wrapping, checkpoint
save from a wrapped model, restore order, mixed precision) under plain ``torch.distributed`` with two processes:

1. ``ddp_three_epochs``: three epochs from a QuickGELU weight file (a random stand-in for the OpenAI weights),
   checkpoint after every epoch, replicas compared bit for bit after every epoch (a rank that stops joining the
   all-reduce shows as different digests or a collective timeout);
2. ``failure_and_resume``: the same run fails in its third epoch, new processes resume from the last checkpoint on
   the device (optimizer state equal to the saved one and next to the parameters, scaler state equal to the saved
   one) and finish; the result must be much closer to the uninterrupted run than that run's own last epoch moved;
3. ``checkpoint_reload``: the last checkpoint reloaded on the device scores a fixed batch bit-identically to the
   model that wrote it;
4. ``scoring_kernel``: decode -> centre crop -> ``score_uint8`` on the device, against the same checkpoint on the CPU;
5. ``throughput``: training (AMP) and scoring images/s of one process.

Two ranks share one GPU through gloo (NCCL refuses two ranks on one device); with two or more GPUs they use NCCL.
``--device cpu`` runs the same steps on the CPU with gloo (the test suite does, with a tiny model, so this script
cannot rot unnoticed). Prints one line per step and writes the results as JSON; exits 1 if any step failed.

    python3 bench/gpu_check.py                       # CUDA, ViT-L-14
    python3 bench/gpu_check.py --device cpu --model mpft-tiny-32 --batch-size 4 --steps-per-epoch 2
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the project

from mpft_core.backbone import register_shipped_configs, save_clip_weights, tower_activation  # noqa: E402
from mpft_core.checkpoint import load_checkpoint  # noqa: E402
from mpft_core.config import BackboneConfig, DetectorConfig, MethodConfig, OptimConfig  # noqa: E402
from mpft_core.distributed import (  # noqa: E402
    TRAIN_STATE_FILE,
    TrainingSetup,
    replica_digests,
    save_training_checkpoint,
    setup_training,
)
from mpft_core.optim import train_step  # noqa: E402

WORLD_SIZE = 2
EPOCHS = 3
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=180)  # a rank that stops joining fails the step instead of hanging
# The resumed run's distance from the uninterrupted one, as a share of how far that run's last epoch moved its
# weights: a resume with fresh or wrong optimizer state lands a sizeable share away (GPU kernels alone, far less).
RESUME_TOLERANCE = 0.05
SCORE_TOLERANCE = 1e-3  # GPU vs CPU scores of the same checkpoint, TF32 off
DEADLINE_S = 540  # steps not started by then are reported as not run (the device tool stops a command at 600 s)


class InjectedFailure(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------- one rank


def rank_main(rank: int, opts: dict, run_dir: str, fail_at_epoch: int | None, report_file: str) -> None:
    """One training process: set up (or resume), train, checkpoint and compare replicas after every epoch."""
    use_cuda = opts["device"] == "cuda"
    backend = "nccl" if use_cuda and torch.cuda.device_count() >= WORLD_SIZE else "gloo"
    device = torch.device("cuda", rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // WORLD_SIZE))
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=opts["init_method"], rank=rank, world_size=WORLD_SIZE,
                            timeout=COLLECTIVE_TIMEOUT, device_id=device if backend == "nccl" else None)
    try:
        torch.manual_seed(rank)
        method = method_config(opts)
        last = latest_checkpoint(Path(run_dir))
        setup = setup_training(method, device, total_steps=opts["steps_per_epoch"] * EPOCHS, resume_from=last)
        report = {"backend": backend, "device": str(device), "resumed": setup.resumed,
                  "start_epoch": setup.start_epoch, "start_step": setup.global_step,
                  "activation": tower_activation(setup.detector.visual), "epochs": []}
        if setup.resumed:
            report.update(restored_state_report(setup, last))
        for epoch in range(setup.start_epoch, EPOCHS):
            train_epoch(setup, opts, epoch, rank, fail=(epoch == fail_at_epoch))
            digests = replica_digests(setup.model)
            saved = None
            if rank == 0:
                saved = save_training_checkpoint(setup, Path(run_dir) / f"epoch-{epoch}", epoch=epoch)
                probe = probe_batch(setup.detector.preprocess.image_size)
                torch.save(setup.detector.score_uint8(probe), saved / "probe_scores.pt")
                # Only the last two epochs are read again (ViT-L checkpoints with AdamW state are ~3.6 GB each).
                shutil.rmtree(Path(run_dir) / f"epoch-{epoch - 2}", ignore_errors=True)
            dist.barrier()
            report["epochs"].append({"epoch": epoch, "replicas_agree": len(set(digests)) == 1,
                                     "params_on_device": setup.detector.device == device,
                                     "scaler_scale": None if setup.scaler is None else float(setup.scaler.get_scale()),
                                     "checkpoint": None if saved is None else str(saved)})
        if rank == 0:
            Path(report_file).write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def method_config(opts: dict) -> MethodConfig:
    # A backbone lr 10x the recipe's, so the weights move enough in a dozen steps for a bad resume to show.
    return MethodConfig(
        detector=DetectorConfig(backbone=BackboneConfig(name=opts["model"], pretrained=opts["weights"]),
                                dropout=0.0),
        optim=OptimConfig(epochs=EPOCHS, batch_size=opts["batch_size"], amp=True, schedule="cosine",
                          backbone_lr=1e-4, head_lr=1e-3, seed=0),
    )


def restored_state_report(setup: TrainingSetup, checkpoint: Path) -> dict:
    """Whether the resumed optimizer and scaler hold exactly the saved state, and where the optimizer state lives."""
    saved = torch.load(checkpoint / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    restored = setup.optimizer.state_dict()
    tensors = [(t, saved["optimizer"]["state"][i][k]) for i, state in restored["state"].items()
               for k, t in state.items() if torch.is_tensor(t)]
    report = {"optimizer_state_devices": sorted({str(t.device) for t, _ in tensors if t.dim() > 0}),
              "optimizer_restored": bool(tensors) and all(torch.equal(t.cpu(), s) for t, s in tensors),
              "scaler_restored": None}
    if setup.scaler is not None:
        report["scaler_restored"] = setup.scaler.state_dict() == saved["scaler"]
        report["scaler_state"] = setup.scaler.state_dict()
    return report


def train_epoch(setup: TrainingSetup, opts: dict, epoch: int, rank: int, *, fail: bool) -> None:
    """Synthetic batches, different on every rank and step but the same in every run (so runs can be compared)."""
    setup.model.train()
    size = setup.detector.preprocess.image_size
    for step in range(opts["steps_per_epoch"]):
        if fail and step == 1:  # every rank at the same point, so no collective is left waiting
            raise InjectedFailure(f"injected failure in epoch {epoch}")
        images, labels = synthetic_batch(opts["batch_size"], size, seed=(epoch * 1000 + step) * 10 + rank)
        train_step(setup.model, images, labels, setup.optimizer, scheduler=setup.scheduler, scaler=setup.scaler)
        setup.global_step += 1


def synthetic_batch(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator)
    return images, torch.arange(n, dtype=torch.float32) % 2


def probe_batch(size: int) -> torch.Tensor:
    return synthetic_batch(8, size, seed=424242)[0]


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(run_dir.glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
    return done[-1] if done else None


def launch(opts: dict, run_dir: Path, fail_at_epoch: int | None) -> dict:
    """Run two ranks to completion (or to the injected failure) and return rank 0's report."""
    report_file = run_dir / f"report-{time.monotonic_ns()}.json"
    opts = {**opts, "init_method": f"tcp://127.0.0.1:{free_port()}"}
    mp.spawn(rank_main, args=(opts, str(run_dir), fail_at_epoch, str(report_file)), nprocs=WORLD_SIZE, join=True)
    return json.loads(report_file.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------- the steps


def step_ddp_three_epochs(opts: dict, work: Path) -> dict:
    report = launch(opts, work / "uninterrupted", fail_at_epoch=None)
    epochs = report["epochs"]
    ok = (len(epochs) == EPOCHS and all(e["replicas_agree"] and e["params_on_device"] for e in epochs)
          and report["activation"] == "quick_gelu")
    return {"ok": ok, "backend": report["backend"], "activation": report["activation"],
            "replicas_agree_per_epoch": [e["replicas_agree"] for e in epochs]}


def step_failure_and_resume(opts: dict, work: Path) -> dict:
    run_dir = work / "interrupted"
    try:
        launch(opts, run_dir, fail_at_epoch=EPOCHS - 1)
        return {"ok": False, "why": "the injected failure did not stop the run"}
    except mp.ProcessRaisedException as err:
        if "injected failure" not in str(err):
            raise
    report = launch(opts, run_dir, fail_at_epoch=None)
    device_type = "cuda" if opts["device"] == "cuda" else "cpu"
    state_devices = report.get("optimizer_state_devices", [])
    resumed_right = (report["resumed"] and report["start_epoch"] == EPOCHS - 1
                     and report["start_step"] == (EPOCHS - 1) * opts["steps_per_epoch"]
                     and bool(state_devices) and all(d.startswith(device_type) for d in state_devices)
                     and report["optimizer_restored"] and report["scaler_restored"] in (True, None))
    last, before = work / "uninterrupted" / f"epoch-{EPOCHS - 1}", work / "uninterrupted" / f"epoch-{EPOCHS - 2}"
    off_by = weight_distance(run_dir / f"epoch-{EPOCHS - 1}", last)
    last_epoch_moved = weight_distance(before, last)
    share = off_by / max(last_epoch_moved, 1e-30)
    agree = all(e["replicas_agree"] for e in report["epochs"])
    return {"ok": resumed_right and agree and last_epoch_moved > 0 and share < RESUME_TOLERANCE,
            "start_epoch": report["start_epoch"], "optimizer_state_devices": state_devices,
            "optimizer_restored": report["optimizer_restored"], "scaler_restored": report["scaler_restored"],
            "replicas_agree": agree, "distance_to_uninterrupted": off_by, "uninterrupted_last_epoch_moved":
            last_epoch_moved, "share_of_last_epoch": share}


def weight_distance(a: Path, b: Path) -> float:
    """L2 distance between two checkpoints' weights."""
    wa, wb = load_checkpoint(a).state_dict(), load_checkpoint(b).state_dict()
    return sum(float((wa[k].double() - wb[k].double()).pow(2).sum()) for k in wa) ** 0.5


def step_checkpoint_reload(opts: dict, work: Path) -> dict:
    directory = work / "uninterrupted" / f"epoch-{EPOCHS - 1}"
    device = target_device(opts)
    restored = load_checkpoint(directory, map_location=device)
    expected = torch.load(directory / "probe_scores.pt", weights_only=True)
    got = restored.score_uint8(probe_batch(restored.preprocess.image_size))
    return {"ok": bool(torch.equal(got, expected)) and tower_activation(restored.visual) == "quick_gelu",
            "device": str(device), "max_abs_diff": float((got - expected).abs().max())}


def step_scoring_kernel(opts: dict, work: Path) -> dict:
    from mpft_core.scoring import decode_views

    directory = work / "uninterrupted" / f"epoch-{EPOCHS - 1}"
    on_device = load_checkpoint(directory, map_location=target_device(opts))
    on_cpu = load_checkpoint(directory, map_location="cpu")
    size = on_device.preprocess.image_size
    files = encoded_images(16, size)
    views, errors = decode_views(files, size)
    if any(errors):
        raise RuntimeError(f"the scoring kernel could not decode its own test images: {errors}")
    crops = torch.from_numpy(views)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    try:
        got, reference = on_device.score_uint8(crops), on_cpu.score_uint8(crops)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    diff = float((got - reference).abs().max())
    return {"ok": bool(torch.isfinite(got).all()) and diff < SCORE_TOLERANCE, "max_abs_diff_vs_cpu": diff}


def encoded_images(n: int, size: int) -> list[bytes]:
    """PNG and JPEG files of assorted sizes around the model input (some smaller: tiled, some larger: cropped)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = int(size * rng.uniform(0.6, 1.6)), int(size * rng.uniform(0.6, 1.6))
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format="PNG" if i % 2 else "JPEG")
        out.append(buffer.getvalue())
    return out


def step_throughput(opts: dict, work: Path) -> dict:
    device = target_device(opts)
    setup = setup_training(method_config(opts), device, total_steps=1000)
    size = setup.detector.preprocess.image_size
    batch = opts["throughput_batch"]
    images, labels = synthetic_batch(batch, size, seed=7)
    images = images.to(device)

    def timed(fn, repeats: int) -> float:
        fn()  # warm-up (kernel selection, allocator)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)
        return repeats * batch / (time.perf_counter() - start)

    train = timed(lambda: train_step(setup.model, images, labels, setup.optimizer, scaler=setup.scaler),
                  opts["throughput_repeats"])
    score = timed(lambda: setup.detector.score_uint8(images), opts["throughput_repeats"])
    return {"ok": train > 0 and score > 0, "model": opts["model"], "batch": batch,
            "train_images_per_s_amp": round(train, 1), "score_images_per_s_fp32": round(score, 1)}


def target_device(opts: dict) -> torch.device:
    return torch.device("cuda", 0) if opts["device"] == "cuda" else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


STEPS = [("ddp_three_epochs", step_ddp_three_epochs), ("failure_and_resume", step_failure_and_resume),
         ("checkpoint_reload", step_checkpoint_reload), ("scoring_kernel", step_scoring_kernel),
         ("throughput", step_throughput)]


# ------------------------------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model", default=None, help="open_clip ViT (default ViT-L-14 on cuda, mpft-tiny-32 on cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="per rank, in the two-process steps")
    parser.add_argument("--steps-per-epoch", type=int, default=4)
    parser.add_argument("--throughput-batch", type=int, default=None, help="default 64 on cuda, 8 on cpu")
    parser.add_argument("--throughput-repeats", type=int, default=10)
    parser.add_argument("--deadline-s", type=int, default=DEADLINE_S, help="start no step after this many seconds")
    parser.add_argument("--out", default=None, help="results JSON (default $OUT/gpu_check.json or "
                                                    "bench/results/gpu_check.json)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing was checked",
              file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = args.model or ("ViT-L-14" if args.device == "cuda" else "mpft-tiny-32")
    out = Path(args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                            else Path(__file__).parent / "results" / "gpu_check.json"))
    results = {"environment": environment(args.device), "model": model, "steps": {}}
    print(json.dumps(results["environment"]))
    failed, started_check = False, time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mpft-gpu-check-") as tmp:
        work = Path(tmp)
        opts = {"device": args.device, "model": model, "batch_size": args.batch_size,
                "steps_per_epoch": args.steps_per_epoch, "throughput_repeats": args.throughput_repeats,
                "throughput_batch": args.throughput_batch or (64 if args.device == "cuda" else 8),
                "weights": str(write_stand_in_weights(model, work / f"{model}-openai-like.safetensors"))}
        for name, step in STEPS:
            started = time.perf_counter()
            if time.monotonic() - started_check > args.deadline_s:
                outcome = {"ok": False, "error": f"not run: past the {args.deadline_s} s deadline"}
            else:
                outcome = run_step(step, opts, work)
            outcome["seconds"] = round(time.perf_counter() - started, 1)
            results["steps"][name] = outcome
            failed |= not outcome["ok"]
            shown = {k: v for k, v in outcome.items() if k not in ("ok", "trace")}
            print(f"{'PASS' if outcome['ok'] else 'FAIL'}  {name:20s} {json.dumps(shown)}", flush=True)
            write_results(out, {**results, "passed": not failed, "complete": False})  # survives a kill mid-check
    write_results(out, {**results, "passed": not failed, "complete": True})
    print(f"gpu-check: {'all steps passed' if not failed else 'FAILED'}; results in {out}")
    return 1 if failed else 0


def run_step(step, opts: dict, work: Path) -> dict:
    try:
        return step(opts, work)
    except Exception as err:  # noqa: BLE001 - a failed step is reported, the others still run
        return {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}


def write_results(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))


def environment(device: str) -> dict:
    info = {"torch": torch.__version__, "device": device, "python": sys.version.split()[0]}
    if device == "cuda":
        info.update(gpus=torch.cuda.device_count(), gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return info


def write_stand_in_weights(model: str, path: Path) -> Path:
    """Random weights of a QuickGELU tower, in a weight file that says so: the OpenAI weights' path, offline."""
    import open_clip

    register_shipped_configs()
    torch.manual_seed(0)
    save_clip_weights(open_clip.create_model(model, force_quick_gelu=True), path, "quick_gelu")
    return path


if __name__ == "__main__":
    sys.exit(main())
