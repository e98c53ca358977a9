"""One family's candidates, built: what every candidate of a family starts from and is measured against
(`SearchContext`), and building one candidate the loop proposes into the model, exporting it as
compressed-tensors, measuring it as transformers reloads it (and timing or scoring it where the search asks) and
keeping its record and artifact in the search's state (`CandidateBuilder`).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from modelpress.specs import SearchPruning, SearchSpec
from worker.engine.evaluate import library_versions, score_tasks
from worker.engine.load.checkpoint import LoadedModel
from worker.engine.pipeline import cpu_copy
from worker.engine.search import candidates as cand
from worker.engine.search import speed
from worker.engine.search.budget import Budget, compare_tasks
from worker.engine.search.loop import Plan
from worker.engine.search.solver import Option
from worker.engine.search.state import SearchState

REFERENCE = "baseline-top-k.safetensors"  # the baseline's top-k, in the state folder, for every candidate's KL


@dataclass(frozen=True)
class SearchContext:
    """What every candidate of one family is built from and measured against, gathered once (per family: the
    unpruned one, then one per pruning option, each with its own starting model and options)."""

    loaded: LoadedModel  # the model as loaded (its tokenizer, and its byte counts)
    original: torch.nn.Module  # a CPU copy every candidate of the family starts from (pruned, in a pruned family)
    linears: dict[str, torch.nn.Linear]  # the targeted layers some allowed format fits
    options: dict[str, list[Option]]  # each layer's formats with their bytes and predicted damage
    calibration: torch.Tensor
    evaluation: torch.Tensor
    baseline: dict  # with the task scores (`tasks`) when the budget limits them
    scratch: Path  # where candidates are exported before they are packed
    prompt: torch.Tensor  # the decode prompt, on the device, where the objective times decoding
    pruning: SearchPruning | None = None  # the family's pruning option (None: unpruned)
    stage: str = "candidate"  # the family's candidate stages are "<stage> 1" … "<stage> N"
    sparsity: dict[str, float] | None = None  # a pruned family: each pruned layer's share of exact zeros


@dataclass(frozen=True)
class CandidateBuilder:
    """What building and measuring a candidate needs from the search, gathered once per search."""

    spec: SearchSpec
    source_format: str  # the uploaded model's format, for the manifest
    state: SearchState
    device: torch.device
    budget: Budget
    tasks: Sequence  # the budget's task sources (empty: no task limit)
    decode_speed: speed.DecodeSpeedFn | None  # None: decoding is not timed
    stage: Callable[[str], Callable[[float, str], None]]  # a stage's name -> its progress reporter

    def build(self, index: int, in_family: int, plan: Plan, context: SearchContext) -> dict:
        """Build, export and measure one candidate (the index-th of the search, the in_family-th of its family),
        or read it back when an earlier attempt finished it."""
        key, method, assignment = plan.key, plan.method, plan.assignment
        loaded, linears = context.loaded, context.linears
        report = self.stage(f"{context.stage} {in_family + 1}")
        done = self.state.read(f"candidates/{key}.json")
        if done is not None and self.state.path(f"candidates/{key}.tar").is_file():
            report(1.0, f"candidate {index + 1} finished by an earlier attempt")
            return done
        started = time.perf_counter()
        pruned = "" if context.pruning is None else f" on the {context.pruning.label} pruned model"
        report(0.0, f"building candidate {index + 1} with {method.value}{pruned}")
        model = cpu_copy(context.original).to(self.device)
        working = dict(model.named_modules())
        layer_modules = {name: working[name] for name in linears}
        quantized = cand.build_(
            model, layer_modules, assignment, method, context.calibration, self.device, lambda f, m: report(0.6 * f, m)
        )
        decode = None
        if self.decode_speed is not None:
            report(0.6, f"timing candidate {index + 1}'s decode")
            decode = self.decode_speed(model, quantized, context.prompt)
        folder = context.scratch / key
        pruning = None if context.pruning is None else context.pruning.model_dump(mode="json")
        manifest = {
            "search": self.spec.model_dump(mode="json"),
            "candidate": {"method": method.value, "assignment": dict(assignment), "pruning": pruning},
            "libraries": library_versions(),
            "source_format": self.source_format,
            "sparsity": {"layers": context.sparsity} if context.sparsity else None,
        }
        cand.export_(model, loaded.tokenizer, quantized, folder, manifest)
        del model, working, layer_modules

        def score(model, tokenizer) -> list[dict]:
            return score_tasks(model, tokenizer, self.tasks, context.scratch, lambda f, m: report(0.9 + 0.1 * f, m))

        measured = cand.measure(
            folder,
            context.evaluation,
            self.device,
            self.state.path(REFERENCE),
            context.baseline["perplexity"],
            lambda f, m: report(0.65 + (0.25 if self.tasks else 0.35) * f, m),
            sorted(context.sparsity or ()),
            score if self.tasks else None,
        )
        tasks = compare_tasks(context.baseline["tasks"], measured.pop("tasks")) if self.tasks else None
        measured["decode"] = decode
        self.state.completed(cand.pack(folder, self.state.path(f"candidates/{key}.tar")))
        shutil.rmtree(folder, ignore_errors=True)
        record = {
            "key": key,
            "method": method.value,
            "pruning": pruning,
            "formats": cand.format_counts(assignment),
            "assignment": dict(assignment),
            "target_nll_increase": plan.target,
            "predicted": {
                "nll_increase": plan.predicted,
                "perplexity_increase": math.expm1(plan.predicted),
                "kl_divergence": plan.predicted,
                "size_bytes": cand.predicted_size(loaded.model, linears, assignment),
                "linear_weight_bytes": cand.linear_weight_bytes(loaded.model, linears, assignment),
                "task_accuracy_drop": None,  # no per-layer task predictor
            },
            "measured": measured,
            "tasks": tasks,
            "speed_source": speed.MODEL if decode is None else speed.MEASURED,
            "duration_s": time.perf_counter() - started,
        }
        record["meets_budget"] = self.budget.meets(record)
        self.state.write(f"candidates/{key}.json", record)
        report(1.0, f"candidate {index + 1}: perplexity {measured['perplexity']:.4g}")
        return record
