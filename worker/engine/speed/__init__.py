"""Speed: how fast a model prefills and decodes, on the kernels it would be served with.

Everything else reaches this room through `measure_speed`, so a library's kernels can replace ours here
without touching the pipeline. Inside: the timing harness (static cache, torch.compile and CUDA graphs on
CUDA), the low-bit kernels and their modules, the Triton GEMV, fused projections and copy-free decode attention.
"""

from __future__ import annotations

import torch

from worker.engine.speed.conversion import convert_for_speed_, kernel_counts, speed_copy
from worker.engine.speed.decode_attention import attention_label, use_grouped_decode_attention_
from worker.engine.speed.harness import measure_copy_bandwidth, release_compiled, time_model
from worker.engine.speed.kernels import semi_structured_violations
from worker.engine.steps import QuantizedWeight

SERVING_DTYPE = torch.bfloat16  # what both models are timed in on CUDA (tinygemm and rowwise fp8 write bf16)
CUDA_SPEED_PATH = (
    "cuda: both models timed in bfloat16 with the harness of worker/engine/speed/harness.py (the benchmark's "
    "code): the baseline is the uploaded model cast to bfloat16; in the optimized model every quantized (and, "
    "where all pruned layers are 2:4, every pruned) Linear runs the low-bit kernel listed under `kernels`. "
    "In both, each Llama-style attention's q/k/v and MLP's gate/up Linears are fused into one (`kernels` counts "
    "them), and a grouped-query model decodes with the copy-free attention of "
    "worker/engine/speed/decode_attention.py (`attention`). Embeddings, norms and untargeted Linears stay bfloat16"
)
CPU_SPEED_PATH = (
    "cpu: eager transformers forward on each model as evaluated (float32): the optimized model is the reloaded "
    "artifact, whose compressed-tensors weights transformers decompresses to float, so no low-bit kernel runs "
    "and the CPU figures do not show what quantization buys on a GPU"
)


def measure_speed(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    prefill_ids: torch.Tensor,
    decode_tokens: int,
    *,
    repeats: int = 3,
    records: dict[str, QuantizedWeight] | None = None,
    sparse_24: set[str] | frozenset[str] = frozenset(),
    fuse: bool = True,
) -> dict:
    """Decode and prefill speed at batch 1.

    `records` None: the model as it is (eager on CPU, the decode step compiled on CUDA). `records` given (empty
    for a baseline): a bfloat16 copy whose quantized and 2:4 Linears run the low-bit kernels; the model itself
    is not changed (the copy shares its quantized float weights until they are converted). With `fuse`, the
    copy's Llama-style q/k/v and gate/up Linears are fused first, and a grouped-query copy decodes with the
    copy-free attention.
    """
    if records is None:
        return time_model(model, prompt, prefill_ids, decode_tokens, repeats=repeats)
    device = prompt.device
    fast = speed_copy(model, SERVING_DTYPE, set(records) | set(sparse_24))
    try:
        kernels = convert_for_speed_(fast, records, set(sparse_24), device, SERVING_DTYPE, fuse=fuse)
        if fuse:
            use_grouped_decode_attention_(fast)
        attention = attention_label(fast)
        speed = time_model(fast, prompt, prefill_ids, decode_tokens, repeats=repeats)
    finally:
        del fast
        release_compiled(device)
    return {**speed, "kernels": kernel_counts(kernels), "attention": attention}


__all__ = [
    "CPU_SPEED_PATH",
    "CUDA_SPEED_PATH",
    "SERVING_DTYPE",
    "measure_copy_bandwidth",
    "measure_speed",
    "semi_structured_violations",
]
