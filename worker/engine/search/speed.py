"""The `decode_speed` objective: decode tokens/s measured on the serving kernels where the worker has CUDA, the
bytes-moved model elsewhere.

On CUDA every built candidate (and the baseline) is timed by the speed room's `measure_speed` with its quantized
layers' records: a bfloat16 copy whose quantized Linears run the low-bit kernels, the decode step compiled, at
batch 1 after a prompt cut from the first evaluation window. On a CPU no low-bit kernel runs (the reloaded
artifact is float), so a timing there would not show what the formats buy; the objective is then the weight
bytes every decoded token reads from the Linears. Each candidate says which one it carries (`speed_source`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.engine.speed import measure_speed
from worker.engine.steps import QuantizedWeight

DECODE_TOKENS = 32
PROMPT_TOKENS = 128
REPEATS = 3

DecodeSpeedFn = Callable[[torch.nn.Module, dict[str, QuantizedWeight], torch.Tensor], dict | None]
"""(model, its quantized layers' records, prompt (1, tokens) on the model's device) → {tokens_per_s,
ms_per_token, method, …}, or None where the decode speed is not measured."""

MEASURED = "measured"
MODEL = "model"


def speed_prompt(model: torch.nn.Module, windows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The decode prompt: the first evaluation window's first tokens, leaving room for the decoded ones within the
    model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None) or windows.shape[1] + DECODE_TOKENS + 1
    length = max(1, min(PROMPT_TOKENS, windows.shape[1], limit - DECODE_TOKENS - 1))
    return windows[:1, :length].to(device)


def measured_decode_speed(
    model: torch.nn.Module, records: dict[str, QuantizedWeight], prompt: torch.Tensor
) -> dict | None:
    """Decode tokens/s at batch 1 on the serving kernels, or None off CUDA (the speed model stands there)."""
    if prompt.device.type != "cuda":
        return None
    result = measure_speed(model, prompt, prompt, DECODE_TOKENS, repeats=REPEATS, records=records)
    decode = result["decode"][0]
    return {
        "tokens_per_s": decode["tokens_per_s"],
        "ms_per_token": decode["ms_per_step"],
        "method": result["method"],
        "kernels": result.get("kernels"),
        "dtype": result.get("dtype"),
    }


def all_measured(records: list[dict]) -> bool:
    """Whether every candidate carries a measured decode speed (a choice never mixes measured and modelled
    figures: one candidate without a timing puts them all on the model)."""
    return bool(records) and all(r.get("speed_source") == MEASURED for r in records)
