"""Where a batch-1 decode step spends its time: single matrix-vector kernels, and the
kernels of one compiled decode step of a few Llama-3-8B-sized layers.

Part 1, matrix-vector probes: one weight of each Llama-3-8B shape at one row of input, for each way of
computing it (cuBLAS, Inductor's fused reduction, tinygemm, `_scaled_mm`, ...). Each probe reports the kernel
time per call from the profiler, the time per call replayed in a CUDA graph of 20 calls (what a compiled
decode step pays, launch gaps included), and the bandwidth that means for the weight's bytes.

Part 2, decode-step profile: a Llama of `--layers` decoder layers at the 8B width (vocabulary included),
q/k/v and gate/up fused as benchmarks/gpu_speed.py fuses them (`--no-fuse` to keep them apart), each
configuration converted as gpu_speed does, its one-token step compiled as the harness compiles it (without CUDA
graphs, so that the profiler sees each kernel), and the kernels of one step listed by time. A configuration is
VARIANT[:ATTENTION[:nocd]]: ATTENTION is `sdpa` (transformers' own), `grouped` (decode_attention.py, the
default) or `grouped-sdpa` (the same grouping through SDPA's kernel); `nocd` turns
coordinate-descent tuning off, so one-row products stay cuBLAS calls.

    python benchmarks/gpu_probe.py [--part gemv,step] [--layers 4] [--configs bf16:sdpa,bf16,int4,...]
        [--no-fuse] [--out benchmarks/gpu_probe_DATE.json]

Part 3 (`--part host`): is the harness's decode step bound by the host? See `host_overheads`.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_speed import LLAMA3_8B, apply_variant, build_model, environment, restore  # noqa: E402
from worker.engine.speed import decode_attention  # noqa: E402
from worker.engine.speed.fused_projections import fuse_projections_  # noqa: E402
from worker.engine.speed.harness import BATCH_1_OPTIONS, StaticDecoder, measure_copy_bandwidth  # noqa: E402
from worker.engine.speed.kernel_modules import Int4TinyGemmLinear, tinygemm_pack, tinygemm_scales_and_zeros  # noqa: E402
from worker.engine.speed.kernels import int_codes, kernel_linear, plain_record  # noqa: E402

log = logging.getLogger("gpu_probe")

SHAPES = {  # (out, in) of one decoder layer's weights; q/k/v and gate/up also stacked
    "down 4096x14336": (4096, 14336),
    "gate 14336x4096": (14336, 4096),
    "gate+up 28672x4096": (28672, 4096),
    "q 4096x4096": (4096, 4096),
    "k 1024x4096": (1024, 4096),
    "qkv 6144x4096": (6144, 4096),
}
GRAPH_CALLS = 20


def profiled_kernel_us(fn: Callable[[], Any], calls: int = 20) -> tuple[float, list[tuple[str, float]]]:
    """Kernel time per call (µs) from the profiler, and the kernels of one call by time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.time_range.elapsed_us() / calls
    ranked = sorted(kernels.items(), key=lambda item: -item[1])
    return sum(kernels.values()), [(name[:90], round(us, 2)) for name, us in ranked]


def graph_us(fn: Callable[[], Any], calls: int = GRAPH_CALLS, repeats: int = 20) -> float:
    """Per call, µs, of `calls` calls captured in one CUDA graph and replayed (median of replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


# --- Candidate matrix-vector forms ------------------------------------------------------------------------------


def gemv_candidates(n: int, k: int, device: torch.device) -> dict[str, tuple[Callable[[], Any], int, bool]]:
    """{form: (one call, weight bytes it reads, whether to compile it)} for one (out, in) weight shape."""
    weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    linear.weight.data.copy_(weight)
    modules = {
        scheme: kernel_linear(linear, plain_record(weight, scheme), False, torch.bfloat16, check_grid=False)[0]
        for scheme in ("int8", "int4", "fp8")
    }
    w8, s8 = modules["int8"].weight_int8, modules["int8"].scale
    record4 = plain_record(weight, "int4")
    codes4 = int_codes(weight, record4, check_grid=False)
    tinygemm = Int4TinyGemmLinear(
        tinygemm_pack(codes4, 8), tinygemm_scales_and_zeros(record4.scale, None, torch.bfloat16), 128, (n, k), None,
        cpu=False,
    )  # fmt: skip
    fp8 = modules["fp8"]
    x_scale = x.abs().amax(dim=-1, keepdim=True).float() / 448.0
    x_fp8 = (x.float() / x_scale).to(torch.float8_e4m3fn)
    return {
        "bf16 cuBLAS (eager F.linear)": (lambda: F.linear(x, weight), n * k * 2, False),
        "bf16 Inductor reduction": (lambda: F.linear(x, weight), n * k * 2, True),
        "int8 Triton kernel (module)": (lambda: modules["int8"](x), n * k, True),
        "int8 Inductor F.linear(x, int8->bf16) * s": (lambda: F.linear(x, w8.to(x.dtype)) * s8, n * k, True),
        "int4 Triton kernel (module)": (lambda: modules["int4"](x), n * k // 2, True),
        "int4 tinygemm": (lambda: tinygemm(x), n * k // 2, False),
        "fp8 Triton kernel (module, with act. quant)": (lambda: fp8(x), n * k, True),
        "fp8 _scaled_mm (activations pre-quantized)": (
            lambda: torch._scaled_mm(
                x_fp8,
                fp8.weight_fp8.t(),
                scale_a=x_scale,
                scale_b=fp8.weight_scale,
                out_dtype=x.dtype,
                use_fast_accum=True,
            ),
            n * k,
            False,
        ),  # fmt: skip
    }


def gemv_probes(device: torch.device) -> list[dict[str, Any]]:
    compile_options = {"coordinate_descent_tuning": True}
    rows = []
    for label, (n, k) in SHAPES.items():
        candidates = gemv_candidates(n, k, device)
        for name, (fn, nbytes, compiled) in candidates.items():
            row: dict[str, Any] = {"shape": label, "form": name, "weight_bytes": nbytes, "compiled": compiled}
            try:
                call = torch.compile(fn, fullgraph=True, dynamic=False, options=compile_options) if compiled else fn
                with torch.no_grad():
                    call()
                    torch.cuda.synchronize()
                    row["kernel_us"], row["kernels"] = profiled_kernel_us(call)
                    row["graph_us"] = graph_us(call)
                row["graph_tb_s"] = nbytes / row["graph_us"] / 1e6
                row["kernels"] = row["kernels"][:4]
            except Exception as exc:  # noqa: BLE001 - one failing form must not stop the probe
                row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            torch._dynamo.reset()
            log.info("%s | %s: %s", label, name, {k: v for k, v in row.items() if k != "kernels"})
            rows.append(row)
    return rows


# --- One decode step --------------------------------------------------------------------------------------------

GROUPED_SDPA = "probe_grouped_sdpa"


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """decode_attention's grouping through SDPA's kernel instead of matmul + softmax (measured slower on
    an H200, benchmarks/gpu.md; kept to compare)."""
    rows = decode_attention.query_rows(query, key, attention_mask, dropout, kwargs.get("softcap"))
    if rows is None:
        return decode_attention.grouped_decode_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)
    return decode_attention.heads_output(out, query.shape[1]), None


def set_attention(model: torch.nn.Module, attention: str) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    decode_attention.register()
    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, sdpa_mask)
    names = {"sdpa": "sdpa", "grouped": decode_attention.GROUPED_DECODE, "grouped-sdpa": GROUPED_SDPA}
    model.set_attn_implementation(names[attention])


def parse_config(config: str) -> tuple[str, str, str]:
    """VARIANT[:ATTENTION[:nocd]] as (variant, attention, tuning); attention defaults to "grouped", tuning to
    "cd" (coordinate-descent tuning on)."""
    name, attention, tuning = (config.split(":") + ["", ""])[:3]
    return name, attention or "grouped", tuning or "cd"


def probe_model(device: torch.device, layers: int, fuse: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    """A bf16 Llama of `layers` layers at the 8B width (q/k/v and gate/up fused when `fuse`), and a 128-token
    prompt."""
    shape = {**LLAMA3_8B, "num_hidden_layers": layers}
    model = build_model(shape, device, torch.bfloat16)
    if fuse:
        fuse_projections_(model)
    return model, torch.randint(1, shape["vocab_size"], (1, 128), device=device)


def step_profiles(
    device: torch.device, layers: int, configs: list[str], fuse: bool, out: Path | None = None
) -> list[dict[str, Any]]:
    model, prompt = probe_model(device, layers, fuse)
    results = []
    for config in configs:
        name, attention, tuning = parse_config(config)
        originals, kernels = apply_variant(model, name, torch.bfloat16)
        row: dict[str, Any] = {"config": config, "variant": name, "attention": attention, "tuning": tuning}
        row.update({"layers": layers, "fused": fuse, "kernel_counts": kernels})
        try:
            set_attention(model, attention)
            torch._dynamo.reset()
            decoder = StaticDecoder(model, 1, 256, compiled=False)
            options = {k: v for k, v in BATCH_1_OPTIONS.items() if k != "triton.cudagraphs"}
            if tuning == "nocd":
                options.pop("coordinate_descent_tuning")
            step = torch.compile(decoder._next, fullgraph=True, dynamic=False, options=options)
            with torch.no_grad():
                first = decoder.prefill(prompt)
                started = time.perf_counter()
                ids = step(first)
                torch.cuda.synchronize()
                row["compile_s"] = time.perf_counter() - started
                for _ in range(3):
                    ids = step(ids)
                total, ranked = profiled_kernel_us(functools.partial(step, first), calls=10)
            row.update({"kernel_us_per_step": total, "kernels": ranked[:40], "kernel_names": len(ranked)})
            with torch.no_grad():
                row["graph_us_per_step"] = graph_us(functools.partial(step, first), calls=1)
        except Exception as exc:  # noqa: BLE001
            log.exception("%s step profile failed", config)
            row["error"] = f"{type(exc).__name__}: {exc}"[:600]
        finally:
            restore(model, originals)
        log.info("%s step: %s", config, {k: v for k, v in row.items() if k != "kernels"})
        results.append(row)
        if out is not None:
            out.write_text(json.dumps({"step": results}, indent=2, default=str))
    return results


def host_overheads(device: torch.device, layers: int, configs: list[str], fuse: bool) -> list[dict[str, Any]]:
    """Is the harness's compiled decode step bound by the host? For each configuration, the step as the harness
    runs it (torch.compile with CUDA graphs): milliseconds per step by CUDA events, and the host's time to issue
    the same steps while the GPU is held busy by a sleep kernel (so no step waits for the GPU). When the two
    agree, the step is bound by the host's per-call work (guards, the CUDA-graph tree's checks), not the GPU."""
    model, prompt = probe_model(device, layers, fuse)
    rows = []
    for config in configs:
        name, attention, _ = parse_config(config)
        originals, _ = apply_variant(model, name, torch.bfloat16)
        row: dict[str, Any] = {"config": config, "layers": layers}
        try:
            set_attention(model, attention)
            torch._dynamo.reset()
            decoder = StaticDecoder(model, 1, 256, compiled=True)
            with torch.no_grad():
                first = decoder.prefill(prompt)
                decoder.decode(first, 4)  # compile, record, replay
                torch.cuda.synchronize()
                steps = 48
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                decoder.decode(first, steps)
                end.record()
                end.synchronize()
                row["event_ms_per_step"] = start.elapsed_time(end) / steps
                torch.cuda._sleep(int(3e9))  # about 1.5 s of GPU work ahead of the steps
                started = time.perf_counter()
                decoder.decode(first, steps)
                row["host_ms_per_step"] = (time.perf_counter() - started) * 1000 / steps
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            log.exception("%s host probe failed", config)
            row["error"] = f"{type(exc).__name__}: {exc}"[:600]
        finally:
            restore(model, originals)
        log.info("host: %s", row)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="gemv,step")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--configs", default="bf16:sdpa,bf16,int8,int4,fp8", help="VARIANT[:ATTENTION[:nocd]],...")
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / f"gpu_probe_{date.today()}.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device("cuda")
    result: dict[str, Any] = {"environment": environment(device), "copy_bandwidth": measure_copy_bandwidth(device)}
    parts = args.part.split(",")
    if "gemv" in parts:
        result["gemv"] = gemv_probes(device)
        args.out.write_text(json.dumps(result, indent=2, default=str))
    if "step" in parts:
        steps_out = args.out.with_suffix(".step.json")
        result["step"] = step_profiles(device, args.layers, args.configs.split(","), args.fuse, steps_out)
    if "host" in parts:
        result["host"] = host_overheads(device, args.layers, args.configs.split(","), args.fuse)
    args.out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
