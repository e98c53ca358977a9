"""Low-level measurements: timers, peak memory, parameter counts and byte sizes. Each labels its method."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# parameters compressed-tensors attaches next to a quantized weight; not model parameters in the usual sense
QPARAM_NAMES = frozenset({"weight_scale", "weight_zero_point", "weight_shape", "weight_global_scale", "weight_packed"})


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` in milliseconds, after warm-up calls, with the device synchronized around it."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def read_peak_rss() -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def _reset_vm_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Peak memory over a block. CUDA: torch.cuda.max_memory_allocated after a reset (tensors on the GPU).
    CPU: the process's peak resident set size (VmHWM), reset through /proc/self/clear_refs before the block;
    it counts the whole process (Python, libraries, the model), not the model alone. None where unavailable."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None
        self.method = ""
        self._can_reset = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda: torch.cuda.max_memory_allocated over the evaluation (reset before)"
        else:
            self._can_reset = _reset_vm_hwm()
            self.method = (
                "cpu: process peak resident set size (VmHWM) over the evaluation, reset before; whole process"
                if self._can_reset
                else "cpu: peak resident set size could not be reset on this system; not measured"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self._can_reset:
            self.bytes = read_peak_rss()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters) of the model's weights, each tied tensor once, quantization
    scales and zero points excluded."""
    total = nonzero = 0
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in QPARAM_NAMES:
            continue
        total += param.numel()
        nonzero += int(torch.count_nonzero(param))
    return total, nonzero


def tensor_bytes_in_memory(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as they sit in memory now, each tensor once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes of tensor data `save_pretrained` would write (state dict, tied tensors once), headers excluded."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.numel())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def safetensors_bytes(folder: Path) -> int:
    """Bytes of the *.safetensors files in a folder, as stored on disk."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"
