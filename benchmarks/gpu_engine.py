"""How fast modelpress optimizes: the engine's steps on a Llama-3-8B-shaped model, one GPU.

The model is built from a `LlamaConfig` (hidden 4096, MLP 14336, 32 layers, 32 heads, 8 key/value heads, vocab
128256, rope θ 500000) directly on the device in bfloat16, with random weights, and rebuilt before each step
(the steps change it in place). Each step is called as the pipeline calls it, `get_step(spec)(model,
spec, StepContext(...))`, and timed end to end (device synchronized); peak memory is `max_memory_allocated` after a
reset, reported as the peak and as the overhead above the bf16 model's own bytes.

Calibration is random token ids, uniform over the vocabulary (128 windows × 2048 tokens by default): timing and
memory do not depend on what the text says. `quantize:fp8` needs no calibration and runs without it.

Time caps: a whole run must fit in about five minutes, so each step has a cap (`--cap STEP=SECONDS`). A step
that passes its cap is stopped at its next progress report (after a decoder layer) and its time is
extrapolated from the layers it finished: the first layer as measured (it includes capturing the embeddings
and warm-up) plus the mean of the others for each layer left. Every layer does the same work, so the peak
memory of the layers done is the peak of the whole step. The table says which rows are extrapolated.

Distillation (`distill:kd`, batch 8 × 2048, an 8B bf16 teacher built the same way and copied to host memory, as
the pipeline's teacher snapshots are) runs a warm-up step and a few timed steps; the rate per 100 steps is
extrapolated from their median. It runs the lean memory mode (`offload: true`: teacher, optimizer state and
gradients in host memory); `--distill-fast` runs the fast mode (`offload: false`: all of it on the GPU) instead.

    python benchmarks/gpu_engine.py [--device cuda] [--calibration 128] [--seq-len 2048] [--only gptq,awq]
        [--cap gptq=90] [--no-caps] [--distill-steps 3] [--distill-fast] [--out benchmarks/gpu_engine_steps_DATE.json]
    python benchmarks/gpu_engine.py --smoke --device cpu     # tiny Llama, seconds: every code path

`run(args) -> dict` is what a combined benchmark calls (args from `parse_args`).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.engine.pipeline import cpu_copy  # noqa: E402
from worker.engine.steps import StepContext, get_step, step_spec  # noqa: E402

log = logging.getLogger("gpu_engine")

GB = 1e9
GPTQ_TARGET_S = 8 * 60
MEMORY_TARGET_GB = 20.0
INT4_G128 = {"bits": 4, "group_size": 128, "symmetric": True}
STEPS: dict[str, dict[str, Any]] = {  # name -> spec; "calibrated" steps get the calibration windows
    "gptq": {"type": "quantize", "method": "gptq", "weights": INT4_G128, "act_order": True},
    "sparsegpt": {"type": "prune", "method": "sparsegpt", "sparsity": 0.5},
    "wanda": {"type": "prune", "method": "wanda", "sparsity": 0.5},
    "awq": {"type": "quantize", "method": "awq", "weights": INT4_G128},
    "fp8": {"type": "quantize", "method": "fp8"},
    "distill": {"type": "distill", "method": "kd"},
}
LABELS = {
    "gptq": "quantize:gptq W4 g128 act-order",
    "sparsegpt": "prune:sparsegpt 50%",
    "wanda": "prune:wanda 50%",
    "awq": "quantize:awq W4 g128",
    "fp8": "quantize:fp8 (no calibration)",
}
UNCALIBRATED = {"fp8", "distill"}
NOTES = [
    "weights are random and calibration is random token ids: timing and memory do not depend on either",
    "each step runs on a freshly built bf16 model; peak is torch.cuda.max_memory_allocated after a reset, "
    "overhead is the peak minus the model's own bytes",
    "rows marked extrapolated passed their time cap: the first layer as measured plus the mean of the other "
    "finished layers for each layer left (every layer does the same work, so their peak is the step's peak)",
    "quantize:fp8 needs no calibration and ran without it (with calibration it would also run a sequential "
    "pass, only to report output errors)",
    "distill:kd, lean mode (offload: true): the teacher is streamed from host memory one decoder layer at a time, "
    "AdamW's moments and the gradients live in host memory, and the logits are made one sequence at a time; the "
    "fast mode (--distill-fast, offload: false) holds the bf16 teacher, the gradients and two AdamW moments on the "
    "GPU (4 × the model beside it)",
]
DISTILL_WARMUP = 1
# seconds; with fp8 (~5 s), distill (~30 s) and seven model builds, about 5 minutes on an H200. Estimates for whole
# steps there: gptq 2-3 min, awq 1-1.5, sparsegpt ~1, wanda ~0.3 (so gptq and awq are usually extrapolated)
DEFAULT_CAPS = {"gptq": 75.0, "sparsegpt": 60.0, "wanda": 45.0, "awq": 60.0}
DEFAULT_BUDGET_S = 330.0  # a step is not started after this; with the caps the run ends within about 5.5 minutes


# --- the model ------------------------------------------------------------------------------------------------


def llama_config(smoke: bool):
    from transformers import LlamaConfig

    if smoke:  # widths divisible by the group size 128, four layers so that a cap can stop one midway
        shape = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4}
        shape.update({"num_key_value_heads": 2, "vocab_size": 512})
    else:
        shape = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32}
        shape.update({"num_key_value_heads": 8, "vocab_size": 128256})
    return LlamaConfig(
        **shape,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


def build_model(config, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """Random-weight LlamaForCausalLM made on `device` in bf16 (nothing goes through the CPU's memory)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def tensor_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


class IdsTokenizer:
    """Stand-in tokenizer for random-token data: the text is whitespace-separated token ids (the distill step
    tokenizes its dataset file; this keeps the ids random like the calibration windows)."""

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": [int(token) for token in text.split()]}


# --- timing ---------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CapReached(Exception):
    """Raised from a step's progress callback once the step has run past its cap."""


@dataclass
class Clock:
    """A step's progress callback: (fraction, seconds since start) at each report, device synchronized; raises
    CapReached at a report past `cap` seconds once two reports exist (two are needed to extrapolate)."""

    device: torch.device
    cap: float | None
    started: float = field(default_factory=time.perf_counter)
    marks: list[tuple[float, float]] = field(default_factory=list)

    def __call__(self, fraction: float, message: str) -> None:
        synchronize(self.device)
        now = time.perf_counter() - self.started
        self.marks.append((fraction, now))
        log.debug("%6.1f s  %.3f  %s", now, fraction, message)
        if self.cap is not None and now > self.cap and len(self.marks) >= 2 and fraction < 1:
            raise CapReached

    def extrapolated(self) -> float:
        """Whole-step seconds from the reports so far: first unit as measured, the mean of the others for the
        rest (reports are one per decoder layer, or per Linear where a step has no calibration)."""
        (f1, t1), (fk, tk) = self.marks[0], self.marks[-1]
        if fk <= f1:
            return t1 / max(f1, 1e-9)
        return t1 + (tk - t1) * (1 - f1) / (fk - f1)


# --- one row --------------------------------------------------------------------------------------------------


def memory_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run_step(name: str, args: argparse.Namespace, config, calibration: torch.Tensor, workdir: Path) -> dict:
    """Build a fresh model, run one step on it, and return its row (error text instead of numbers if it fails)."""
    device = torch.device(args.device)
    row: dict[str, Any] = {"step": name, "label": label(name, args), "spec": dict(STEPS[name])}
    try:
        measure(name, args, config, calibration, workdir, row)
    except Exception as exc:  # a failing step must not lose the others: its row carries the error
        row["error"] = f"{type(exc).__name__}: {exc}"[:600]
        log.error("%s failed:\n%s", name, traceback.format_exc())
        peak = peak_bytes(device)
        if peak is not None:
            row["peak_gb_before_error"] = peak / GB
    memory_reset(device)  # the models went with measure's frame (and with the exception, if any)
    row["verdict"] = verdict(name, row)
    return row


def measure(name: str, args: argparse.Namespace, config, calibration: torch.Tensor, workdir: Path, row: dict) -> None:
    """Fill `row` with the step's time and peak memory, measured on a model built for it."""
    device, spec = torch.device(args.device), row["spec"]
    model = build_model(config, device)
    model_bytes = tensor_bytes(model)
    row["model_gb"] = model_bytes / GB
    teacher, extra = None, {}
    if name == "distill":
        teacher = cpu_copy(build_model(config, device, seed=1))  # a host snapshot, as the pipeline makes
        row["teacher_gb"] = tensor_bytes(teacher) / GB
        spec.update(distill_spec(args))
        extra = distill_context(args, config, workdir)
    synchronize(device)
    memory_reset(device)
    clock = Clock(device, None if args.no_caps else args.caps.get(name))
    context = StepContext(
        calibration=None if name in UNCALIBRATED else calibration,
        report_progress=clock,
        device=device,
        teacher=teacher,
        **extra,
    )
    try:
        typed = step_spec(spec)
        result = get_step(typed)(model, typed, context)
        row["summary"] = {k: v for k, v in result.summary.items() if isinstance(v, int | float | str | bool)}
    except CapReached:
        row["capped_at_fraction"] = clock.marks[-1][0]
    synchronize(device)
    row["measured_s"] = time.perf_counter() - clock.started
    row.update(timing(name, row, clock, spec))
    peak = peak_bytes(device)
    if peak is not None:
        row["peak_gb"] = peak / GB
        row["overhead_gb"] = (peak - model_bytes) / GB


def label(name: str, args: argparse.Namespace) -> str:
    mode = "fast" if args.distill_fast else "lean"
    return LABELS.get(name) or f"distill:kd {mode} per 100 steps, batch {args.distill_batch} × {args.seq_len}"


def timing(name: str, row: dict, clock: Clock, spec: dict) -> dict:
    if name == "distill":
        after_warmup = [t for _, t in clock.marks][DISTILL_WARMUP - 1 :]  # one report per step, at its end
        timed = [b - a for a, b in zip(after_warmup, after_warmup[1:], strict=False)]
        per_step = statistics.median(timed)
        return {
            "seconds": 100 * per_step,
            "seconds_per_step": per_step,
            "tokens_per_s": spec["batch_size"] * spec["seq_len"] / per_step,
            "timed_steps": len(timed),
            "how": f"extrapolated: 100 × median of {len(timed)} timed steps after {DISTILL_WARMUP} warm-up",
        }
    times = [t for _, t in clock.marks]
    between = [b - a for a, b in zip(times, times[1:], strict=False)]
    per_report = {"seconds_per_report": statistics.median(between)} if between else {}  # a layer (or a Linear)
    if "capped_at_fraction" in row:
        done = row["capped_at_fraction"]
        return {
            "seconds": clock.extrapolated(),
            "how": f"extrapolated from {done:.0%} of the step ({row['measured_s']:.0f} s measured, cap reached)",
            **per_report,
        }
    return {"seconds": row["measured_s"], "how": "measured", **per_report}


def distill_spec(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dataset_id": "random-ids",
        "teacher_step": None,
        "steps": DISTILL_WARMUP + args.distill_steps,
        "batch_size": args.distill_batch,
        "seq_len": args.seq_len,
        "learning_rate": 1e-5,
        "warmup_steps": 1,
        "max_grad_norm": 1.0,
        "temperature": 2.0,
        "alpha": 0.5,
        "hidden_mse": 0.0,
        "checkpoint_every": 50,  # no checkpoint folder is given: nothing is written
        "offload": not args.distill_fast,
    }


def distill_context(args: argparse.Namespace, config, workdir: Path) -> dict[str, Any]:
    """A dataset file of random token ids, enough for two distinct batches, and the tokenizer that reads it."""
    path = workdir / "distill-ids.txt"
    count = 2 * args.distill_batch * args.seq_len
    ids = torch.randint(0, config.vocab_size, (count,), generator=torch.Generator().manual_seed(2))
    path.write_text(" ".join(map(str, ids.tolist())))
    return {"tokenizer": IdsTokenizer(), "datasets": {"random-ids": (path, "txt")}}


def verdict(name: str, row: dict) -> str:
    if "error" in row:
        return "failed"
    parts = []
    if name == "gptq":
        parts.append(f"time {'✅' if row['seconds'] <= GPTQ_TARGET_S else '❌'} (≤ 8 min)")
    if "overhead_gb" in row:
        met = row["overhead_gb"] <= MEMORY_TARGET_GB
        if name == "distill" and not row["spec"]["offload"]:
            parts.append(
                f"memory {'✅' if met else '❌'} (≤ model + 20 GB cannot hold the teacher, gradients and two AdamW "
                "moments in the fast mode: 4 × the model; the peak shown is what it needs)"
            )
        else:
            parts.append(f"memory {'✅' if met else '❌'} (≤ model + 20 GB)")
    return "; ".join(parts) or "no target"


# --- report ---------------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    lines = [
        "| step | seconds | how | peak GB | overhead GB over the model | target met? |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['label']} | — | skipped: {r['skipped']} | — | — | not run |")
            continue
        if "error" in r:
            lines.append(f"| {r['label']} | — | {r['error']} | {_gb(r.get('peak_gb_before_error'))} | — | failed |")
            continue
        lines.append(
            f"| {r['label']} | {r['seconds']:.1f} | {r['how']} | {_gb(r.get('peak_gb'))} | "
            f"{_gb(r.get('overhead_gb'))} | {r['verdict']} |"
        )
    return "\n".join(lines)


def _gb(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / GB
    return env


def run(args: argparse.Namespace, report: Callable[[str], None] = print) -> dict:
    """Run the chosen steps; print the table; write the JSON; return what was written."""
    device = torch.device(args.device)
    config = llama_config(args.smoke)
    calibration = torch.randint(
        0, config.vocab_size, (args.calibration, args.seq_len), generator=torch.Generator().manual_seed(1)
    )
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            elapsed = time.perf_counter() - started
            if args.budget is not None and elapsed > args.budget:
                rows.append({"step": name, "label": label(name, args), "skipped": f"budget spent ({elapsed:.0f} s)"})
                report(f"skipping {name}: {rows[-1]['skipped']}")
                continue
            report(f"running {name} ...")
            rows.append(run_step(name, args, config, calibration, Path(tmp)))
            r = rows[-1]
            report(f"  {name}: " + (r["error"] if "error" in r else f"{r['seconds']:.1f} s ({r['how']})"))
    result = {
        "benchmark": "engine steps on a Llama-3-8B-shaped model" + (" (smoke: tiny config)" if args.smoke else ""),
        "environment": environment(device),
        "config": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
        | {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}
        | {"vocab_size": config.vocab_size, "dtype": "bfloat16", "weights": "random"}
        | {"rope": getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None)},
        "calibration": {
            "windows": args.calibration,
            "seq_len": args.seq_len,
            "tokens": "random token ids, uniform over the vocabulary",
        },
        "targets": {"gptq_seconds": GPTQ_TARGET_S, "memory_overhead_gb": MEMORY_TARGET_GB},
        "caps": None if args.no_caps else args.caps,
        "budget_s": args.budget,
        "rows": rows,
        "notes": NOTES,
        "wall_s": time.perf_counter() - started,
    }
    report(table(rows))
    report(f"total {result['wall_s']:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    report(f"wrote {out}")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny Llama config, seconds, every code path")
    parser.add_argument("--calibration", type=int, default=None, help="calibration windows (128; smoke 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per window (2048; smoke 64)")
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--cap", action="append", default=[], help="STEP=SECONDS, overrides a default cap")
    parser.add_argument("--no-caps", action="store_true", help="run every step to the end")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds after which the steps left are skipped (330; smoke none)"
    )
    parser.add_argument("--distill-steps", type=int, default=3, help="timed distill steps after one warm-up")
    parser.add_argument("--distill-batch", type=int, default=None, help="distill batch size (8; smoke 2)")
    parser.add_argument(
        "--distill-fast", action="store_true", help="distill in the fast memory mode (offload: false), not the lean"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / f"gpu_engine_steps_{date.today()}.json"))
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; known: {list(STEPS)}")
    args.calibration = args.calibration or (4 if args.smoke else 128)
    args.seq_len = args.seq_len or (64 if args.smoke else 2048)
    args.distill_batch = args.distill_batch or (2 if args.smoke else 8)
    if args.budget is None and not args.smoke:
        args.budget = DEFAULT_BUDGET_S
    # smoke: wanda capped at once, so the cap and its extrapolation run too
    args.caps = dict({"wanda": 0.0} if args.smoke else DEFAULT_CAPS)
    for item in args.cap:
        step, _, seconds = item.partition("=")
        args.caps[step.strip()] = float(seconds)
    return args


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(parse_args())


if __name__ == "__main__":
    main()
