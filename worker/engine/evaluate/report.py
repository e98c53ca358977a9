"""The metric report: baseline and optimized metrics of the same shape, steps, samples, environment, ratios,
the quality figures (KL divergence to the baseline, task accuracy) and the per-layer damage of the recipe's steps."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import torch

from worker.engine.evaluate.measure import device_name

LIBRARIES = ("torch", "transformers", "compressed-tensors", "safetensors")
WORST_LAYERS = 5
MEASURES = {
    "gram": "output error from the Gram matrix XᵀX of the layer's calibration inputs",
    "outputs": "output error measured on the layer's outputs over the first calibration windows",
    "input_norms": "output error from the layer's calibration input norms (diagonal of XᵀX; Wanda's statistic)",
    None: "weight error ‖W − Ŵ‖/‖W‖ (the step gathered no calibration statistics)",
}


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


def layer_error(layer: dict[str, Any]) -> tuple[float, str | None]:
    """A layer's damage figure and what it rests on: its output error where measured, else its weight error."""
    if layer.get("output_error") is not None:
        return layer["output_error"], layer.get("output_error_from")
    return layer["relative_error"], None


def damage_section(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's `damage`: per step, the mean and largest damage over its changed Linears; overall, the
    `WORST_LAYERS` layers with the largest damage. Read from the steps' layer records (`calibrate.layer_damage`),
    so it costs nothing; steps whose layers carry no damage fields (distillation, which retrains every weight) are
    listed under `not_measured`."""
    ranked, per_step, not_measured = [], [], []
    for step in steps:
        key = f"{step['type']}:{step['method']}"
        layers = [layer for layer in step["layers"] if isinstance(layer, dict) and "relative_error" in layer]
        if not layers:
            not_measured.append({"step": step["index"], "key": key})
            continue
        errors = []
        for layer in layers:
            error, source = layer_error(layer)
            errors.append(error)
            ranked.append(
                {
                    "step": step["index"],
                    "key": key,
                    "layer": layer["name"],
                    "output_error": layer.get("output_error"),
                    "relative_error": layer["relative_error"],
                    "error": error,
                    "measure": "weight" if source is None else f"output ({source})",
                }
            )
        sources = sorted({str(layer_error(layer)[1]) for layer in layers})
        per_step.append(
            {
                "step": step["index"],
                "key": key,
                "layers": len(layers),
                "mean_error": sum(errors) / len(errors),
                "max_error": max(errors),
                "measure": ", ".join("weight" if s == "None" else f"output ({s})" for s in sources),
            }
        )
    ranked.sort(key=lambda entry: entry["error"], reverse=True)
    return {
        "worst": ranked[:WORST_LAYERS],
        "steps": per_step,
        "not_measured": not_measured,
        "method": "per changed Linear, `error` is its output error ‖XWᵀ − XŴᵀ‖/‖XWᵀ‖ on the calibration inputs the "
        "step saw where it gathered statistics, else its weight error; `measure` says which: "
        + "; ".join(f"{'weight' if k is None else f'output ({k})'}: {v}" for k, v in MEASURES.items()),
    }


TASKS_METHOD = (
    "lm-eval-harness (HFLM around the model in memory, zero-shot unless the task sets num_fewshot): `accuracy` is "
    "lm-eval's acc (the share of documents whose correct choice gets the highest log-likelihood), `stderr` its "
    "standard error (sample standard deviation / √n), `n` the documents scored; `drop` is baseline − optimized "
    "accuracy (positive: the recipe lost accuracy). The optimized model is the artifact reloaded from disk"
)


def tasks_section(baseline: list[dict[str, Any]], optimized: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`quality.tasks`: per task, baseline and optimized accuracy with their standard errors, and the drop; a
    task that could not be scored on either model carries `error` instead."""
    entries = []
    for before, after in zip(baseline, optimized, strict=True):
        entry: dict[str, Any] = {"task": before.get("task") or after.get("task"), "source": before["source"]}
        error = before.get("error") or after.get("error")
        if error is not None:
            entries.append({**entry, "error": error, "baseline": None, "optimized": None, "drop": None})
            continue
        scores = {
            name: {key: model[key] for key in ("accuracy", "stderr", "n", "accuracy_norm") if key in model}
            for name, model in (("baseline", before), ("optimized", after))
        }
        entries.append({**entry, **scores, "drop": before["accuracy"] - after["accuracy"], "error": None})
    return entries


def quality_section(kl_divergence: dict[str, Any] | None, tasks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The report's `quality`: the KL divergence of the optimized model to the baseline (null without data) and,
    when the job asks for tasks, their accuracy before and after (`tasks`, null when none were asked)."""
    return {
        "kl_divergence": kl_divergence,
        "tasks": tasks or None,
        "tasks_method": TASKS_METHOD if tasks else None,
        "note": None if kl_divergence is not None else "no evaluation dataset: the KL divergence was not measured",
    }


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
    kl_divergence: dict[str, Any] | None = None,
    tasks: list[dict[str, Any]] | None = None,
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
        "quality": quality_section(kl_divergence, tasks),
        "damage": damage_section(steps),
        "evaluation": evaluation,
        "calibration": calibration,
        "notes": notes,
    }
