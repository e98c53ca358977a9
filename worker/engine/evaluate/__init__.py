"""Evaluate: perplexity, KL divergence to the baseline, speed (through the speed room), peak memory and
generations of a model, and the report that sets the baseline beside the optimized model."""

from worker.engine.evaluate.divergence import ReferenceReader, ReferenceWriter
from worker.engine.evaluate.evaluation import EvalPlan, evaluate, kernel_speed, perplexity
from worker.engine.evaluate.measure import device_name, safetensors_bytes, state_dict_bytes
from worker.engine.evaluate.report import build_report, library_versions, merge_samples

__all__ = [
    "EvalPlan",
    "ReferenceReader",
    "ReferenceWriter",
    "build_report",
    "device_name",
    "evaluate",
    "kernel_speed",
    "library_versions",
    "merge_samples",
    "perplexity",
    "safetensors_bytes",
    "state_dict_bytes",
]
