"""A quality-budget search, end to end: load, measure the baseline, measure every layer's sensitivity once,
then build and measure a few assignments around the budget and choose the best one that meets it as measured.

The loop: the solver gives the cheapest assignment whose predicted damage (mean NLL increase, nats per token)
fits a target, first the budget itself. Each built candidate is measured on the evaluation windows, and the next
target is read off the measured against predicted damage of the candidates built so far (the sensitivity rounds
to nearest and assumes layers add up; the build rounds with GPTQ and layers interact): interpolated between the
best candidate that met the budget and the least damaged one above it that missed, or scaled by the measured
over predicted damage of the one nearest the budget while only one side is known (see `budget`). When the next
target gives an assignment already built, the target is bisected between the best candidate that met the budget
and the cheapest that missed it; the loop ends when that repeats too, or at `max_candidates`. Every method in the
space is tried on the first assignment; the best measured one builds the rest.

Each pruning option in the space is one more family of candidates, searched the same way: the model is pruned
once (calibrated, as the recipe step), its sensitivity measured on the pruned model, and the loop above runs on
it. Every family's candidates are measured against the model as uploaded and chosen among together.

A task accuracy limit has no per-layer predictor: the predicted NLL increase stands in for it (see `budget`),
the baseline's task scores are measured once and kept, and every built candidate is scored on the tasks. The
`decode_speed` objective is timed on CUDA and modelled elsewhere (see `speed`).

Stages reported: "load", "evaluate baseline", "sensitivity", "candidate 1" … "candidate N", then per pruning
option k "prune k" and "prune k candidate 1" … "prune k candidate N", then "finish".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from modelpress.specs import SearchMethod, SearchObjective, SearchPruning, SearchSpec
from worker.engine.calibrate.targets import select_linears
from worker.engine.calibrate.windows import token_windows
from worker.engine.evaluate import (
    TASKS_METHOD,
    ReferenceWriter,
    device_name,
    library_versions,
    perplexity,
    score_tasks,
    state_dict_bytes,
    task_sources,
)
from worker.engine.load.checkpoint import LoadedModel, load_model, pick_device, require_tokenizer
from worker.engine.pipeline import EngineRequest, ProgressEvent, ProgressFn, cpu_copy
from worker.engine.prune import sparsity_of
from worker.engine.search import candidates as cand
from worker.engine.search import choice, speed
from worker.engine.search.budget import Budget, compare_tasks
from worker.engine.search.sensitivity import Sensitivity, measure_sensitivity
from worker.engine.search.solver import Option, cheapest, least_damage, solve, total
from worker.engine.search.state import SearchState
from worker.engine.steps import EngineError, StepContext, run_step

log = logging.getLogger(__name__)

REFERENCE = "baseline-top-k.safetensors"
BASELINE_TASKS = "baseline-tasks.json"
TASK_PROPOSAL = (
    "no per-layer task predictor: the predicted NLL increase stands in for task damage; the first target is the "
    "perplexity/KL limit (the cheapest assignment's predicted damage when only tasks are limited), a candidate "
    "that drops a task by more than the limit puts later targets below its predicted damage and one within it "
    "lets them rise, bisected geometrically between the two (4x steps while only one side is known)"
)


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
class Plan:
    """One candidate to build: its method and assignment, and the target its assignment was solved for."""

    key: str
    method: SearchMethod
    assignment: dict[str, str]
    predicted: float  # summed predicted damage, nats per token
    target: float


def run_search(
    request: EngineRequest, progress: ProgressFn, decode_speed: speed.DecodeSpeedFn = speed.measured_decode_speed
) -> dict:
    """Run a search; write report.json (and model.tar of the chosen candidate, if any) into request.output_dir.
    `decode_speed` times a built candidate for the `decode_speed` objective (None: not measured, the speed model
    stands); the default times on CUDA only."""
    return _Search(request, progress, decode_speed).run()


class _Search:
    """State of one search while it runs (dies with it)."""

    def __init__(self, request: EngineRequest, progress: ProgressFn, decode_speed: speed.DecodeSpeedFn) -> None:
        if not isinstance(request.spec, SearchSpec):
            raise EngineError("bad_spec", "run_search needs a search spec")
        self.request, self.spec, self.progress = request, request.spec, progress
        self.tasks = task_sources(self.spec, request.datasets)
        self.decode_speed = decode_speed if self.spec.objective == SearchObjective.decode_speed else None
        candidates = range(1, self.spec.max_candidates + 1)
        self.stages = [
            "load",
            "evaluate baseline",
            "sensitivity",
            *(f"candidate {i}" for i in candidates),
            *(
                stage
                for k in range(1, len(self.spec.space.pruning) + 1)
                for stage in (f"prune {k}", *(f"prune {k} candidate {i}" for i in candidates))
            ),
            "finish",
        ]
        self.device = pick_device(request.device)
        self.budget = Budget.of(self.spec.budget)
        self.limits = self.budget.nats

    def stage(self, index: int | str):
        if isinstance(index, str):
            index = self.stages.index(index)

        def report(fraction: float, message: str) -> None:
            fraction = min(max(fraction, 0.0), 1.0)
            self.progress(ProgressEvent(index + 1, len(self.stages), self.stages[index], fraction, message))

        return report

    def run(self) -> dict:
        started = time.perf_counter()
        output_dir = Path(self.request.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".search-", dir=output_dir))
        try:
            folder = self.request.checkpoint_dir or scratch / "state"
            self.state = SearchState(Path(folder) / "search", self.request.on_checkpoint)
            return self._run(output_dir, scratch, started)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _run(self, output_dir: Path, scratch: Path, started: float) -> dict:
        loaded, calibration, evaluation = self.load(self.stage(0))
        linears = select_linears(loaded.model, self.spec.space.targets, self.spec.space.ignore)
        formats = {name: cand.fitting_formats(linear, self.spec.space.formats) for name, linear in linears.items()}
        formats = {name: fits for name, fits in formats.items() if fits}
        if not formats:
            raise EngineError(
                "no_targets",
                "no Linear layer is targeted that any allowed format fits: check space.targets, space.ignore and "
                "space.formats (a group size must divide a layer's input width)",
            )
        linears = {name: linears[name] for name in formats}
        prompt = speed.speed_prompt(loaded.model, evaluation, self.device)
        baseline = self.baseline(loaded, evaluation, prompt, scratch, self.stage(1))
        sensitivity = self.sensitivity(loaded.model, linears, formats, calibration, self.stage(2))
        context = SearchContext(
            loaded,
            cpu_copy(loaded.model),
            linears,
            self.options(linears, formats, sensitivity),
            calibration,
            evaluation,
            baseline,
            scratch,
            prompt,
        )
        records = self.explore(context)
        families = [{"pruning": None, "candidates": len(records)}]
        for k, option in enumerate(self.spec.space.pruning, start=1):
            family = self.pruned_family(k, option, context, formats)
            found = self.explore(family, first=len(records))
            records += found
            families.append(
                {"pruning": option.model_dump(mode="json"), "label": option.label, "candidates": len(found)}
            )
        report = self.finish(records, families, baseline, sensitivity, output_dir, self.stage(len(self.stages) - 1))
        report["duration_s"] = time.perf_counter() - started
        return report

    # --- Inputs and the baseline --------------------------------------------------------------------------------

    def load(self, report) -> tuple[LoadedModel, torch.Tensor, torch.Tensor]:
        request, spec = self.request, self.spec
        report(0.0, f"loading {request.model_format} model")
        loaded = load_model(Path(request.model_path), request.model_format, self.device)
        tokenizer = require_tokenizer(loaded.tokenizer, "calibration")
        if request.calibration_path is None or request.evaluation_path is None:
            raise EngineError("missing_dataset", "a search needs calibration and evaluation dataset files")
        calibration = token_windows(
            tokenizer,
            Path(request.calibration_path),
            request.calibration_format,
            spec.calibration.seq_len,
            spec.calibration.samples,
            "calibration",
        )
        evaluation = token_windows(
            tokenizer,
            Path(request.evaluation_path),
            request.evaluation_format,
            spec.evaluation.seq_len,
            spec.evaluation.max_windows,
            "evaluation",
        )
        report(1.0, "loaded")
        return loaded, calibration, evaluation

    def baseline(self, loaded: LoadedModel, evaluation: torch.Tensor, prompt: torch.Tensor, scratch: Path, report):
        """The model as uploaded: perplexity, bytes, and its top-k kept for every candidate's KL divergence; its
        decode speed where the objective times it, and its task scores where the budget limits them."""
        done = self.state.read("baseline.json")
        if done is not None and self.state.path(REFERENCE).is_file():
            report(1.0, "baseline measured by an earlier attempt")
            return {**done, "tasks": self.baseline_tasks(loaded, scratch, report)}
        writer = ReferenceWriter(self.state.path(REFERENCE))
        result = perplexity(loaded.model, evaluation, self.device, report, writer)
        self.state.completed(writer.save())
        baseline = {
            "perplexity": result["perplexity"],
            "evaluation_tokens": result["tokens"],
            "size_bytes": state_dict_bytes(loaded.model),
            "size_method": "tensor bytes save_pretrained writes (tied tensors once)",
            "decode": None if self.decode_speed is None else self.decode_speed(loaded.model, {}, prompt),
        }
        self.state.write("baseline.json", baseline)
        return {**baseline, "tasks": self.baseline_tasks(loaded, scratch, report)}

    def baseline_tasks(self, loaded: LoadedModel, scratch: Path, report) -> list[dict]:
        """The model as uploaded scored on the budget's tasks, once (kept for a resumed search). A task that cannot
        be scored here fails the search: the task budget could not be checked."""
        if not self.tasks:
            return []
        done = self.state.read(BASELINE_TASKS)
        if done is not None:
            report(1.0, "baseline task scores measured by an earlier attempt")
            return done
        entries = score_tasks(loaded.model, loaded.tokenizer, self.tasks, scratch, report)
        for source, entry in zip(self.tasks, entries, strict=True):
            if entry.get("error") is not None:
                raise EngineError(
                    "task_failed",
                    f"evaluation.tasks {source.spec.label} could not be scored on the model as uploaded, so "
                    f"budget.task_accuracy_drop cannot be checked: {entry['error']}",
                )
        self.state.write(BASELINE_TASKS, entries)
        return entries

    def sensitivity(self, model, linears, formats, calibration, report, name="sensitivity.json") -> Sensitivity:
        done = self.state.read(name)
        if done is not None:
            report(1.0, "sensitivity measured by an earlier attempt")
            return Sensitivity.from_json(done)
        started = time.perf_counter()
        windows = calibration[: self.spec.sensitivity_windows]
        result = measure_sensitivity(model, linears, formats, windows, self.device, report)
        data = {**result.to_json(), "duration_s": time.perf_counter() - started}
        self.state.write(name, data)
        return Sensitivity.from_json(data)

    @staticmethod
    def options(linears, formats, sensitivity: Sensitivity) -> dict[str, list[Option]]:
        """Each layer's allowed formats with their bytes and predicted damage, for the solver."""
        scores = sensitivity.scores
        return {
            name: [Option(f.value, cand.format_bytes(linears[name], f), scores[name][f.value]) for f in fits]
            for name, fits in formats.items()
        }

    def pruned_family(self, k: int, option: SearchPruning, context: SearchContext, formats) -> SearchContext:
        """The context of pruning option k: the model pruned as the option says (calibrated, as the recipe step
        prunes), and the options from a sensitivity measured on the pruned model."""
        report = self.stage(f"prune {k}")
        report(0.0, f"pruning: {option.label}")
        model = cpu_copy(context.original).to(self.device)
        step = option.as_step(self.spec.space.targets, self.spec.space.ignore)
        step_context = StepContext(
            calibration=context.calibration, report_progress=lambda f, m: report(0.5 * f, m), device=self.device
        )
        result = run_step(model, step, step_context)
        modules = dict(model.named_modules())
        linears = {name: modules[name] for name in context.linears}
        sensitivity = self.sensitivity(
            model,
            linears,
            formats,
            context.calibration,
            lambda f, m: report(0.5 + 0.5 * f, m),
            f"sensitivity-{cand.pruning_key(option)}.json",
        )
        sparsity = {name: sparsity_of(modules[name].weight) for name in sorted(result.sparsified)}
        report(1.0, f"pruned {len(sparsity)} layers ({option.label})")
        return dataclasses.replace(  # `linears` stay the loaded model's (same shapes): the pruned one is let go
            context,
            original=cpu_copy(model),
            options=self.options(context.linears, formats, sensitivity),
            pruning=option,
            stage=f"prune {k} candidate",
            sparsity=sparsity,
        )

    # --- The loop ------------------------------------------------------------------------------------------------

    def explore(self, context: SearchContext, first: int = 0) -> list[dict]:
        """One family's candidates; `first`: how many the families before it built (the records' numbering)."""
        options = context.options
        records: list[dict] = []
        methods = list(self.spec.space.methods)
        budget = min(self.limits.values(), default=None)
        ceiling = total(options, cheapest(options), "damage")  # no target above it buys anything
        target, tried_targets = (ceiling if budget is None else budget), set()
        for _ in range(4 * self.spec.max_candidates):  # every pass builds one or stops; bounded all the same
            if len(records) >= self.spec.max_candidates:
                break
            assignment = solve(options, target)
            feasible = assignment is not None
            assignment = assignment or least_damage(options)
            method = methods[len(records)] if len(records) < len(methods) else self._best_method(records)
            key = cand.candidate_key(method, assignment, context.pruning)
            if any(r["key"] == key for r in records):
                target = self._bisect(records, tried_targets)
                if target is None:
                    break
                continue
            tried_targets.add(round(target, 12))
            predicted = total(options, assignment, "damage")
            plan = Plan(key, method, assignment, predicted, target)
            record = self.candidate(first + len(records), len(records), plan, context)
            record["feasible_as_predicted"] = feasible
            records.append(record)
            if budget == 0 or (not feasible and len(records) >= len(methods)):
                break  # nothing looser is allowed, or nothing tighter exists
            if len(records) >= len(methods):
                target = self._next_target(records, target, ceiling)
                if target is None:
                    break
        return records

    def _next_target(self, records: list[dict], target: float, ceiling: float) -> float | None:
        """The least of what the perplexity/KL limits (read off the candidates the building method measured, see
        `budget`) and the task limit (along the ladder) ask for; None when neither asks for anything."""
        method = self._best_method(records).value
        proposals = [self.budget.nats_target([r for r in records if r["method"] == method], target)]
        proposals.append(self.budget.task_target(records, ceiling))
        return min((p for p in proposals if p is not None), default=None)

    def _best_method(self, records: list[dict]) -> SearchMethod:
        """The method whose candidate on the first assignment measured the least damage."""
        first = records[: len(self.spec.space.methods)]
        best = min(first, key=lambda r: (self.budget.shortfall(r), r["measured"]["nll_increase"]))
        return SearchMethod(best["method"])

    def _bisect(self, records: list[dict], tried: set[float]) -> float | None:
        """A target between the best candidate that met the budget and the cheapest one that missed it (by
        predicted damage), or None when there is no such gap left to try."""
        met = [r["predicted"]["nll_increase"] for r in records if r["meets_budget"]]
        missed = [r["predicted"]["nll_increase"] for r in records if not r["meets_budget"]]
        if not met or not missed:
            return None
        low, high = max(met), min(missed)
        middle = (low + high) / 2
        if high <= low or round(middle, 12) in tried:
            return None
        tried.add(round(middle, 12))
        return middle

    def candidate(self, index: int, in_family: int, plan: Plan, context: SearchContext) -> dict:
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
            "source_format": self.request.model_format,
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

    # --- The choice ----------------------------------------------------------------------------------------------

    def finish(
        self, records: list[dict], families: list[dict], baseline: dict, sensitivity: Sensitivity, output_dir, report
    ):
        report(0.0, "choosing")
        objective = self.spec.objective
        chosen = choice.choose_(objective, self.budget, records)
        if chosen is not None:
            shutil.copyfile(self.state.path(f"candidates/{chosen['key']}.tar"), output_dir / "model.tar")
        result = {
            "kind": "search",
            "search": self.spec.model_dump(mode="json"),
            "device": device_name(self.device),
            "libraries": library_versions(),
            "baseline": baseline,
            "sensitivity": {
                "windows": sensitivity.windows,
                "tokens": sensitivity.tokens,
                "layers": len(sensitivity.scores),
                "method": "AutoQuantize's Fisher estimate: ½ Σ (∂ℓ/∂Y)² (Ŷ − Y)² per layer and format, weights "
                "rounded to nearest, one forward and backward pass per calibration window; predicted mean NLL "
                "increase in nats per token, layers summed",
            },
            "objective": choice.objective_section(objective, choice.is_timed(objective, records)),
            "tasks": None
            if not self.tasks
            else {"method": TASKS_METHOD, "proposal": TASK_PROPOSAL, "baseline": baseline["tasks"]},
            "candidates": records,
            "families": families,
            "pareto_front": [r["id"] for r in records if r["pareto"]],
            "chosen": None if chosen is None else chosen["id"],
            "message": choice.message(self.spec.budget, self.budget, chosen, records, baseline),
        }
        (output_dir / "report.json").write_text(json.dumps(result, indent=2))
        report(1.0, result["message"])
        return result
