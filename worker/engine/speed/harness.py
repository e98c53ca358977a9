"""How fast a model runs: decode and prefill tokens/s, and the device's copy bandwidth (the decode floor).

The job report (evaluation.py) and benchmarks/gpu_speed.py measure with this same code.

- Model preparation lives in speed_model.py: `speed_copy` makes a copy in the serving dtype without doubling the
  quantized weights, and `convert_for_speed_` swaps quantized / 2:4 Linears for the kernel-backed modules of
  `kernels.py`, with `fuse` first fusing q/k/v and gate/up (`fused_projections.py`). This module times the result.
- Decode: greedy, from a fixed prompt, with transformers' own `StaticCache` (so any model whose layers it knows,
  Llama-family included). On CUDA the one-token step — `model(ids, cache=static_cache)` then argmax — is
  compiled with torch.compile (fullgraph, static shapes, CUDA graphs, and at batch 1 coordinate-descent tuning,
  which is what makes Inductor turn a one-row matmul into a fused matrix-vector reduction: gpt-fast's). The
  prompt's prefill runs eagerly. Timing: CUDA events around the decode loop, median of repeats after warm-ups
  (the first warm-up compiles, the second records the CUDA graph). Only the step is compiled, once per batch
  size, to keep compile time small; if compiling fails the step runs eagerly and the result says so.
- Prefill: one eager forward of the whole prompt into a static cache, logits of the last position only (what
  generate does). Eager because a 2048-token forward is compute bound.
- On CPU everything runs eagerly and is timed with time.perf_counter; each result's `method` says which path ran.
"""

from __future__ import annotations

import gc
import inspect
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

# Inductor options of the compiled decode step (mode "reduce-overhead" is {"triton.cudagraphs": True}; mode and
# options cannot both be given). Coordinate-descent tuning is what lets Inductor turn a one-row matmul into a
# tuned matrix-vector reduction with the weight's dequantization fused in (gpt-fast's setting); it only matters
# at batch 1, so larger batches skip it and compile faster.
COMPILE_OPTIONS = {"triton.cudagraphs": True}
BATCH_1_OPTIONS = {**COMPILE_OPTIONS, "coordinate_descent_tuning": True}


# --- Bytes a decode step reads --------------------------------------------------------------------------------


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a traceable subclass (a 2:4 sparse weight) counts its inner tensors."""
    if hasattr(type(tensor), "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(inner) for inner in (getattr(tensor, n) for n in names) if inner is not None)
    return tensor.numel() * tensor.element_size()


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers one decode step reads: all of them, each tensor once, except an
    input embedding table that the output layer does not share (a step reads one row of it)."""
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = set() if embedding is None or (output is not None and output.weight is embedding) else {id(embedding)}
    seen, total = set(skip), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += _tensor_bytes(tensor)
    return total


# --- Timing ---------------------------------------------------------------------------------------------------


def _timed_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on CUDA, time.perf_counter elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing_method(device: torch.device, warmup: int, repeats: int) -> str:
    clock = "CUDA events" if device.type == "cuda" else "time.perf_counter"
    return f"{clock}, median of {repeats} repeats after {warmup} warm-up runs"


@torch.no_grad()
def measure_copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, repeats: int = 10) -> dict[str, Any]:
    """Device-to-device copy of an `nbytes` buffer: bandwidth = 2 x bytes / time (read + write), median."""
    device = torch.device(device)
    source = torch.ones(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(2):
        target.copy_(source)
    _synchronize(device)
    times = [_timed_ms(lambda: target.copy_(source), device) for _ in range(repeats)]
    ms = statistics.median(times)
    return {
        "bytes_per_s": 2 * nbytes / (ms / 1000.0),
        "buffer_bytes": nbytes,
        "method": f"{device.type}: copy_ of a {nbytes / 2**30:.2f} GiB buffer, 2 x bytes / time; "
        + timing_method(device, 2, repeats),
    }


# --- transformers' static cache, whatever its version calls things --------------------------------------------


def _parameters(fn: Callable) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def cache_argument(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache: `cache` (transformers >= 5.2x) or `past_key_values`."""
    return "cache" if "cache" in _parameters(model.forward) else "past_key_values"


def new_static_cache(model: torch.nn.Module, max_len: int, batch: int) -> Any:
    """transformers' StaticCache for `max_len` positions (its layers allocate on the first update; older
    versions, which allocate up front, also get batch, device and dtype)."""
    from transformers import StaticCache

    accepted = _parameters(StaticCache.__init__)
    parameter = next(model.parameters())
    offered = {"max_batch_size": batch, "batch_size": batch, "device": parameter.device, "dtype": parameter.dtype}
    extra = {key: value for key, value in offered.items() if key in accepted}
    return StaticCache(config=model.config, max_cache_len=max_len, **extra)


# --- Decode and prefill ---------------------------------------------------------------------------------------


class StaticDecoder:
    """Greedy decoding of one batch with a static KV cache; the one-token step compiled when `compiled`."""

    def __init__(
        self, model: torch.nn.Module, batch: int, max_len: int, compiled: bool, backend: str = "inductor"
    ) -> None:
        self.model, self.compiled = model, compiled
        self.cache = new_static_cache(model, max_len, batch)
        self.kwargs: dict[str, Any] = {cache_argument(model): self.cache, "use_cache": True}
        if "logits_to_keep" in _parameters(model.forward):
            self.kwargs["logits_to_keep"] = 1  # the prefill computes the last position's logits only
        self._step = self._next
        if compiled:
            options = dict(BATCH_1_OPTIONS if batch == 1 else COMPILE_OPTIONS) if backend == "inductor" else None
            self._step = torch.compile(self._next, fullgraph=True, dynamic=False, backend=backend, options=options)

    def _next(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=ids, **self.kwargs).logits
        return logits[:, -1, :].argmax(dim=-1, keepdim=True)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Empty the cache, run the prompt eagerly; the first new token of each row, (batch, 1)."""
        self.cache.reset()
        return self._next(prompt)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """`steps` one-token steps after `ids`; the tokens they produce."""
        tokens = []
        for _ in range(steps):
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            ids = self._step(ids).clone()  # a CUDA-graph output is overwritten by the next replay
            tokens.append(ids)
        return tokens

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """(batch, new_tokens) greedy tokens: the prefill's, then new_tokens - 1 decode steps."""
        first = self.prefill(prompt)
        return torch.cat([first, *self.decode(first, new_tokens - 1)], dim=1)


def greedy_tokens(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, compiled: bool = False, backend: str = "inductor"
) -> torch.Tensor:
    """The harness's decode loop used as a generator: (batch, new_tokens) greedy tokens after `prompt`."""
    decoder = StaticDecoder(model, prompt.shape[0], prompt.shape[1] + new_tokens, compiled, backend)
    return decoder.generate(prompt, new_tokens)


def _decode_once(model, prompt: torch.Tensor, steps: int, compiled: bool, warmup: int, repeats: int) -> dict:
    device = prompt.device
    if compiled:
        torch._dynamo.reset()  # a fresh compile for this model and batch (no stale graphs, no recompile limit)
    before = _compile_counters()
    decoder = StaticDecoder(model, prompt.shape[0], prompt.shape[1] + steps + 1, compiled)
    started = time.perf_counter()
    decoder.generate(prompt, steps + 1)  # compiles; the second run records the CUDA graph
    _synchronize(device)
    first_run_s = time.perf_counter() - started
    for _ in range(warmup - 1):
        decoder.generate(prompt, steps + 1)
    times = []
    for _ in range(repeats):
        first = decoder.prefill(prompt)
        _synchronize(device)
        times.append(_timed_ms(lambda first=first: decoder.decode(first, steps), device))
    ms = statistics.median(times)
    batch = prompt.shape[0]
    result = {
        "batch": batch,
        "prompt_tokens": prompt.shape[1],
        "steps": steps,
        "ms_per_step": ms / steps,
        "tokens_per_s": batch * steps / (ms / 1000.0),
        "compiled": compiled,
        "first_run_s": first_run_s,
    }
    if compiled:  # 1 graph and no CUDA-graph skip is the intended path; anything else explains a slow figure
        after = _compile_counters()
        result.update({key: after[key] - before[key] for key in after})
        if device.type != "cuda":
            del result["cudagraph_skips"]  # CUDA graphs exist on CUDA only
    return result


def _compile_counters() -> dict[str, int]:
    """Dynamo's count of compiled graphs and Inductor's count of CUDA-graph skips (they accumulate)."""
    from torch._dynamo.utils import counters

    return {
        "graphs_compiled": int(counters["stats"]["unique_graphs"]),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }


def measure_decode(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    steps: int,
    *,
    compiled: bool | None = None,
    warmup: int = 2,
    repeats: int = 5,
) -> dict[str, Any]:
    """Greedy decode tokens/s of a batch (prompt (batch, length), on the model's device) over `steps`
    one-token steps after the prompt's prefill, which is not timed. Compiled on CUDA unless told otherwise;
    a compile failure falls back to the eager step and is reported as `compile_error`."""
    compiled = prompt.device.type == "cuda" if compiled is None else compiled
    if compiled:
        try:
            return _decode_once(model, prompt, steps, True, warmup, repeats)
        except Exception as exc:  # noqa: BLE001 - any compile failure: measure eagerly, say why
            error = f"{type(exc).__name__}: {exc}"[:600]
            log.warning("compiled decode failed, timing the eager step: %s", error)
            torch._dynamo.reset()
            return {**_decode_once(model, prompt, steps, False, 1, repeats), "compile_error": error}
    return _decode_once(model, prompt, steps, False, warmup, repeats)


@torch.no_grad()
def measure_prefill(model: torch.nn.Module, ids: torch.Tensor, *, warmup: int = 1, repeats: int = 5) -> dict:
    """Eager forward of `ids` (batch, length) into an empty static cache, last position's logits only."""
    device = ids.device
    cache = new_static_cache(model, ids.shape[1], ids.shape[0])
    kwargs: dict[str, Any] = {cache_argument(model): cache, "use_cache": True}
    if "logits_to_keep" in _parameters(model.forward):
        kwargs["logits_to_keep"] = 1
    times = []
    for i in range(warmup + repeats):
        cache.reset()
        _synchronize(device)
        ms = _timed_ms(lambda: model(input_ids=ids, **kwargs), device)
        if i >= warmup:
            times.append(ms)
    ms = statistics.median(times)
    return {"batch": ids.shape[0], "tokens": ids.shape[1], "ms": ms, "tokens_per_s": ids.numel() / (ms / 1000.0)}


def harness_method(device: torch.device, compiled: bool, warmup: int, repeats: int) -> str:
    """What the harness measured, in words."""
    if compiled:
        path = (
            f"{device.type}: transformers forward with a static KV cache, greedy; the one-token decode step "
            "compiled (torch.compile fullgraph, static shapes, CUDA graphs; coordinate-descent tuning at batch 1), the "
            "prompt's prefill eager; a decode entry with `compile_error` fell back to the eager step"
        )
    else:
        path = (
            f"{device.type}: eager transformers forward with a static KV cache, greedy (no torch.compile, "
            "no CUDA graphs)"
        )
    return f"{path}; {timing_method(device, warmup, repeats)}"


def time_model(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    prefill_ids: torch.Tensor,
    steps: int,
    *,
    batch_sizes: tuple[int, ...] = (1,),
    compiled: bool | None = None,
    repeats: int = 3,
) -> dict[str, Any]:
    """Decode tokens/s at each batch size (rows of `prompt` repeated as needed) and prefill tokens/s of
    `prefill_ids`, on the model as it is, with the harness's `method`."""
    device = prompt.device
    compiled = device.type == "cuda" if compiled is None else compiled
    warmup = 2 if compiled else 1
    decode = []
    for batch in batch_sizes:
        rows = prompt.repeat((batch + prompt.shape[0] - 1) // prompt.shape[0], 1)[:batch].contiguous()
        decode.append(measure_decode(model, rows, steps, compiled=compiled, warmup=warmup, repeats=repeats))
    return {
        "decode": decode,
        "prefill": measure_prefill(model, prefill_ids, repeats=repeats),
        "weight_bytes_per_token": decode_weight_bytes(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "method": harness_method(device, compiled, warmup, repeats),
    }


def release_compiled(device: torch.device) -> None:
    """Drop compiled graphs, CUDA graph pools and cached blocks (between models)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
