"""One real metric report carrying the KL divergence, per-layer damage and task accuracy, for the README: a tiny
random Llama (tests/utils/factories.py, no hub) pruned with `structured` (25% of MLP channels), then RTN int4
g32, calibrated and evaluated on the factory's sample text, with the cloze task built from that text.

    python benchmarks/example_report.py [--out benchmarks/example_report_tiny_llama_<date>.json]

It runs the engine's pipeline as a job does (minutes on a CPU) and writes the report's `quality` and `damage`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelpress.specs import JobSpec  # noqa: E402
from tests.utils.factories import build_tiny_model, unpack_task, write_cloze_task, write_text_dataset  # noqa: E402
from worker.engine import EngineRequest, run_pipeline  # noqa: E402

SPEC = {
    "model_id": "tiny",
    "recipe": [
        {"type": "prune", "method": "structured", "mlp_sparsity": 0.25},
        {"type": "quantize", "method": "rtn", "weights": {"bits": 4, "group_size": 32}},
    ],
    "calibration": {"dataset_id": "text", "samples": 8, "seq_len": 64},
    "evaluation": {"dataset_id": "text", "seq_len": 64, "max_windows": 8, "tasks": [{"dataset_id": "cloze"}]},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dated = ROOT / "benchmarks" / f"example_report_tiny_llama_{datetime.date.today().isoformat()}.json"
    parser.add_argument("--out", type=Path, default=dated)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text = write_text_dataset(root / "text.txt")
        task = unpack_task(write_cloze_task(root / "cloze.tar"), root / "cloze")
        request = EngineRequest(
            model_path=build_tiny_model(root / "model"),
            model_format="hf",
            spec=JobSpec.model_validate(SPEC),
            calibration_path=text,
            calibration_format="txt",
            evaluation_path=text,
            evaluation_format="txt",
            output_dir=root / "out",
            device="cpu",
            datasets={"cloze": (task, "lm-eval")},
        )
        report = run_pipeline(request, lambda event: None)
    excerpt = {"job": SPEC, "quality": report["quality"], "damage": report["damage"]}
    args.out.write_text(json.dumps(excerpt, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
