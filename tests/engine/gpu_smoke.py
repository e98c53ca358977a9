"""Manual CUDA smoke run of the engine on the tiny model (not collected by pytest): python -m tests.engine.gpu_smoke"""

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

from tests.utils.factories import build_tiny_model, write_text_dataset
from worker.engine import EngineRequest, run_pipeline


def main() -> None:
    root = Path(tempfile.mkdtemp())
    model = build_tiny_model(root / "model")
    data = write_text_dataset(root / "eval.txt")
    recipe = [{"type": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global"}]
    if importlib.util.find_spec("compressed_tensors") is not None:
        recipe.append(
            {"type": "quantize", "method": "rtn", "weights": {"bits": 4, "group_size": 32, "symmetric": True}}
        )
    spec = {"model_id": "m", "recipe": recipe, "evaluation": {"dataset_id": "d", "seq_len": 64, "max_windows": 4}}
    report = run_pipeline(EngineRequest(model, "hf", spec, None, None, data, "txt", root / "out"), lambda e: None)
    json.dump({k: report[k] for k in ("baseline", "optimized", "ratios", "environment", "notes")}, sys.stdout, indent=1)
    assert report["environment"]["device"] != "cpu" or not torch.cuda.is_available()


if __name__ == "__main__":
    main()
