"""Task accuracy with lm-eval-harness: each of the job's `evaluation.tasks` scored on a model in memory (the
baseline, then the reloaded artifact) through lm-eval's `HFLM` wrapped around it.

Uploaded tasks were checked at upload (data-only keys, local .jsonl files, no `!function`); here they run with the
Hugging Face hub switched off, so nothing is fetched, and their Jinja prompt templates render in Jinja's sandbox
(lm-eval's own template environment is not sandboxed). A task of lm-eval's registry (`name`) loads lm-eval's
shipped config and fetches its data from the hub; where that fails, its entry carries the error and the job goes
on: task accuracy never fails the compression work.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from modelpress.specs import TASK_DATASET_FORMAT, JobSpec, SearchSpec, TaskSpec
from worker.engine.steps import EngineError

log = logging.getLogger(__name__)

TASK_FILE = "task.yaml"
BATCH_SIZE = 16
METRIC = "acc"


@dataclass(frozen=True)
class TaskSource:
    """One task of the job: its spec and, for an uploaded task, the folder holding `task.yaml` and its data."""

    spec: TaskSpec
    folder: Path | None = None


def task_sources(spec: JobSpec | SearchSpec, datasets: dict[str, tuple[Path, str]]) -> list[TaskSource]:
    """The job's tasks in order; an uploaded one with the folder of its stored YAML and data (from `datasets`,
    id -> (path, format))."""
    sources = []
    for task in () if spec.evaluation is None else spec.evaluation.tasks:
        path, data_format = datasets.get(task.dataset_id, (None, None)) if task.dataset_id else (None, None)
        if task.dataset_id is not None and (path is None or data_format != TASK_DATASET_FORMAT):
            raise EngineError(
                "missing_dataset", f"the job names task dataset {task.dataset_id}, but no lm-eval task was given"
            )
        sources.append(TaskSource(task, None if path is None else Path(path)))
    return sources


def uploaded_task_config(folder: Path, cache_dir: Path) -> dict[str, Any]:
    """The uploaded task's config with its data files as absolute paths, and the datasets cache in `cache_dir`."""
    config = yaml.safe_load((folder / TASK_FILE).read_text(encoding="utf-8"))
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"] = {
        "data_files": {
            split: [str(folder / name) for name in ([names] if isinstance(names, str) else names)]
            for split, names in files.items()
        },
        "cache_dir": str(cache_dir),
    }
    return config


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """No request to the Hugging Face hub from huggingface_hub, transformers or datasets while it is open (they
    read the flag at import, so the imported constants are switched, then put back)."""
    import datasets.config
    import huggingface_hub.constants

    saved = (
        huggingface_hub.constants.HF_HUB_OFFLINE,
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_DATASETS_OFFLINE,
    )
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        (
            huggingface_hub.constants.HF_HUB_OFFLINE,
            datasets.config.HF_HUB_OFFLINE,
            datasets.config.HF_DATASETS_OFFLINE,
        ) = saved


@contextlib.contextmanager
def sandboxed_templates() -> Iterator[None]:
    """lm-eval renders prompt templates with one module-level Jinja environment; swap in a sandboxed one (same
    settings and filters), so a template cannot reach Python internals."""
    import lm_eval.utils
    from jinja2 import BaseLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    sandbox = SandboxedEnvironment(loader=BaseLoader(), undefined=StrictUndefined, keep_trailing_newline=True)
    sandbox.filters.update(lm_eval.utils.env.filters)
    saved, lm_eval.utils.env = lm_eval.utils.env, sandbox
    try:
        yield
    finally:
        lm_eval.utils.env = saved


def accuracy_of(results: dict[str, Any], task_name: str) -> dict[str, Any]:
    """`accuracy`, `stderr` and `n` from lm-eval's results for one task (the stderr of a mean, as lm-eval gives
    it: sample standard deviation / √n)."""
    scores = results["results"][task_name]
    stderr = scores.get(f"{METRIC}_stderr,none")
    entry = {
        "accuracy": float(scores[f"{METRIC},none"]),
        "stderr": float(stderr) if isinstance(stderr, int | float) and math.isfinite(stderr) else None,
        "n": int(results["n-samples"][task_name]["effective"]),
    }
    if "acc_norm,none" in scores:
        entry["accuracy_norm"] = float(scores["acc_norm,none"])
    return entry


@functools.cache
def registry() -> Any:
    """lm-eval's task registry, indexed once per process (a job's process: ≈15 000 configs, about a minute)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def score_task(model: torch.nn.Module, tokenizer: Any, source: TaskSource, scratch: Path) -> dict[str, Any]:
    """Accuracy of `model` on one task: {task, accuracy, stderr, n[, accuracy_norm]}; raises when it cannot run."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # HFLM sets a pad token on the tokenizer it is given: hand it a copy, the artifact keeps the original
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=BATCH_SIZE)
    if source.folder is not None:
        config = uploaded_task_config(source.folder, scratch / "datasets-cache")
        task, manager, offline = config, TaskManager(include_defaults=False), hub_offline()
        name = config["task"]
    else:
        task, manager, offline = source.spec.name, registry(), contextlib.nullcontext()
        name = source.spec.name
    with offline, sandboxed_templates():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            task_manager=manager,
            limit=source.spec.limit,
            log_samples=False,
            bootstrap_iters=1000,  # acc is a mean: its stderr is analytic; only other metrics would resample
        )
    if results is None or name not in results.get("results", {}):
        raise RuntimeError(f"lm-eval returned no result for task {name!r}")
    if f"{METRIC},none" not in results["results"][name]:
        raise RuntimeError(f"task {name!r} reports no accuracy ({METRIC}); use a multiple_choice task")
    return {"task": name, **accuracy_of(results, name)}


def failure(source: TaskSource, exc: BaseException) -> str:
    """What to tell the user when a task could not be scored."""
    text = f"{type(exc).__name__}: {exc}"
    if source.folder is None:
        return (
            f"lm-eval's registry task {source.spec.name!r} could not run ({text}); registry tasks fetch their data "
            "from the Hugging Face hub, which this worker may not reach: upload the task as an lm-eval task "
            "archive (YAML + .jsonl) to score it offline"
        )
    return f"the uploaded task could not run ({text})"


def score_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    sources: list[TaskSource],
    scratch: Path,
    progress: Callable[[float, str], None],
) -> list[dict[str, Any]]:
    """One entry per task, in order: its scores, or `error` saying why it could not be scored."""
    entries = []
    for i, source in enumerate(sources):
        progress(i / len(sources), f"task {source.spec.label}")
        try:
            if tokenizer is None:
                raise ValueError("the model has no tokenizer, which lm-eval needs")
            entry = score_task(model, tokenizer, source, scratch)
        except Exception as exc:  # noqa: BLE001 (a task that cannot run must not fail the job; the report says why)
            log.warning("task %s was not scored", source.spec.label, exc_info=True)
            entry = {"task": source.spec.name, "error": failure(source, exc)}
        entries.append({"source": source.spec.model_dump(mode="json", exclude_none=True), **entry})
    if sources:
        progress(1.0, "tasks scored")
    return entries
