"""How fast the optimized models run: decode tokens/s at batch 1 and 16 and prefill tokens/s
of a Llama-3-8B-shaped model in bf16, int8 weight-only, int4 weight-only (g128), fp8 W8A8 and 2:4 sparse,
against the batch-1 decode floor (bytes read per token / device-to-device copy bandwidth).

    python benchmarks/gpu_speed.py [--device cuda] [--out benchmarks/gpu_speed_DATE.json] [--budget-s 450]
        [--variants bf16,int8,int4,fp8,sparse24 (or int4t)] [--batches 1,16] [--no-fuse] [--steps 64] [--prompt 128]
        [--prefill 2048]
    python benchmarks/gpu_speed.py --smoke [--device cpu]      # a tiny Llama: every code path in seconds

The model is built from a LlamaConfig directly on the device in bfloat16 with random weights (speed does not
depend on their values). Every variant quantizes or prunes the decoder Linears itself (round to nearest;
magnitude 2:4) and swaps them for the engine's kernel modules (worker/engine/speed/kernels.py); the embeddings and
lm_head stay bf16. Unless --no-fuse, q/k/v and gate/up are first fused into one Linear each
(worker/engine/speed/fused_projections.py), as the job report's speed copy is; "int4t" runs int4 on the Triton
kernel instead of tinygemm. Timing is the engine's harness (worker/engine/speed/harness.py), the code a job report on
a GPU worker uses: transformers' StaticCache, the decode step compiled with CUDA graphs, prefill eager, CUDA
events, median of repeats. Each variant is restored to bf16 before the next, so one model build serves all.

Order: the bandwidth floor, then each variant's prefill and batch-1 decode, then the batch-16 decodes. A
measurement that would start past --budget-s is skipped and says so; a failing one records its error; the JSON
is rewritten after every measurement, so an interrupted run keeps what it measured. `run(args)` returns the
result for a combined benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.engine.prune.masks import nm_mask  # noqa: E402
from worker.engine.speed.decode_attention import attention_label, use_grouped_decode_attention_  # noqa: E402
from worker.engine.speed.fused_projections import fuse_projections_  # noqa: E402
from worker.engine.speed.harness import (  # noqa: E402
    decode_weight_bytes,
    harness_method,
    measure_copy_bandwidth,
    measure_decode,
    measure_prefill,
    release_compiled,
)
from worker.engine.speed.kernels import KernelUnavailable, kernel_linear, plain_record, semi_structured_backend  # noqa: E402

log = logging.getLogger("gpu_speed")

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
}
SMOKE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
}
ROPE_THETA = 500000.0
VARIANTS = {  # name: (label, scheme for plain_record or None, 2:4 sparse)
    "bf16": ("bf16 (dense)", None, False),
    "int8": ("int8 weight-only (per channel)", "int8", False),
    "int4": ("int4 weight-only (g128, symmetric)", "int4", False),
    "int4t": ("int4 weight-only (g128, symmetric), Triton kernel", "int4", False),
    "fp8": ("fp8 W8A8 (E4M3 rowwise, dynamic per-token)", "fp8", False),
    "sparse24": ("2:4 sparse (magnitude, bf16)", None, True),
}
# the five variants; "int4t" (int4 on the Triton kernel) is opt-in: tinygemm decodes faster (benchmarks/gpu.md)
DEFAULT_VARIANTS = ("bf16", "int8", "int4", "fp8", "sparse24")
TARGETS = {  # batch-1 decode tokens/s over bf16: the speed-up each variant is held to
    "int8": 1.8,
    "int4": 2.8,
    "int4t": 2.8,
    "fp8": 1.6,
}
BF16_FLOOR_TARGET = 0.8
NOTES = [
    "embeddings and lm_head stay bf16 in every variant; only the decoder Linears change",
    "floor = copy bandwidth / bytes one decode step reads (every weight but the input embedding table, which a "
    "step reads one row of); the KV cache read (under 0.3% of it at these lengths) is left out",
    "prefill runs eagerly (it is compute bound): int8 weight-only prefill converts the int8 weight to bf16 in each "
    "call before cuBLAS; int4 prefill runs tinygemm, which is built for small batches",
    "2:4 sparse decode at batch 1 is not expected to beat dense (the sparse kernels pay off on large matmuls)",
]
DEFAULT_COMPILE_S = 90.0  # assumed for the first compile of a run when budgeting (8B on an H200)


# --- Model and variants ---------------------------------------------------------------------------------------


def build_model(shape: dict[str, int], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random LlamaForCausalLM of `shape`, created directly on `device` in `dtype` (no CPU copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    common = {**shape, "tie_word_embeddings": False, "attn_implementation": "sdpa", "bos_token_id": 0}
    try:
        config = LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    except TypeError:  # transformers before rope_parameters
        config = LlamaConfig(**common, rope_theta=ROPE_THETA)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device, torch.no_grad():
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
    }


def _pruned_24(linear: torch.nn.Linear) -> torch.nn.Linear:
    """A stand-in Linear holding the magnitude 2:4 pruned weight (the model's Linear is left as it is)."""
    shell = torch.nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    weight = linear.weight.detach() * nm_mask(linear.weight.detach().abs(), 2, 4)
    shell.weight = torch.nn.Parameter(weight, requires_grad=False)
    return shell


def apply_variant(
    model: torch.nn.Module, name: str, dtype: torch.dtype
) -> tuple[dict[str, torch.nn.Module], dict[str, int]]:
    """Swap the decoder Linears for the variant's kernel modules; return the originals and kernel counts.
    A Linear no kernel fits stays as it is and is counted under its reason."""
    _, scheme, sparse = VARIANTS[name]
    originals: dict[str, torch.nn.Module] = {}
    counts: dict[str, int] = {}
    if scheme is None and not sparse:
        return originals, {
            f"{str(dtype).removeprefix('torch.')} F.linear (cuBLAS on CUDA)": len(decoder_linears(model))
        }
    modules = dict(model.named_modules())
    int4 = "triton" if name == "int4t" else "tinygemm"
    for layer, linear in decoder_linears(model).items():
        source = _pruned_24(linear) if sparse else linear
        record = plain_record(linear.weight, scheme) if scheme else None
        try:
            replacement, kernel = kernel_linear(source, record, sparse, dtype, check_grid=False, int4_kernel=int4)
        except KernelUnavailable as exc:
            counts[f"unchanged: {exc}"] = counts.get(f"unchanged: {exc}", 0) + 1
            continue
        parent, _, child = layer.rpartition(".")
        originals[layer] = linear
        setattr(modules[parent], child, replacement)
        counts[kernel] = counts.get(kernel, 0) + 1
    return originals, counts


def restore(model: torch.nn.Module, originals: dict[str, torch.nn.Module]) -> None:
    modules = dict(model.named_modules())
    for layer, linear in originals.items():
        parent, _, child = layer.rpartition(".")
        setattr(modules[parent], child, linear)
    release_compiled(next(model.parameters()).device)


# --- Running --------------------------------------------------------------------------------------------------


class Budget:
    """Wall-clock budget: a measurement starts only if the slowest one of its kind so far would still fit
    (before the first compiled one, DEFAULT_COMPILE_S is assumed for it)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.started = seconds, time.perf_counter()
        self.slowest = {True: 0.0, False: 0.0}  # compiled or not -> seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def needs(self, compiled: bool) -> float:
        return 1.1 * (self.slowest[compiled] or (DEFAULT_COMPILE_S if compiled else 0.0))

    def allows(self, compiled: bool) -> bool:
        return self.left() > self.needs(compiled)

    def record(self, compiled: bool, seconds: float) -> None:
        self.slowest[compiled] = max(self.slowest[compiled], seconds)


def environment(device: torch.device) -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "triton": version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["sparse_backend"] = semi_structured_backend()
    return info


def _measure(target: dict, key: str, label: str, budget: Budget, compiled: bool, fn) -> None:
    """Run one measurement into target[key]: its result, or {"error": ...} / {"skipped": ...}."""
    if not budget.allows(compiled):
        target[key] = {"skipped": f"time budget: {budget.left():.0f} s left, {budget.needs(compiled):.0f} s needed"}
        return
    started = time.perf_counter()
    try:
        target[key] = fn()
    except Exception as exc:  # noqa: BLE001 - one failing measurement must not stop the run
        log.exception("%s failed", label)
        target[key] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
    budget.record(compiled, time.perf_counter() - started)
    log.info("%s: %s", label, json.dumps(target[key], default=str)[:300])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the benchmark as a dict (also written to args.out after each step)."""
    device = torch.device(args.device)
    compiled = device.type == "cuda" if args.compile is None else args.compile
    budget = Budget(args.budget_s)
    shape = SMOKE if args.smoke else LLAMA3_8B
    result: dict[str, Any] = {
        "environment": environment(device),
        "model": {**shape, "rope_theta": ROPE_THETA, "dtype": str(args.dtype), "weights": "random (timing only)"},
        "settings": {
            "prompt_tokens": args.prompt,
            "decode_steps": args.steps,
            "prefill_tokens": args.prefill,
            "batches": args.batches,
            "repeats": args.repeats,
            "budget_s": args.budget_s,
            "method": harness_method(device, compiled, 2 if compiled else 1, args.repeats),
        },
        "notes": NOTES,
        "variants": [],
    }
    save = _saver(args.out, result)
    model = build_model(shape, device, args.dtype)
    if args.fuse:  # before any variant: every variant, bf16 included, reads q/k/v and gate/up as one product each
        fused = fuse_projections_(model)
        result["model"]["fused_projections"] = sum(v.startswith("fused") for v in fused.values())
    if args.attention == "grouped":  # every variant alike
        use_grouped_decode_attention_(model)
    result["model"]["attention"] = attention_label(model)
    generator = torch.Generator(device=device).manual_seed(0)
    vocab = shape["vocab_size"]
    prompts = torch.randint(1, vocab, (max(args.batches), args.prompt), device=device, generator=generator)
    prefill_ids = torch.randint(1, vocab, (1, args.prefill), device=device, generator=generator)
    result["copy_bandwidth"] = measure_copy_bandwidth(device, (1 << 26) if args.smoke else (1 << 30))
    rows = {name: {"variant": name, "label": VARIANTS[name][0], "decode": {}} for name in args.variants}
    result["variants"] = list(rows.values())
    save()
    for first, batches in ((True, args.batches[:1]), (False, args.batches[1:])):
        for row in rows.values():
            if batches and "error" not in row:
                _run_variant(model, row, batches, first, prompts, prefill_ids, args, budget, compiled)
                if row.get("weight_bytes_per_token"):
                    row["floor_tokens_per_s"] = result["copy_bandwidth"]["bytes_per_s"] / row["weight_bytes_per_token"]
                result["table"] = table(result)
                save()
    result["elapsed_s"] = round(args.budget_s - budget.left(), 1)
    save()
    return result


def _run_variant(model, row, batches, first, prompts, prefill_ids, args, budget, compiled) -> None:
    """Convert to the variant, measure (prefill when `first`, then decode at each batch), restore bf16."""
    name = row["variant"]
    try:
        originals, kernels = apply_variant(model, name, args.dtype)
    except Exception as exc:  # noqa: BLE001 - recorded; the other variants still run
        log.exception("converting %s failed", name)
        row["error"] = f"conversion: {type(exc).__name__}: {exc}"[:800]
        return
    try:
        row["kernels"] = kernels
        if name != "bf16" and not originals:
            row["error"] = "no decoder Linear could use this variant's kernel: " + "; ".join(kernels)
            return
        row["weight_bytes_per_token"] = decode_weight_bytes(model)
        if first:
            prefill = lambda: measure_prefill(model, prefill_ids, repeats=args.repeats)  # noqa: E731
            _measure(row, "prefill", f"{name} prefill", budget, False, prefill)
        for batch in batches:
            rows = prompts[:batch].contiguous()
            decode = lambda rows=rows: measure_decode(model, rows, args.steps, compiled=compiled, repeats=args.repeats)  # noqa: E731
            _measure(row["decode"], str(batch), f"{name} decode batch {batch}", budget, compiled, decode)
    finally:
        restore(model, originals)


def _saver(out: Path | None, result: dict):
    def save() -> None:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2, default=str))

    return save


# --- Report ---------------------------------------------------------------------------------------------------


def _number(entry: Any, key: str) -> float | None:
    return entry.get(key) if isinstance(entry, dict) and isinstance(entry.get(key), int | float) else None


def _cell(value: float | None, entry: Any, fmt: str = "{:.1f}") -> str:
    if value is not None:
        return fmt.format(value)
    if isinstance(entry, dict) and ("error" in entry or "skipped" in entry):
        return "error" if "error" in entry else "skipped"
    return "—"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def verdict(name: str, row: dict, bf16: dict) -> tuple[str, bool | None]:
    """The target for this variant and whether it was met (None: not measured)."""
    decode = _number(row["decode"].get("1"), "tokens_per_s")
    base = _number(bf16.get("decode", {}).get("1"), "tokens_per_s") if bf16 else None
    if name == "bf16":
        of_floor = _ratio(decode, row.get("floor_tokens_per_s"))
        return f"≥ {BF16_FLOOR_TARGET:.0%} of floor", None if of_floor is None else of_floor >= BF16_FLOOR_TARGET
    if name in TARGETS:
        speedup = _ratio(decode, base)
        return f"≥ {TARGETS[name]}× bf16 decode b1", None if speedup is None else speedup >= TARGETS[name]
    if name == "sparse24":
        speedup = _ratio(_number(row.get("prefill"), "tokens_per_s"), _number(bf16.get("prefill"), "tokens_per_s"))
        return "prefill faster than bf16", None if speedup is None else speedup > 1.0
    return "", None


def table(result: dict) -> str:
    """A markdown table of every figure, its ratio to bf16 and to the floor, against the targets."""
    rows = {row["variant"]: row for row in result["variants"]}
    bf16 = rows.get("bf16", {})
    batches = [str(b) for b in result["settings"]["batches"]]
    bandwidth = result["copy_bandwidth"]["bytes_per_s"]
    env = result["environment"]
    lines = [
        f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}, CUDA {env['cuda']}; "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)",
        "",
        "| variant | GB read / token | floor tok/s | "
        + " | ".join(f"decode b{b} tok/s | × bf16" for b in batches)
        + " | b1 of floor | prefill tok/s | × bf16 | target | met |",
        "|" + " --- |" * (8 + 2 * len(batches)),
    ]
    for name, row in rows.items():
        cells = [row["label"], _cell(_ratio(row.get("weight_bytes_per_token"), 1e9), None, "{:.3g}")]
        cells.append(_cell(row.get("floor_tokens_per_s"), None, "{:.0f}"))
        for b in batches:
            entry = row["decode"].get(b)
            value = _number(entry, "tokens_per_s")
            cells += [
                _cell(value, entry),
                _cell(_ratio(value, _number(bf16.get("decode", {}).get(b), "tokens_per_s")), None, "{:.2f}"),
            ]
        decode_1 = _number(row["decode"].get("1"), "tokens_per_s")  # the floor is a batch-1 bound
        cells.append(_cell(_ratio(decode_1, row.get("floor_tokens_per_s")), None, "{:.0%}"))
        prefill = _number(row.get("prefill"), "tokens_per_s")
        cells += [
            _cell(prefill, row.get("prefill"), "{:.0f}"),
            _cell(_ratio(prefill, _number(bf16.get("prefill"), "tokens_per_s")), None, "{:.2f}"),
        ]
        target, met = verdict(name, row, bf16)
        cells += [target, {True: "yes", False: "no", None: "—"}[met]]
        lines.append("| " + " | ".join(cells) + " |")
    for row in rows.values():
        for entry in row["decode"].values():
            if (
                isinstance(entry, dict)
                and entry.get("compiled")
                and (entry.get("graphs_compiled", 1) != 1 or entry.get("cudagraph_skips", 0))
            ):
                entry["warning"] = (
                    f"{entry.get('graphs_compiled')} graphs compiled, {entry.get('cudagraph_skips')} CUDA-graph "
                    "skips (1 and 0 expected): the step did not run as one CUDA graph"
                )
    problems = [
        f"- {row['variant']} {what}: "
        + "; ".join(str(entry[k]) for k in ("error", "skipped", "compile_error", "warning") if k in entry)
        for row in rows.values()
        for what, entry in [("conversion", row), ("prefill", row.get("prefill"))]
        + [(f"decode b{b}", e) for b, e in row["decode"].items()]
        if isinstance(entry, dict) and {"error", "skipped", "compile_error", "warning"} & set(entry)
    ]
    first_runs = [
        f"{row['variant']} b{b} {entry['first_run_s']:.0f} s"
        for row in rows.values()
        for b, entry in row["decode"].items()
        if isinstance(entry, dict) and "first_run_s" in entry
    ]
    kernels = [
        f"- {row['variant']}: " + "; ".join(f"{k} × {n}" for k, n in row.get("kernels", {}).items())
        for row in rows.values()
    ]
    first = ["", "First decode run (compile, CUDA-graph capture, one run): " + ", ".join(first_runs)]
    return "\n".join(
        [
            *lines,
            "",
            "Kernels (decoder Linears):",
            *kernels,
            *(first if first_runs else []),
            *(["", "Problems:", *problems] if problems else []),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="a tiny Llama: every code path in seconds")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/gpu_speed_DATE.json)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--batches", default="1,16", help="decode batch sizes; the first is timed for all first")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps (default 64; smoke 8)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens before decode (default 128; smoke 16)")
    parser.add_argument("--prefill", type=int, default=None, help="prefill tokens (default 2048; smoke 64)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=450.0, help="no measurement starts past this (seconds)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    parser.add_argument(
        "--fuse", action=argparse.BooleanOptionalAction, default=True, help="fuse q/k/v and gate/up (default on)"
    )
    parser.add_argument(
        "--attention",
        choices=("grouped", "sdpa"),
        default="grouped",
        help="decode attention: decode_attention.py's copy-free grouped form (default) or transformers' sdpa",
    )
    parser.add_argument("--dtype", default="bfloat16", help="model dtype (bfloat16; a CPU smoke run may use float32)")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    if "bf16" not in args.variants:
        args.variants.insert(0, "bf16")  # every ratio is to bf16
    args.batches = [int(b) for b in args.batches.split(",")]
    args.dtype = getattr(torch, args.dtype)
    small = args.smoke
    args.steps = args.steps or (8 if small else 64)
    args.prompt = args.prompt or (16 if small else 128)
    args.prefill = args.prefill or (64 if small else 2048)
    if args.out is None and not small:
        args.out = ROOT / "benchmarks" / f"gpu_speed_{datetime.date.today()}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    result = run(args)
    print(result.get("table", "no measurement"))
    if args.out is not None:
        print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
