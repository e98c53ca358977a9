"""Capability-aware routing: what a job needs (GPU memory, or no GPU at all) and which Celery queue carries it.

The API estimates a job's need at submission from the inspected model (parameter count, widths) and the recipe,
and sends it to the queue of the smallest memory class that holds it. A worker consumes the queue of every class
its GPU can serve (and the CPU class, which every worker serves), so a job only ever reaches a worker that can
run it. No torch here: the API imports this module.

Queue names are `<MODELPRESS_QUEUE>.<class>`: `modelpress.cpu`, `modelpress.gpu-24`, `modelpress.gpu-48`,
`modelpress.gpu-80`, `modelpress.gpu-141` with the default namespace. A class `gpu-N` promises
`USABLE_FRACTION` × N GB: a job estimated at 40 GB goes to `gpu-48` (43.2 GB), and a card of 46 GB serves it.

The estimate follows what the engine holds on the GPU at its peak (docs/fleet.md): the model in bf16, plus for
steps that learn from calibration text one decoder layer's inputs and outputs over every calibration window and
one Linear's Hessian; for distillation the teacher in bf16 plus the student with its gradients and AdamW moments
(`offload: false`), or, where teacher and optimizer state stay on the host (`offload: true`, and `"auto"`, which
chooses that mode where the other does not fit), the model; both with the training activations. It is an
estimate, meant to pick a class, not to promise a peak.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from modelpress.specs import JobSpec, KnowledgeDistill

GB = 10**9
GPU_CLASSES_GB = (24, 48, 80, 141)
"""GPU memory classes by their nominal size in GB (consumer 24 GB, 48 GB workstation, 80 GB H100/A100, 141 GB H200)."""
USABLE_FRACTION = 0.9
"""The share of a class's nominal memory a job may be estimated to need; the rest is the CUDA context and slack."""
CPU_CLASS = "cpu"
RUNTIME_OVERHEAD_BYTES = 2 * 1024**3
"""The CUDA context, the tokenizer, evaluation buffers: what any job holds beside its model and step state."""
DEFAULT_WIDTH = 4096
"""The hidden width assumed for a model whose inspection recorded none (a GGUF upload without the key)."""


def class_name(gigabytes: int) -> str:
    return f"gpu-{gigabytes}"


def class_capacity(gigabytes: int) -> int:
    """Bytes a job routed to the class may need; a card with at least this much memory serves the class."""
    return int(USABLE_FRACTION * gigabytes * GB)


def queue_name(namespace: str, memory_class: str) -> str:
    """The Celery queue of a memory class within a deployment's namespace (`MODELPRESS_QUEUE`)."""
    return f"{namespace}.{memory_class}"


def all_classes() -> list[str]:
    return [CPU_CLASS, *(class_name(size) for size in GPU_CLASSES_GB)]


@dataclass(frozen=True)
class Need:
    """What a job needs from a worker: `memory_bytes` of working memory, on a GPU unless `memory_class` is cpu."""

    memory_bytes: int
    memory_class: str

    @property
    def gpu(self) -> bool:
        return self.memory_class != CPU_CLASS

    @property
    def gigabytes(self) -> int:
        return int(self.memory_class.removeprefix("gpu-")) if self.gpu else 0


def _width(details: dict[str, Any]) -> int:
    return int(details.get("hidden_size") or DEFAULT_WIDTH)


def _widest_input(details: dict[str, Any]) -> int:
    linears = details.get("linears") or {}
    widths = [int(shape[1]) for shape in linears.values()] or list(details.get("linear_in_features") or [])
    return max(widths, default=4 * _width(details))


def _calibration_bytes(spec: JobSpec, details: dict[str, Any]) -> int:
    """One layer's float32 inputs and outputs over every calibration window, and one float32 Hessian."""
    if spec.calibration is None:
        return 0
    tokens = spec.calibration.samples * spec.calibration.seq_len
    return 2 * tokens * _width(details) * 4 + _widest_input(details) ** 2 * 4


def _activation_bytes(step: KnowledgeDistill, details: dict[str, Any]) -> int:
    """Training activations as `fast_footprint` in worker/engine/distill/modes.py counts them, from the config."""
    hidden, vocab = _width(details), int(details.get("vocab_size") or 32000)
    layers = int(details.get("num_hidden_layers") or 32)
    inner = int(details.get("intermediate_size") or 4 * hidden)
    per_token = 2 * (layers * hidden + 4 * hidden + 3 * inner + 3 * vocab)
    return step.batch_size * step.seq_len * per_token + 6 * step.seq_len * vocab * 4


def estimate_memory(parameters: int, details: dict[str, Any], spec: JobSpec) -> int:
    """Peak working memory in bytes of a job on `parameters` parameters (bf16 on the GPU), over its steps."""
    model = 2 * parameters
    peak = model
    for step in spec.recipe:
        if isinstance(step, KnowledgeDistill):
            # offload false: the bf16 teacher, the student's bf16 weights, gradients and two AdamW moments;
            # otherwise the teacher and the optimizer state stay on the host and only the model is on the GPU
            held = model + 8 * parameters if step.offload is False else model
            peak = max(peak, held + _activation_bytes(step, details))
        elif step.needs_calibration:
            peak = max(peak, model + _calibration_bytes(spec, details))
    if spec.evaluation is not None:
        vocab = int(details.get("vocab_size") or 32000)
        peak = max(peak, model + 3 * spec.evaluation.seq_len * vocab * 4)  # logits, log-softmax, baseline top-k
    return peak + RUNTIME_OVERHEAD_BYTES


def route(parameters: int, details: dict[str, Any], spec: JobSpec, cpu_max_bytes: int) -> Need:
    """The smallest class that holds the job: the CPU one up to `cpu_max_bytes` (MODELPRESS_CPU_JOB_MAX_BYTES),
    else a GPU class; a job larger than every class goes to the largest, the nearest to holding it."""
    need = estimate_memory(parameters, details, spec)
    if need <= cpu_max_bytes:
        return Need(need, CPU_CLASS)
    fitting = [size for size in GPU_CLASSES_GB if class_capacity(size) >= need]
    return Need(need, class_name(fitting[0] if fitting else GPU_CLASSES_GB[-1]))


def classes_served(gpu_memory_bytes: Iterable[int]) -> list[str]:
    """The classes a worker serves: the CPU class always, and each GPU class its smallest card holds (a job runs
    on one card of the worker, whichever it gets)."""
    memory = list(gpu_memory_bytes)
    if not memory:
        return [CPU_CLASS]
    smallest = min(memory)
    return [CPU_CLASS, *(class_name(size) for size in GPU_CLASSES_GB if smallest >= class_capacity(size))]


def waiting_reason(need: Need, live_classes: Iterable[str]) -> str | None:
    """Why a queued job cannot start, in words for its owner; None when a live worker serves its class."""
    if need.memory_class in set(live_classes):
        return None
    if not need.gpu:
        return "waiting for a worker: none is running"
    return (
        f"waiting for a worker with ≥ {need.gigabytes} GB of GPU memory (the job needs about "
        f"{need.memory_bytes / GB:.1f} GB); none is running"
    )
