"""Evaluate: perplexity, KL divergence to the baseline, task accuracy (lm-eval-harness), speed (through the speed
room), peak memory and generations of a model, and the report that sets the baseline beside the optimized model."""

from worker.engine.evaluate.divergence import ReferenceReader, ReferenceWriter
from worker.engine.evaluate.evaluation import EvalPlan, evaluate, kernel_speed, perplexity
from worker.engine.evaluate.measure import device_name, safetensors_bytes, state_dict_bytes
from worker.engine.evaluate.report import TASKS_METHOD, build_report, library_versions, merge_samples, tasks_section
from worker.engine.evaluate.tasks import TaskSource, score_tasks, task_sources

__all__ = [
    "TASKS_METHOD",
    "EvalPlan",
    "ReferenceReader",
    "ReferenceWriter",
    "TaskSource",
    "build_report",
    "device_name",
    "evaluate",
    "kernel_speed",
    "library_versions",
    "merge_samples",
    "perplexity",
    "safetensors_bytes",
    "score_tasks",
    "state_dict_bytes",
    "task_sources",
    "tasks_section",
]
