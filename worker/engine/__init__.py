"""The optimization engine: pure PyTorch + transformers, no web, queue or database code.

Importing the package registers every recipe step (the step modules register themselves on import).
"""

from worker.engine import (  # noqa: F401  (registers the steps)
    awq,
    depth,
    distill,
    fp8,
    gptq,
    pruning,
    quantization,
    smoothquant,
    sparsegpt,
    structured,
    wanda,
)
from worker.engine.errors import EngineError
from worker.engine.pipeline import EngineRequest, ProgressEvent, ProgressFn, run_pipeline
from worker.engine.registry import registered_steps

__all__ = ["EngineError", "EngineRequest", "ProgressEvent", "ProgressFn", "registered_steps", "run_pipeline"]
