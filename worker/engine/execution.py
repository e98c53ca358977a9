"""Where a job's model lives while it runs: `whole` on the device, or `onloaded` (kept in host memory, each
decoder layer moved to the device only while it is calibrated, pruned, quantized, evaluated or exported).

`plan_execution` is a pure function of the model's bytes, the extra memory the job's work needs beside it and
the device's free memory, so a test can pose any device. `job_working_bytes` estimates that extra need from
the model's shape and the job's windows. `ProcessPeaks` follows the peak GPU and host memory the report gives.
`cpu_threads_for` sizes the job's intra-op CPU threads to its model.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from worker.engine.evaluate.measure import read_peak_rss

WHOLE, ONLOADED = "whole", "onloaded"
FIXED_OVERHEAD_BYTES = 2 * 2**30  # CUDA context, cuBLAS workspaces, allocator fragmentation
LOGIT_COPIES = 4  # one window's logits: the model's, their float32 copy, log-softmax and the top-k work


@dataclass(frozen=True)
class ExecutionPlan:
    mode: str  # WHOLE or ONLOADED
    device: torch.device
    model_bytes: int
    working_bytes: int
    free_bytes: int | None  # None: no limit known (CPU: host and device are the same memory)
    reason: str

    @property
    def onloaded(self) -> bool:
        return self.mode == ONLOADED

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "device": str(self.device),
            "model_bytes": self.model_bytes,
            "working_bytes_estimate": self.working_bytes,
            "device_free_bytes": self.free_bytes,
            "reason": self.reason,
        }


def plan_execution(model_bytes: int, working_bytes: int, free_bytes: int | None, device: torch.device) -> ExecutionPlan:
    """`whole` when the model and the work beside it fit the device's free memory, else `onloaded`."""
    need = model_bytes + working_bytes
    if free_bytes is None:
        return ExecutionPlan(WHOLE, device, model_bytes, working_bytes, None, "no device memory limit known")
    gib = 2**30
    figures = f"model {model_bytes / gib:.1f} GiB + work {working_bytes / gib:.1f} GiB"
    if need <= free_bytes:
        reason = f"{figures} fit in {free_bytes / gib:.1f} GiB free on {device}"
        return ExecutionPlan(WHOLE, device, model_bytes, working_bytes, free_bytes, reason)
    reason = f"{figures} do not fit in {free_bytes / gib:.1f} GiB free on {device}: layers onloaded one at a time"
    return ExecutionPlan(ONLOADED, device, model_bytes, working_bytes, free_bytes, reason)


def job_working_bytes(
    config: Any, element_bytes: int, calibration: tuple[int, int] | None, evaluation: tuple[int, int] | None
) -> int:
    """An estimate of the device memory the job needs beside the weights (whichever stage needs most): a layer's
    activations for every window (model dtype; advancing replaces inputs by outputs), one Linear's float32 math
    (weight copies, a Hessian and its inverse), one window's activations and float32 logits, and a fixed
    overhead."""
    hidden = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    vocab = config.vocab_size
    widest = max(hidden, inner)
    linear_math = 4 * (4 * hidden * inner) + 2 * 4 * widest * widest
    stages = [linear_math]
    for windows in (calibration, evaluation):
        if windows is not None:
            count, seq = windows
            activations = count * seq * hidden * element_bytes
            one_window = seq * (3 * inner * element_bytes + LOGIT_COPIES * vocab * 4)
            stages.append(activations + one_window + linear_math)
    return max(stages) + FIXED_OVERHEAD_BYTES


PARAMETERS_PER_THREAD = 1_000_000


def cpu_threads_for(parameters: int, available: int) -> int:
    """Intra-op CPU threads for a model of `parameters` weights: one per PARAMETERS_PER_THREAD, at least one, at
    most `available`. A small model's matrix products are too small to split: each extra thread costs more to
    wake and synchronise than it saves, and on a shared machine its idle spinning takes other jobs' cores."""
    return max(1, min(available, parameters // PARAMETERS_PER_THREAD))


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """Run the block with `count` intra-op CPU threads, then give back the process's own setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_free_bytes(device: torch.device) -> int | None:
    """Memory this process may still allocate on a CUDA device: the free memory, and under a per-process cap
    (`torch.cuda.set_per_process_memory_fraction`) what is left of it; None for the CPU."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()  # mem_get_info needs one
    free, total = torch.cuda.mem_get_info(index)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if get_fraction is not None:
        cap = int(get_fraction(index) * total) - torch.cuda.memory_reserved(index)
        free = min(free, cap)
    return max(free, 0)


def _host_peak_bytes() -> int:
    """The process's peak resident set size: VmHWM where /proc has it, else getrusage's maxrss."""
    peak = read_peak_rss()
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ProcessPeaks:
    """Peak GPU memory (torch.cuda.max_memory_allocated) and peak host memory (the process's resident set
    high-water mark) over a job, sampled at every progress report: the evaluation resets both counters for
    its own figure, so the job's peak is the largest sample."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.gpu_bytes: int | None = 0 if device.type == "cuda" else None
        self.host_bytes = 0
        self.sample()

    def sample(self) -> None:
        if self.gpu_bytes is not None:
            self.gpu_bytes = max(self.gpu_bytes, int(torch.cuda.max_memory_allocated(self.device)))
        self.host_bytes = max(self.host_bytes, _host_peak_bytes())

    def to_dict(self) -> dict[str, Any]:
        self.sample()
        return {
            "peak_gpu_bytes": self.gpu_bytes,
            "peak_host_bytes": self.host_bytes,
            "peak_method": "GPU: torch.cuda.max_memory_allocated; host: the process's peak resident set size "
            "(VmHWM); both sampled at every progress report and at the end",
        }
