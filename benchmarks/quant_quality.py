"""Quantization quality benchmark: perplexity, KL divergence to the dense model and cloze accuracy of each
scheme's saved artifact, reloaded with transformers.

Two models: a real one from a GGUF dequantized to float32, SmolLM2-135M-Instruct (Q4_1) or Gemma-3-270M (Q4_K_M)
with `--model gemma3` (calibration on wikitext2-valid, evaluation on the first 40 non-overlapping 512-token windows
of wikitext2-test, each starting with `<bos>` where the tokenizer adds one) and a small Llama trained from
scratch in float32 on tinyshakespeare by benchmarks/train_small.py (calibration on the training part,
evaluation on the held-out last 10%). Every row runs the engine's step, writes the compressed-tensors artifact,
reloads it with `AutoModelForCausalLM.from_pretrained` and measures perplexity on it.

    python benchmarks/quant_quality.py [--device cuda] [--model smollm2|gemma3] [--only model|small]
        [--gguf PATH] [--data DIR]
        [--calibration-windows 64] [--eval-windows 40] [--cloze-documents 200] [--rows "scheme,scheme"]
        [--train-steps N --train-hidden H --train-layers L ...]

Prints markdown tables and writes them to a dated results file
(benchmarks/quant_quality_tables_<model>_<date>.md); benchmarks/quant_quality.md is the page that explains them.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import train_small  # noqa: E402
from benchmarks.quality_columns import QualityColumns, columns  # noqa: E402
from tests.utils.factories import SHARED_DATA, SMOLLM2_GGUF, gemma3_gguf, smollm2_dir  # noqa: E402
from worker.engine.calibrate.windows import leading_special_ids, split_windows, token_windows  # noqa: E402
from worker.engine.evaluate.report import library_versions  # noqa: E402
from worker.engine.export.compressed import save_compressed_  # noqa: E402
from worker.engine.load.checkpoint import load_model  # noqa: E402
from worker.engine.steps import StepContext, run_step, step_spec  # noqa: E402

log = logging.getLogger("quant_quality")

INT4 = {"bits": 4, "group_size": 64, "symmetric": True}
INT4_ASYM = {**INT4, "symmetric": False}
ROWS = [  # label, step (None: dense), needs calibration, bound over dense (fraction) it is held to
    ("dense float32", None, False, None),
    ("rtn int8 per channel (W8A16)", {"method": "rtn", "weights": {"bits": 8, "group_size": None}}, False, 0.01),
    ("fp8 E4M3 W8A8 dynamic", {"method": "fp8"}, False, 0.02),
    ("fp8 E4M3 W8A8 dynamic, GPTQ-rounded", {"method": "fp8", "gptq": True}, True, 0.02),
    ("smoothquant int8 W8A8 (α 0.5)", {"method": "smoothquant", "alpha": 0.5}, True, 0.03),
    ("rtn int4 g64 (W4A16)", {"method": "rtn", "weights": INT4}, False, None),
    ("gptq int4 g64 act-order", {"method": "gptq", "weights": INT4, "act_order": True}, True, 0.12),
    ("awq int4 g64", {"method": "awq", "weights": INT4}, True, 0.12),
    ("rtn int4 g64 asymmetric", {"method": "rtn", "weights": INT4_ASYM}, False, None),
    ("gptq int4 g64 act-order asymmetric", {"method": "gptq", "weights": INT4_ASYM, "act_order": True}, True, 0.12),
    ("awq int4 g64 asymmetric", {"method": "awq", "weights": INT4_ASYM}, True, 0.12),
]
MODELS = {  # --model: title, the GGUF's quantization, the packaged GGUF (None where not installed)
    "smollm2": ("SmolLM2-135M-Instruct", "Q4_1", lambda: smollm2_dir() and smollm2_dir() / SMOLLM2_GGUF),
    "gemma3": ("Gemma-3-270M", "Q4_K_M", gemma3_gguf),
}
VLLM = {
    "rtn int8 per channel (W8A16)": "pack-quantized int8 weight-only (W8A16, Marlin WNA16 kernels)",
    "fp8 E4M3 W8A8 dynamic": "float-quantized FP8 channel weights + dynamic per-token FP8 (CompressedTensorsW8A8Fp8)",
    "fp8 E4M3 W8A8 dynamic, GPTQ-rounded": "the same format as fp8 (GPTQ only chose the E4M3 values)",
    "smoothquant int8 W8A8 (α 0.5)": "int-quantized int8 channel weights + dynamic per-token int8 "
    "(CompressedTensorsW8A8Int8)",
    "rtn int4 g64 (W4A16)": "pack-quantized int4 group 64 (CompressedTensorsWNA16, Marlin)",
    "gptq int4 g64 act-order": "pack-quantized int4 group 64, actorder static, no g_idx (CompressedTensorsWNA16)",
    "awq int4 g64": "pack-quantized int4 group 64 (CompressedTensorsWNA16)",
    "… asymmetric": "int-quantized int4 with zero points, one byte per code; vLLM's WNA16 path expects "
    "pack-quantized: not checked",
}


def targeted_bits_per_weight(folder: Path, dense: torch.nn.Module) -> float | None:
    """Bits stored per targeted weight: all tensors of quantized Linears (codes, scales, zero points, shapes)."""
    tensors = {}
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        tensors.update({k: v for k, v in header.items() if k != "__metadata__"})
    quantized = {k.rsplit(".", 1)[0] for k in tensors if k.endswith((".weight_scale", ".weight_packed"))}
    if not quantized:
        return None
    stored = sum(
        v["data_offsets"][1] - v["data_offsets"][0] for k, v in tensors.items() if k.rsplit(".", 1)[0] in quantized
    )
    weights = sum(dense.get_submodule(name).weight.numel() for name in quantized)
    return 8 * stored / weights


def undivided_widths(model: torch.nn.Module, step: dict | None) -> list[int]:
    """The input widths of the model's Linears (lm_head aside) that the step's group size does not divide."""
    group = ((step or {}).get("weights") or {}).get("group_size")
    if not group:
        return []
    widths = {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    return sorted(width for width in widths if width % group)


def run_row(dense, tokenizer, step, calibration, eval_windows, device, probe: QualityColumns) -> dict:
    from transformers import AutoModelForCausalLM

    if step is None:
        started = time.perf_counter()
        quality = probe.dense(dense, tokenizer, eval_windows, device)
        return {**quality, "bits": 32.0, "seconds": 0.0, "eval_seconds": time.perf_counter() - started}
    model = copy.deepcopy(dense)
    spec = {"type": "quantize", **step}
    started = time.perf_counter()
    result = run_step(
        model,
        step_spec(spec),
        StepContext(calibration=calibration, report_progress=lambda f, m: None, device=device),
    )
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_compressed_(model, result.quantized, folder)
        del model
        tokenizer.save_pretrained(folder)
        artifact = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).to(device).eval()
        started = time.perf_counter()
        quality = probe.measure(artifact, tokenizer, eval_windows, device)
        eval_seconds = time.perf_counter() - started
        bits = targeted_bits_per_weight(folder, dense)
        fmt = json.loads((folder / "config.json").read_text())["quantization_config"]["format"]
    return {
        **quality,
        "bits": bits,
        "seconds": seconds,
        "eval_seconds": eval_seconds,
        "format": fmt,
        "mean_output_error": result.summary.get("mean_output_error"),
    }


def table(name: str, rows: list[tuple[str, dict, float | None]]) -> str:
    dense = rows[0][1]["perplexity"]
    lines = [
        f"### {name}",
        "",
        "| scheme | perplexity | vs dense | bound | KL to dense (mean) | top-1 agreement | cloze accuracy ± stderr "
        "| bits/weight (targeted, on disk) | format | mean layer output error | step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r, bound in rows:
        over = r["perplexity"] / dense - 1
        verdict = "" if bound is None else (f"≤ {bound:.0%} ✅" if over <= bound else f"≤ {bound:.0%} ❌")
        error = "" if r.get("mean_output_error") is None else f"{r['mean_output_error']:.4f}"
        lines.append(
            f"| {label} | {r['perplexity']:.3f} | {over:+.2%} | {verdict} |{columns(r)} {r['bits']:.2f} "
            f"| {r.get('format', '—')} "
            f"| {error} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def int4_verdicts(rows: list[tuple[str, dict, float | None]]) -> str:
    """Each int4 method against round-to-nearest of the same symmetry."""
    ppl = {label: r["perplexity"] for label, r, _ in rows}
    verdicts = []
    for suffix in ("", " asymmetric"):
        rtn = ppl.get(f"rtn int4 g64{' (W4A16)' if not suffix else suffix}")
        for method in (f"gptq int4 g64 act-order{suffix}", f"awq int4 g64{suffix}"):
            if rtn is not None and method in ppl:
                verdicts.append(f"{method} {'<' if ppl[method] < rtn else '≥'} rtn ({ppl[method]:.3f} vs {rtn:.3f})")
    return ", ".join(verdicts)


def benchmark(
    name, dense, tokenizer, calibration, eval_windows, device, probe, wanted, partial=lambda text: None
) -> str:
    """Run every row (those `wanted` names, when given; the dense row always); `partial(text)` gets the table so
    far after each row (a long run keeps what it measured)."""
    rows = []
    for label, step, calibrated, bound in ROWS:
        if wanted and step is not None and label not in wanted:
            continue
        log.info("%s: %s", name, label)
        undivided = undivided_widths(dense, step)
        if undivided:  # refused, as a job's request would be, rather than measured on a partial recipe
            group = step["weights"]["group_size"]
            log.info("%s: %s refused: group size %d does not divide %s", name, label, group, undivided)
            r = {"perplexity": float("nan"), "bits": float("nan"), "seconds": 0.0, "eval_seconds": 0.0}
            r["format"] = f"refused: group size {group} does not divide the widths {undivided}"
            rows.append((label, r, bound))
            continue
        try:
            r = run_row(dense, tokenizer, step, calibration if calibrated else None, eval_windows, device, probe)
        except Exception as error:  # one broken scheme must not cost the other rows of a long run
            log.error("%s: %s failed:\n%s", name, label, traceback.format_exc())
            r = {"perplexity": float("nan"), "bits": float("nan"), "seconds": 0.0, "eval_seconds": 0.0}
            r["format"] = f"FAILED: {type(error).__name__}: {error}"[:200]
        log.info(
            "%s: %s -> perplexity %.3f (step %.0f s, eval %.0f s)",
            name,
            label,
            r["perplexity"],
            r["seconds"],
            r["eval_seconds"],
        )
        rows.append((label, r, bound))
        partial(table(name, rows) + "\n\n(partial: the run stopped here)\n")
    text = table(name, rows) + "\n\nint4 g64: " + int4_verdicts(rows) + "\n"
    print(text, flush=True)
    return text


def real_model(args, device) -> str:
    name, gguf_type, packaged = MODELS[args.model]
    gguf = Path(args.gguf) if args.gguf else packaged()
    if gguf is None or not Path(gguf).is_file():
        return f"### {name}\n\nnot run: its GGUF is not installed (pass --gguf)\n"
    loaded = load_model(gguf, "gguf", device)
    tok = loaded.tokenizer
    data = Path(args.data)
    calibration = token_windows(tok, data / "wikitext2-valid.txt", "txt", 512, args.calibration_windows, "calibration")
    evaluation = token_windows(tok, data / "wikitext2-test.txt", "txt", 512, args.eval_windows, "evaluation")
    with tempfile.TemporaryDirectory() as tmp:
        probe = QualityColumns(Path(tmp), data / "wikitext2-test.txt", args.cloze_documents, args.cloze_context_words)
        bos = " (each starting with `<bos>`)" if leading_special_ids(tok) else ""
        title = (
            f"{name} ({gguf_type} GGUF → float32), wikitext2-test {evaluation.shape[0]} × 512 tokens{bos}; "
            f"calibration {calibration.shape[0]} × 512 tokens of wikitext2-valid; cloze: {probe.documents} "
            f"wikitext2-test paragraphs (at most {args.cloze_context_words} words of context), last word among 4 of "
            "the paragraph's words (chance 25%)"
        )
        return benchmark(title, loaded.model, tok, calibration, evaluation, device, probe, args.rows, args.partial)


def small(args, device) -> str:
    folder = Path(args.small_model)
    text = Path(args.data) / "tinyshakespeare.txt"
    if not (folder / "model.safetensors").exists():
        training = ["--out", str(folder), "--device", str(device), "--data", str(text)]
        for option in ("steps", "batch", "seq_len", "lr", "hidden", "layers"):
            value = getattr(args, f"train_{option}")
            if value is not None:
                training += [f"--{option.replace('_', '-')}", str(value)]
        train_small.train(train_small.parser().parse_args(training))
    loaded = load_model(folder, "hf", device)
    tok = loaded.tokenizer
    train_text, held_out = train_small.split_text(text.read_text(encoding="utf-8"))
    ids = lambda text: torch.tensor(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    calibration = split_windows(ids(train_text), 256, 64)
    evaluation = split_windows(ids(held_out), 256, 40)
    params = sum(p.numel() for p in loaded.model.parameters()) / 1e6
    probe_folder = tempfile.TemporaryDirectory()
    probe = QualityColumns(Path(probe_folder.name), None, 0)  # KL only: a wikitext cloze says nothing here
    training = (folder / "TRAINING.txt").read_text().strip() if (folder / "TRAINING.txt").exists() else "?"
    title = (
        f"Llama {params:.1f}M trained from scratch in float32 on tinyshakespeare ({training}); held-out last 10%: "
        f"{evaluation.shape[0]} × 256 tokens; calibration {calibration.shape[0]} × 256 tokens of the training part"
    )
    try:
        return benchmark(title, loaded.model, tok, calibration, evaluation, device, probe, args.rows, args.partial)
    finally:
        probe_folder.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--calibration-windows", type=int, default=64, help="the model: 512-token windows of wikitext2-valid"
    )
    p.add_argument("--model", choices=tuple(MODELS), default="smollm2", help="the real model (GGUF)")
    p.add_argument("--only", choices=("model", "small", "smollm2"), help="one section (smollm2: --only model)")
    p.add_argument(
        "--rows",
        type=lambda v: set(re.split(r",(?=\S)", v)),
        default=None,
        help="comma-separated schemes (default all); a comma followed by a space stays in the name",
    )
    p.add_argument("--eval-windows", type=int, default=40, help="the model: 512-token windows of wikitext2-test")
    p.add_argument("--cloze-documents", type=int, default=200, help="the model: cloze documents (0: no cloze column)")
    p.add_argument("--cloze-context-words", type=int, default=120, help="the model: cloze context, at most")
    p.add_argument("--gguf", default=None, help="the model's GGUF (default: its package's)")
    p.add_argument("--data", default=str(SHARED_DATA), help="wikitext2-{valid,test}.txt and tinyshakespeare.txt")
    for option in ("steps", "batch", "seq-len", "lr", "hidden", "layers"):
        kind = float if option == "lr" else int
        p.add_argument(f"--train-{option}", type=kind, default=None, help="small model (default: train_small.py's)")
    p.add_argument("--small-model", default=str(ROOT / "benchmarks" / ".cache" / "shakespeare-llama"))
    p.add_argument("--output", default=None, help="default: benchmarks/quant_quality_tables_<model>_<date>.md")
    args = p.parse_args()
    if args.only == "smollm2":
        args.only, args.model = "model", "smollm2"
    if args.output is None:
        args.output = ROOT / "benchmarks" / f"quant_quality_tables_{args.model}_{datetime.date.today().isoformat()}.md"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = torch.device(args.device)
    started = time.perf_counter()
    sections: list[str] = []
    args.partial = lambda text: write(args, device, started, [*sections, text])
    if args.only in (None, "small"):
        sections.append(small(args, device))
    if args.only in (None, "model"):
        sections.append(real_model(args, device))
    write(args, device, started, sections)
    print(f"wrote {args.output} in {time.perf_counter() - started:.0f} s")


def write(args, device, started: float, sections: list[str]) -> None:
    versions = library_versions()
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    header = [
        "# Quantization quality",
        "",
        f"Command: `python benchmarks/quant_quality.py {' '.join(sys.argv[1:])}`".replace(" `", " `").rstrip(),
        f"Date: {datetime.date.today()}; machine: {platform.machine()} {machine}, "
        f"{torch.get_num_threads()} threads, device {device}; total {time.perf_counter() - started:.0f} s",
        f"Versions: python {platform.python_version()}, {json.dumps(versions)}",
        "",
        "Every perplexity is measured on the saved compressed-tensors artifact reloaded with "
        "`AutoModelForCausalLM.from_pretrained` (transformers + compressed-tensors, which decompress the weights "
        "and apply dynamic activation quantization in its forward). KL to dense: mean KL(dense ‖ scheme) in nats "
        "over the evaluation positions (dense top-64 + rest bucket, as the job report's quality.kl_divergence); "
        "top-1 agreement: share of positions where both pick the same next token; cloze accuracy: lm-eval-harness "
        "acc ± its standard error on the cloze task (as the report's quality.tasks).",
        "",
    ]
    vllm = [
        "### vLLM mapping (vLLM itself not run)",
        "",
        "| scheme | compressed-tensors scheme in vLLM |",
        "|---|---|",
    ]
    vllm += [f"| {k} | {v} |" for k, v in VLLM.items()]
    text = "\n".join(header) + "\n\n".join(sections) + "\n" + "\n".join(vllm) + "\n"
    Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
