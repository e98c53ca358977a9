"""The metric report: baseline and optimized metrics of the same shape, steps, samples, environment, ratios."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import torch

from worker.engine.evaluate.measure import device_name

LIBRARIES = ("torch", "transformers", "compressed-tensors", "safetensors")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape an artifact (None when one is not installed)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name.replace("-", "_")] = None
    versions["torch"] = torch.__version__
    return versions


def environment(device: torch.device) -> dict[str, Any]:
    return {
        **library_versions(),
        "python": platform.python_version(),
        "device": device_name(device),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


DECOMPRESSED_SPEED_NOTE = (
    "no speed-up ratio: on a CPU worker the quantized artifact runs with its weights decompressed to float, so "
    "its timing cannot show what quantization buys; the sizes and memory still compare. Run the job on a CUDA "
    "worker for speed ratios measured on the low-bit kernels"
)


def ratios(
    baseline: dict[str, Any], optimized: dict[str, Any], speed_note: str | None = None
) -> dict[str, float | str | None]:
    """size and perplexity: optimized / baseline; speedups: baseline time / optimized time (>1 is faster), or
    None with `speed_note` saying why when the timings cannot compare what the recipe changed."""
    result: dict[str, float | str | None] = {
        "size": _ratio(optimized["size_bytes"], baseline["size_bytes"]),
        "perplexity": _ratio(optimized["perplexity"], baseline["perplexity"]),
        "prefill_speedup": _ratio(baseline["prefill_ms"], optimized["prefill_ms"]),
        "decode_speedup": _ratio(baseline["decode_ms_per_token"], optimized["decode_ms_per_token"]),
    }
    if speed_note is not None:
        result.update(prefill_speedup=None, decode_speedup=None, speed_note=speed_note)
    return result


def merge_samples(baseline: list[dict[str, str]], optimized: list[dict[str, str]]) -> list[dict[str, str]]:
    after = {sample["prompt"]: sample["text"] for sample in optimized}
    return [
        {"prompt": sample["prompt"], "baseline": sample["text"], "optimized": after.get(sample["prompt"])}
        for sample in baseline
    ]


def build_report(
    *,
    baseline: dict[str, Any],
    optimized: dict[str, Any],
    steps: list[dict[str, Any]],
    samples: list[dict[str, str]],
    device: torch.device,
    evaluation: dict[str, Any] | None,
    calibration: dict[str, Any] | None,
    notes: list[str],
    quantized: bool = False,
) -> dict[str, Any]:
    """`quantized`: the recipe quantized some layers (off CUDA their artifact is timed decompressed to float)."""
    speed_note = DECOMPRESSED_SPEED_NOTE if quantized and device.type != "cuda" else None
    return {
        "baseline": baseline,
        "optimized": optimized,
        "steps": steps,
        "samples": samples,
        "environment": environment(device),
        "ratios": ratios(baseline, optimized, speed_note),
        "evaluation": evaluation,
        "calibration": calibration,
        "notes": notes,
    }
