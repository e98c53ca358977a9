"""The optimization engine: pure PyTorch + transformers, no web, queue or database code.

Rooms, one package each: `load` (checkpoints in), `calibrate` (windows, the layer-by-layer driver, targets),
`prune`, `quantize`, `distill` (the recipe's methods, one module per method), `export` (compressed-tensors,
manifest, tar), `evaluate` (perplexity, memory, samples, the report) and `speed` (the timing harness and its
kernels, behind `measure_speed`), and `search` (the quality-budget search over per-layer formats). `steps` is
the contract between them and the `pipeline` that runs a job.
Importing the package registers every recipe step.
"""

from worker.engine import distill, prune, quantize  # noqa: F401  (registers the steps)
from worker.engine.pipeline import EngineRequest, ProgressEvent, ProgressFn, run_pipeline
from worker.engine.search import run_search
from worker.engine.steps import EngineError, registered_steps

__all__ = [
    "EngineError",
    "EngineRequest",
    "ProgressEvent",
    "ProgressFn",
    "registered_steps",
    "run_pipeline",
    "run_search",
]
