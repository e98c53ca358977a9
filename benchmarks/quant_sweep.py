"""How much the int4 g64 results of benchmarks/quant_quality.py depend on the calibration set and on GPTQ's
dampening: SmolLM2-135M, the same evaluation (wikitext2-test, 40 × 512 tokens, artifact reloaded by
transformers), the int4 g64 rows re-run under each calibration setting.

Calibration settings are (windows × tokens) of wikitext2-valid, from its start. 64 × 512 is quant_quality's
default; 128 × 2048 is GPTQ's paper setting (128 segments of 2048 tokens), which takes nearly all of
wikitext2-valid. Every row of one run shares the dense model, the tokenizer and the evaluation windows.

    python benchmarks/quant_sweep.py --device cuda [--gguf FILE] [--data ../shared/data]
        [--settings 64x512,128x2048,512x512] [--methods gptq,awq] [--dampening 0.01,0.1]
        [--variant 'gptq:ts={"true_sequential": true}' ...] [--variants-only] [--out FILE.json]

Each `--variant METHOD:LABEL=JSON` adds rows of that method with the JSON's options added to its step (both
symmetries; for GPTQ at every dampening), next to the method's plain rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quant_quality import INT4, INT4_ASYM, run_row  # noqa: E402
from tests.utils.factories import SHARED_DATA, SMOLLM2_GGUF, smollm2_dir  # noqa: E402
from worker.engine.calibrate.windows import token_windows  # noqa: E402
from worker.engine.load.checkpoint import load_model  # noqa: E402

log = logging.getLogger("quant_sweep")


def parse_variants(texts: list[str]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """{method: [(label, extra step options)]} from `METHOD:LABEL=JSON` arguments; every method gets ("", {})."""
    variants: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for text in texts:
        method, rest = text.split(":", 1)
        label, options = rest.split("=", 1)
        variants.setdefault(method, []).append((label, json.loads(options)))
    return variants


def steps(
    methods: list[str],
    dampening: list[float],
    variants: dict[str, list[tuple[str, dict[str, Any]]]] | None = None,
    plain: bool = True,
) -> list[tuple[str, dict[str, Any]]]:
    """(label, quantize step) for each method, symmetry, (GPTQ) dampening and variant; without `plain`, only
    the variants' rows of the methods that have variants."""
    variants = variants or {}
    base = [("", {})] if plain else []
    found = []
    for weights, symmetry in ((INT4, "sym"), (INT4_ASYM, "asym")):
        if "rtn" in methods:
            found.append((f"rtn {symmetry}", {"method": "rtn", "weights": weights}))
        for label, extra in [*base, *variants.get("gptq", [])] if "gptq" in methods else []:
            for damp in dampening:
                step = {"method": "gptq", "weights": weights, "act_order": True, "dampening": damp, **extra}
                found.append((f"gptq act-order {symmetry} damp {damp} {label}".rstrip(), step))
        for label, extra in [*base, *variants.get("awq", [])] if "awq" in methods else []:
            found.append((f"awq {symmetry} {label}".rstrip(), {"method": "awq", "weights": weights, **extra}))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--data", default=str(SHARED_DATA))
    parser.add_argument("--settings", default="64x512,128x2048,512x512")
    parser.add_argument("--methods", default="gptq,awq")
    parser.add_argument("--dampening", default="0.01")
    parser.add_argument("--variant", action="append", default=[], help="METHOD:LABEL=JSON step options")
    parser.add_argument("--variants-only", action="store_true", help="skip the methods' plain rows")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / f"quant_sweep_{date.today()}.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(args.device)
    gguf = Path(args.gguf) if args.gguf else smollm2_dir() / SMOLLM2_GGUF
    loaded = load_model(gguf, "gguf", device)
    data = Path(args.data)
    evaluation = token_windows(loaded.tokenizer, data / "wikitext2-test.txt", "txt", 512, 40, "evaluation")
    result: dict[str, Any] = {"torch": torch.__version__, "device": str(device), "rows": []}
    dense = run_row(loaded.model, loaded.tokenizer, None, None, evaluation, device)
    result["dense"] = dense["perplexity"]
    methods = args.methods.split(",")
    dampening = [float(d) for d in args.dampening.split(",")]
    for setting in args.settings.split(","):
        count, seq_len = (int(part) for part in setting.split("x"))
        calibration = token_windows(
            loaded.tokenizer, data / "wikitext2-valid.txt", "txt", seq_len, count, "calibration"
        )
        for label, step in steps(methods, dampening, parse_variants(args.variant), plain=not args.variants_only):
            started = time.perf_counter()
            row = run_row(loaded.model, loaded.tokenizer, step, calibration, evaluation, device)
            row.update(
                {
                    "setting": f"{calibration.shape[0]}x{seq_len}",
                    "scheme": label,
                    "vs_dense": row["perplexity"] / result["dense"] - 1,
                    "wall_s": time.perf_counter() - started,
                }
            )
            log.info("%s %s: %.3f (%+.2f%%)", row["setting"], label, row["perplexity"], 100 * row["vs_dense"])
            result["rows"].append(row)
            args.out.write_text(json.dumps(result, indent=2, default=str))
    args.out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
