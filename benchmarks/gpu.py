"""The GPU benchmark in one command: how fast the engine optimizes an 8B-shaped model (benchmarks/gpu_engine.py)
and how fast the optimized models run (benchmarks/gpu_speed.py), on one GPU, one after the other in one process.

    python benchmarks/gpu.py [--part engine,speed] [--out-dir DIR] [--engine-budget S] [--speed-budget S] [--smoke]

Each part frees its models before the next. The two parts together need about 12 minutes on one H200; where a
machine limits a command to 10 minutes, run `--part engine` and `--part speed` as two commands
(benchmarks/gpu.md says how its figures were taken). Writes gpu_engine_steps_DATE.json and gpu_speed_DATE.json
in the output folder.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_engine, gpu_speed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="engine,speed", help="comma-separated: engine, speed")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--engine-budget", type=float, default=330.0, help="seconds (gpu_engine --budget)")
    parser.add_argument("--speed-budget", type=float, default=450.0, help="seconds (gpu_speed --budget-s)")
    parser.add_argument("--smoke", action="store_true", help="tiny models: every code path in seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parts = {p.strip() for p in args.part.split(",") if p.strip()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    smoke = ["--smoke"] if args.smoke else []
    if "engine" in parts:
        engine_out = args.out_dir / f"gpu_engine_steps_{date.today()}.json"
        engine_args = ["--device", args.device, "--out", str(engine_out), *smoke]
        gpu_engine.run(gpu_engine.parse_args([*engine_args, "--budget", str(args.engine_budget)]))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "speed" in parts:
        speed_args = ["--device", args.device, "--out", str(args.out_dir / f"gpu_speed_{date.today()}.json"), *smoke]
        result = gpu_speed.run(gpu_speed.parse_args([*speed_args, "--budget-s", str(args.speed_budget)]))
        print(result.get("table", "no measurement"), flush=True)


if __name__ == "__main__":
    main()
