"""The optimization engine: pure PyTorch + transformers, no web, queue or database code.

Importing the package registers every recipe step (the step modules register themselves on import).
"""

from worker.engine import (  # noqa: F401  (registers the steps)
    (,
    awq,
    fp8,
    gptq,
    smoothquant,
)
    depth,
    distill,
    pruning,
    quantization,
    sparsegpt,
    structured,
    wanda,
)
from worker.engine.errors import EngineError
from worker.engine.pipeline import EngineRequest, ProgressEvent, ProgressFn, run_pipeline
from worker.engine.registry import registered_steps

__all__ = ["EngineError", "EngineRequest", "ProgressEvent", "ProgressFn", "registered_steps", "run_pipeline"]
