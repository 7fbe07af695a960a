"""What a scoring pass is given, as plain data: which model (``ResolvedModel``) and how much of the cluster
(``ScoringResources``).

Importable without Ray, MLflow or torch: ``jobs/tracking.py`` returns ``ResolvedModel`` from the registry, and the
``mpft score`` / ``mpft evaluate`` flags take their defaults and help from ``ScoringResources`` while ``mpft --help``
stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mpft_core.imageio import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved to a local checkpoint folder (``model.safetensors`` + ``mpft.json``), and the
    identity its score rows carry.

    ``uri`` names these weights for good where it can: ``models:/name/<version>`` for a registry reference (not the
    alias it came through), the absolute folder for a local checkpoint, else the reference as given (``runs:/...``,
    ``s3://...``). ``name`` and ``version`` are the registry's, None outside it.
    """

    checkpoint_dir: str
    uri: str
    name: Optional[str] = None
    version: Optional[str] = None


def _resource(default, help_text: str, **metadata):
    """A ``ScoringResources`` field whose command-line flag (``jobs.common.add_resource_arguments``) takes its
    default and help text from here; ``flag`` in ``metadata`` overrides the flag's name (``--use-gpu``)."""
    return field(default=default, metadata={"help": help_text, **metadata})


@dataclass(frozen=True, kw_only=True)
class ScoringResources:
    """How a scoring pass runs (``ScoreJob.resources``, ``EvalOptions.resources``): batch and block sizes, the actor
    pool and what each actor gets, CPUs per decode task, the pixel limit, and how much decoded data may wait.

    ``buffer_mib`` caps the object-store memory the pass holds at once (decoded crops queued for the model, scored
    rows queued for the writer). Decoding is far faster than the model on a CPU, so without a cap the decode stage
    runs ahead until Ray Data's default budget (a share of the node's object store) is full: memory would then
    depend on the input's size up to that budget. With the cap, memory is the same for 2k or 20M inputs; a few
    hundred MiB keeps the model fed (one 224 px crop is 147 KiB, so 512 MiB is ~3,500 images).

    ``rows_per_block`` is 128, the block size ``bench/score_throughput.py`` measured the scoring pipeline with.
    """

    batch_size: int = _resource(64, "images per model call")
    num_actors: int = _resource(0, "scoring actors (model replicas); 0: fill the cluster, one per GPU with --gpu, "
                                   "else one per --torch-threads CPU cores")
    actor_cpus: float = _resource(0.5, "CPUs Ray reserves per scoring actor (a scheduling figure: leave some for "
                                       "decoding)")
    torch_threads: int = _resource(1, "torch intra-op threads per actor")
    use_gpu: bool = _resource(False, "one GPU per scoring actor", flag="--gpu")
    decode_cpus: float = _resource(0.5, "CPUs per read/decode task")
    max_pixels: int = _resource(DEFAULT_MAX_PIXELS, "refuse larger images (decompression bombs)")
    rows_per_block: int = _resource(128, "files per read/decode task (fewer, larger tasks cost Ray less per image)")
    max_tasks_in_flight_per_actor: int = _resource(2, "batches queued per scoring actor, so it never waits for "
                                                      "the next one")
    buffer_mib: int = _resource(512, "object-store memory the pass may hold (decoded images waiting for the model); "
                                     "0: Ray's default share of the node's object store")
