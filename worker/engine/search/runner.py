"""A quality-budget search, end to end: load, measure the baseline, measure every layer's sensitivity once,
then build and measure a few assignments around the budget and choose the best one that meets it as measured.

The candidate loop (which assignments to build, from the targets the measured candidates ask for) is
`loop.explore`; this module gathers what it needs, builds and measures each candidate it proposes, and chooses.

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
import shutil
import tempfile
import time
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
from worker.engine.search import choice, loop, speed
from worker.engine.search.budget import Budget
from worker.engine.search.build import REFERENCE, CandidateBuilder, SearchContext
from worker.engine.search.sensitivity import GPTQ, NEAREST, Sensitivity, measure_sensitivity
from worker.engine.search.solver import Option
from worker.engine.search.state import SearchState
from worker.engine.steps import EngineError, StepContext, run_step

log = logging.getLogger(__name__)

BASELINE_TASKS = "baseline-tasks.json"
TASK_PROPOSAL = (
    "no per-layer task predictor: the predicted NLL increase stands in for task damage; the first target is the "
    "perplexity/KL limit (the cheapest assignment's predicted damage when only tasks are limited), a candidate "
    "that drops a task by more than the limit puts later targets below its predicted damage and one within it "
    "lets them rise, bisected geometrically between the two (4x steps while only one side is known)"
)


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
        self.builder: CandidateBuilder  # made once the state folder is known (`run`)

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
            self.builder = CandidateBuilder(
                self.spec,
                self.request.model_format,
                self.state,
                self.device,
                self.budget,
                self.tasks,
                self.decode_speed,
                self.stage,
            )
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
        # GPTQ-built candidates are predicted as GPTQ rounds them; any other method mix as rounding to nearest
        rounding = GPTQ if set(self.spec.space.methods) == {SearchMethod.gptq} else NEAREST
        result = measure_sensitivity(model, linears, formats, windows, self.device, report, rounding)
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

    # --- The candidates -----------------------------------------------------------------------------------------

    def explore(self, context: SearchContext, first: int = 0) -> list[dict]:
        """One family's candidates; `first`: how many the families before it built (the records' numbering)."""
        spec = self.spec
        return loop.explore(
            context.options,
            spec.space.methods,
            self.budget,
            spec.max_candidates,
            lambda in_family, plan: self.builder.build(first + in_family, in_family, plan, context),
            context.pruning,
        )

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
                "rounding": sensitivity.rounding,
                "method": "AutoQuantize's Fisher estimate: ½ Σ (∂ℓ/∂Y)² (Ŷ − Y)² per layer and format, weights "
                f"rounded {'by GPTQ on the same windows' if sensitivity.rounding == GPTQ else 'to nearest'}, one "
                "forward and backward pass per calibration window; predicted mean NLL increase in nats per token, "
                "layers summed",
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
