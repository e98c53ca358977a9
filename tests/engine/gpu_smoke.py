"""Manual CUDA runs of the whole engine pipeline (not collected by pytest).

    python -m tests.engine.gpu_smoke                       # tiny random model: magnitude prune + rtn int4
    python -m tests.engine.gpu_smoke --gguf FILE --data DIR [--recipes gptq,fp8] [--out FILE.json]

With `--gguf`, each recipe runs as a real job on SmolLM2 (calibrated on wikitext2-valid, evaluated on
wikitext2-test), so the report's speed section comes from the GPU harness on the job's own low-bit kernels:
what a user of a GPU worker reads. Prints, and writes with --out, each report's speed, quality and notes.
"""

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from modelpress.specs import JobSpec
from tests.utils.factories import build_tiny_model, write_text_dataset
from worker.engine import EngineRequest, run_pipeline

RECIPES = {
    "gptq": {"type": "quantize", "method": "gptq", "weights": {"bits": 4, "group_size": 64}, "act_order": True},
    "fp8": {"type": "quantize", "method": "fp8"},
    "int8": {"type": "quantize", "method": "rtn", "weights": {"bits": 8}},
}
KEYS = ("baseline", "optimized", "ratios", "speed", "environment", "notes")


def tiny_job(root: Path) -> dict:
    model = build_tiny_model(root / "model")
    data = write_text_dataset(root / "eval.txt")
    recipe = [{"type": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global"}]
    if importlib.util.find_spec("compressed_tensors") is not None:
        recipe.append(
            {"type": "quantize", "method": "rtn", "weights": {"bits": 4, "group_size": 32, "symmetric": True}}
        )
    spec = JobSpec.model_validate(
        {"model_id": "m", "recipe": recipe, "evaluation": {"dataset_id": "d", "seq_len": 64, "max_windows": 4}}
    )
    report = run_pipeline(EngineRequest(model, "hf", spec, None, None, data, "txt", root / "out"), lambda e: None)
    assert report["environment"]["device"] != "cpu" or not torch.cuda.is_available()
    return {k: report.get(k) for k in KEYS}


def smollm2_job(root: Path, gguf: Path, data: Path, recipe: str, windows: int) -> dict:
    spec = JobSpec.model_validate(
        {
            "model_id": "smollm2",
            "recipe": [RECIPES[recipe]],
            "calibration": {"dataset_id": "valid", "samples": 64, "seq_len": 512},
            "evaluation": {"dataset_id": "test", "seq_len": 512, "max_windows": windows},
        }
    )
    request = EngineRequest(
        gguf,
        "gguf",
        spec,
        data / "wikitext2-valid.txt",
        "txt",
        data / "wikitext2-test.txt",
        "txt",
        root / recipe,
    )
    started = time.perf_counter()
    report = run_pipeline(request, lambda event: None)
    return {"recipe": recipe, "wall_s": time.perf_counter() - started, **{k: report.get(k) for k in KEYS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--recipes", default="gptq,fp8")
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 tokens")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    if args.gguf is None:
        results = [tiny_job(root)]
    else:
        results = [smollm2_job(root, args.gguf, args.data, name, args.windows) for name in args.recipes.split(",")]
    text = json.dumps(results, indent=1, default=str)
    if args.out is not None:
        args.out.write_text(text)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
