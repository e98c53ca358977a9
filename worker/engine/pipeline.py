"""The optimization pipeline: load, evaluate, run the recipe's steps in order, export, evaluate the artifact.

The baseline's evaluation keeps its top-k next-token log-probabilities in a file in the job's scratch folder
(beside the staged artifact); the artifact's evaluation reads them for the KL divergence, so the two models are
never in memory together. The job's lm-eval tasks are scored in the same two stages, on the same two models.

Where the model lives is decided once, after loading (`execution.plan_execution`): `whole` on the device when
it fits there with room for the job's work, else `onloaded`: the model stays in host memory and every stage
that walks the decoder layers (calibrated steps, perplexity and KL divergence, export) moves one layer at a
time to the device. Onloaded jobs measure no speed and generate no samples (both need the whole model on the
device) and cannot distill. The report's `execution` says which mode ran and the job's peak GPU and host memory.
From loading on, the job runs with as many intra-op CPU threads as its model's size can use
(`execution.cpu_threads_for`, at most the process's own setting; `execution.cpu_threads` in the report): one for a
model under two million weights, whose matrix products are too small to split.

Stages, in order, each reported through the progress callback: "load", "evaluate baseline", one per recipe
step ("prune:magnitude", ...), "export", "evaluate optimized". `step_index` counts from 1 to `total_steps`;
`fraction` is the stage's own progress in [0, 1]. The callback may raise (the worker does so to cancel): the
exception propagates and the pipeline stops.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelpress.specs import CalibrationSpec, EvaluationSpec, JobSpec, KnowledgeDistill, SearchSpec, StepSpec
from worker.engine.calibrate.windows import token_windows
from worker.engine.evaluate import (
    EvalPlan,
    ReferenceReader,
    ReferenceWriter,
    build_report,
    device_name,
    evaluate,
    kernel_speed,
    library_versions,
    merge_samples,
    safetensors_bytes,
    score_tasks,
    state_dict_bytes,
    task_sources,
    tasks_section,
)
from worker.engine.evaluate.measure import tensor_bytes_in_memory
from worker.engine.execution import (
    ExecutionPlan,
    ProcessPeaks,
    cpu_threads,
    cpu_threads_for,
    device_free_bytes,
    job_working_bytes,
    plan_execution,
)
from worker.engine.export import save_compressed_, tar_folder, write_layerwise_, write_manifest
from worker.engine.load.checkpoint import LoadedModel, load_model, pick_device, require_tokenizer
from worker.engine.prune import sparsity_of
from worker.engine.speed import CPU_SPEED_PATH, CUDA_SPEED_PATH, measure_copy_bandwidth, semi_structured_violations
from worker.engine.steps import EngineError, QuantizedWeight, StepContext, get_step, run_step

log = logging.getLogger(__name__)

LATENCY_TOKENS_WITHOUT_DATA = 128


@dataclass(frozen=True)
class ProgressEvent:
    step_index: int
    total_steps: int
    step: str
    fraction: float
    message: str


ProgressFn = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class EngineRequest:
    model_path: Path
    model_format: str
    spec: JobSpec | SearchSpec  # a search runs through worker.engine.search.run_search
    calibration_path: Path | None
    calibration_format: str | None
    evaluation_path: Path | None
    evaluation_format: str | None
    output_dir: Path
    device: str | None = None
    datasets: dict[str, tuple[Path, str]] = field(default_factory=dict)  # id -> (path, "txt" | "jsonl"), distill
    checkpoint_dir: Path | None = None  # kept across retries of the same job; the worker deletes it at the end
    on_checkpoint: Callable[[Path], None] | None = None  # called with each checkpoint file once it is complete
    device_memory_bytes: int | None = None  # device memory the execution plan assumes free; None: measured


def run_pipeline(request: EngineRequest, progress: ProgressFn) -> dict:
    """Run a job; write model.tar and report.json into request.output_dir; return the report."""
    return _Runner(request, progress).run()


class _Runner:
    """State of one job while it runs (dies with it)."""

    def __init__(self, request: EngineRequest, progress: ProgressFn) -> None:
        self.request = request
        self.progress = progress
        self.recipe: list[StepSpec] = list(request.spec.recipe)
        if not self.recipe:
            raise EngineError("bad_spec", "the recipe has no steps")
        for step in self.recipe:
            get_step(step)  # unknown steps fail before any work
        self.stages = ["load", "evaluate baseline", *(s.key for s in self.recipe), "export", "evaluate optimized"]
        self.device = pick_device(request.device)
        self.notes: list[str] = []
        self.tokenizer: Any | None = None
        self.tasks = task_sources(request.spec, request.datasets)
        self.peaks = ProcessPeaks(self.device)
        self.execution: ExecutionPlan | None = None
        self.threads = torch.get_num_threads()  # intra-op CPU threads from loading on: sized to the model

    def stage(self, index: int) -> Callable[[float, str], None]:
        def report(fraction: float, message: str) -> None:
            self.peaks.sample()
            event = ProgressEvent(
                index + 1, len(self.stages), self.stages[index], min(max(fraction, 0.0), 1.0), message
            )
            self.progress(event)

        return report

    def run(self) -> dict:
        output_dir = Path(self.request.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        loaded, plan, evaluation_info, calibration = self.load(self.stage(0))
        with cpu_threads(self.threads):
            return self.run_loaded(loaded, plan, evaluation_info, calibration, output_dir)

    def run_loaded(
        self, loaded: LoadedModel, plan: EvalPlan, evaluation_info: dict | None, calibration, output_dir: Path
    ) -> dict:
        """Everything after loading: the baseline's measurements, the recipe, export and the artifact's."""
        scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=output_dir))  # the baseline's top-k, for the KL
        try:
            reference = (
                None if plan.windows is None else ReferenceWriter(scratch / "baseline-top-k.safetensors", plan.kl_top_k)
            )
            baseline_speed = self.gpu_speed(loaded.model, plan, {}, set(), self.stage(1))
            baseline = self.evaluate(loaded, plan, self.stage(1), baseline_speed, reference)
            baseline_tasks = self.score_tasks(loaded.model, loaded.tokenizer, scratch, self.stage(1))
            baseline["metrics"]["size_bytes"] = state_dict_bytes(loaded.model)
            baseline["metrics"]["size_method"] = (
                "tensor bytes of the model's state dict in its dtype (tied tensors once)"
            )
            divergence = None if reference is None else ReferenceReader(reference.save())
            steps, quantized, pruned = self.run_recipe(loaded.model, calibration)
            export_stage = self.stage(len(self.stages) - 2)
            sparse_24 = (
                self._sparse_24(loaded.model, pruned) if self.device.type == "cuda" and not self.onloaded else set()
            )
            optimized_speed = self.gpu_speed(loaded.model, plan, quantized, sparse_24, export_stage)
            staging = scratch / "artifact"
            staging.mkdir()
            self.export(loaded, quantized, pruned, staging, output_dir / "model.tar", export_stage)
            del loaded
            self._free_memory()
            optimized, optimized_tasks = self.evaluate_artifact(
                staging, plan, self.stage(len(self.stages) - 1), optimized_speed, divergence, scratch
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if divergence is None:
            self.notes.append("no evaluation dataset: the KL divergence to the baseline was not measured (null)")
        report = build_report(
            baseline=baseline["metrics"],
            optimized=optimized["metrics"],
            steps=steps,
            samples=merge_samples(baseline["samples"], optimized["samples"]),
            device=self.device,
            evaluation=evaluation_info,
            calibration=None
            if calibration is None
            else {"windows": calibration.shape[0], "seq_len": calibration.shape[1]},
            notes=self.notes,
            quantized=bool(quantized),
            kl_divergence=None if divergence is None else divergence.result(),
            tasks=tasks_section(baseline_tasks, optimized_tasks),
        )
        report["speed"] = self.speed_section(baseline["speed"], optimized["speed"])
        report["execution"] = {**self.execution.to_dict(), "cpu_threads": self.threads, **self.peaks.to_dict()}
        (output_dir / "report.json").write_text(json.dumps(report, indent=2))
        return report

    def load(self, report: Callable[[float, str], None]):
        request, spec = self.request, self.request.spec
        report(0.0, f"loading {request.model_format} model")
        loaded = load_model(Path(request.model_path), request.model_format, self.device, to_device=False)
        self.tokenizer = loaded.tokenizer
        report(0.5, "model loaded into host memory")
        windows = calibration = evaluation_info = None
        if spec.evaluation is not None:
            windows = self._windows(
                loaded, spec.evaluation, request.evaluation_path, request.evaluation_format, "evaluation"
            )
            evaluation_info = {
                "seq_len": windows.shape[1],
                "windows": windows.shape[0],
                "max_windows": spec.evaluation.max_windows,
            }
        else:
            self.notes.append("no evaluation dataset: perplexity was not measured (null)")
        if spec.calibration is not None:
            calibration = self._windows(
                loaded, spec.calibration, request.calibration_path, request.calibration_format, "calibration"
            )
        report(0.8, "datasets tokenized")
        self.execution = self.choose_execution(loaded, calibration, windows)
        self.threads = cpu_threads_for(sum(p.numel() for p in loaded.model.parameters()), torch.get_num_threads())
        if not self.execution.onloaded:
            loaded.model.to(self.device)
        report(0.9, f"execution: {self.execution.mode} ({self.execution.reason}), {self.threads} CPU thread(s)")
        plan = EvalPlan(device=self.device, windows=windows, latency_ids=self._latency_ids(loaded, windows))
        if loaded.tokenizer is None:
            self.notes.append("the model has no tokenizer: no generated samples")
        report(1.0, "loaded")
        return loaded, plan, evaluation_info, calibration

    def choose_execution(self, loaded: LoadedModel, calibration: torch.Tensor | None, windows: torch.Tensor | None):
        """Whole on the device or onloaded layer by layer (see the module docstring), refused for what an
        onloaded model cannot run."""
        model = loaded.model
        working = job_working_bytes(
            model.config,
            model.dtype.itemsize,
            None if calibration is None else tuple(calibration.shape),
            None if windows is None else tuple(windows.shape),
        )
        free = self.request.device_memory_bytes
        if free is None:
            free = device_free_bytes(self.device)
        plan = plan_execution(tensor_bytes_in_memory(model), working, free, self.device)
        log.info("execution plan: %s (%s)", plan.mode, plan.reason)
        if plan.onloaded:
            distill = [spec.key for spec in self.recipe if isinstance(spec, KnowledgeDistill)]
            if distill:
                raise EngineError(
                    "model_too_large",
                    f"{distill[0]} trains the whole model on the device, and this model does not fit it "
                    f"({plan.reason}): run the job on a GPU with more memory, or without the distill step",
                )
            self.notes.append(
                f"execution onloaded ({plan.reason}): the model stayed in host memory and each decoder layer ran on "
                f"{self.device} in turn; speed and generated samples need the whole model on the device and were "
                "not measured"
            )
        return plan

    @property
    def onloaded(self) -> bool:
        return self.execution is not None and self.execution.onloaded

    def _windows(
        self,
        loaded: LoadedModel,
        data_spec: CalibrationSpec | EvaluationSpec,
        path: Path | None,
        data_format: str | None,
        purpose: str,
    ):
        if path is None or data_format is None:
            raise EngineError("missing_dataset", f"the job asks for {purpose} but no {purpose} dataset file was given")
        tokenizer = require_tokenizer(loaded.tokenizer, purpose)
        limit = data_spec.samples if isinstance(data_spec, CalibrationSpec) else data_spec.max_windows
        return token_windows(tokenizer, Path(path), data_format, data_spec.seq_len, limit, purpose)

    def _latency_ids(self, loaded: LoadedModel, windows: torch.Tensor | None) -> torch.Tensor:
        if windows is not None:
            return windows[:1]
        config = loaded.model.config
        length = min(
            LATENCY_TOKENS_WITHOUT_DATA, getattr(config, "max_position_embeddings", None) or LATENCY_TOKENS_WITHOUT_DATA
        )
        self.notes.append(f"latency timed on a fixed synthetic sequence of {length} token ids (no evaluation dataset)")
        return (torch.arange(length) % config.vocab_size).unsqueeze(0)

    def score_tasks(
        self, model: torch.nn.Module, tokenizer: Any, scratch: Path, report: Callable[[float, str], None]
    ) -> list[dict]:
        """The job's tasks scored on `model`; their progress as messages at the stage's end. Onloaded, each task
        says it was not scored: lm-eval runs the whole model on the device."""
        if self.onloaded:
            reason = "not scored: the model does not fit the device, and lm-eval runs the whole model there"
            return [
                {"source": s.spec.model_dump(mode="json", exclude_none=True), "task": s.spec.name, "error": reason}
                for s in self.tasks
            ]
        return score_tasks(model, tokenizer, self.tasks, scratch, lambda _, message: report(1.0, message))

    def evaluate(
        self,
        loaded: LoadedModel,
        plan: EvalPlan,
        report: Callable[[float, str], None],
        speed: dict | None,
        observer: ReferenceWriter | None,
    ) -> dict:
        report(0.0, "evaluating")
        return evaluate(loaded.model, loaded.tokenizer, plan, report, speed, observer, self.onloaded)

    def gpu_speed(
        self, model: torch.nn.Module, plan: EvalPlan, quantized: dict, sparse_24: set[str], report
    ) -> dict | None:
        """On CUDA: the model's speed on its serving kernels (bfloat16; quantized and 2:4 Linears on their
        low-bit kernels), measured before export changes anything. None on CPU (evaluate times the model as
        evaluated), and None with a note when the GPU harness fails (evaluate then times the model as it is)."""
        if self.device.type != "cuda" or self.onloaded:
            return None
        report(0.0, "timing the model on its GPU kernels")
        try:
            return kernel_speed(model, plan, quantized, sparse_24)
        except Exception as exc:  # the report still needs its timings: say why, then time the model as loaded
            log.exception("GPU speed harness failed")
            self.notes.append(
                f"the GPU speed harness failed ({type(exc).__name__}: {exc}); the model was timed as loaded"
            )
            return None

    def _sparse_24(self, model: torch.nn.Module, pruned: set[str]) -> set[str]:
        """The pruned Linears, when every one of them is 2:4 (then they run the semi-structured kernels)."""
        modules = dict(model.named_modules())
        weights = {n: modules[n].weight for n in pruned if isinstance(modules.get(n), torch.nn.Linear)}
        if not weights:
            return set()
        if all(semi_structured_violations(weight) == 0 for weight in weights.values()):
            return set(weights)
        self.notes.append("the pruned layers are not all 2:4 sparse: on the GPU they are timed with dense kernels")
        return set()

    def speed_section(self, baseline: dict, optimized: dict) -> dict:
        """The report's `speed`: each model's harness result (tokens/s, batch, kernels, method) and the path."""
        section: dict[str, Any] = {
            "path": CUDA_SPEED_PATH if self.device.type == "cuda" else CPU_SPEED_PATH,
            "device": device_name(self.device),
            "baseline": baseline,
            "optimized": optimized,
        }
        if self.device.type == "cuda" and baseline is not None and optimized is not None:
            bandwidth = measure_copy_bandwidth(self.device)
            section["copy_bandwidth"] = bandwidth
            for result in (baseline, optimized):
                result["floor_tokens_per_s"] = bandwidth["bytes_per_s"] / result["weight_bytes_per_token"]
        return section

    def run_recipe(self, model: torch.nn.Module, calibration: torch.Tensor | None):
        steps: list[dict[str, Any]] = []
        quantized: dict[str, QuantizedWeight] = {}
        pruned: set[str] = set()
        teachers = self._teacher_steps()
        snapshots = {None: cpu_copy(model)} if None in teachers else {}
        for i, spec in enumerate(self.recipe):
            report = self.stage(2 + i)
            report(0.0, f"running {spec.key}")
            started = time.perf_counter()
            checkpoint_dir = self.request.checkpoint_dir
            context = StepContext(
                calibration=calibration,
                report_progress=report,
                device=self.device,
                tokenizer=self.tokenizer,
                datasets=dict(self.request.datasets),
                teacher=snapshots.get(spec.teacher_step) if isinstance(spec, KnowledgeDistill) else None,
                checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir) / f"step-{i}",
                on_checkpoint=self.request.on_checkpoint,
            )
            result = run_step(model, spec, context)
            if i in teachers:
                snapshots[i] = cpu_copy(model)
            quantized.update(result.quantized)
            pruned.update(result.sparsified)
            self.notes.extend(note for note in result.notes if note not in self.notes)
            steps.append(
                {
                    "index": i,
                    "type": spec.type.value,
                    "method": spec.method,
                    "spec": spec.model_dump(mode="json"),
                    "duration_s": time.perf_counter() - started,
                    "layers": result.layers,
                    "summary": result.summary,
                }
            )
        return steps, quantized, pruned

    def _teacher_steps(self) -> set[int | None]:
        """The snapshots distill steps ask for: None = as uploaded, i = after recipe step i."""
        return {spec.teacher_step for spec in self.recipe if isinstance(spec, KnowledgeDistill)}

    def export(
        self, loaded: LoadedModel, quantized: dict, pruned: set[str], folder: Path, archive: Path, report
    ) -> None:
        report(0.0, "saving the model")
        modules = dict(loaded.model.named_modules())
        sparsity = {name: sparsity_of(modules[name].weight) for name in sorted(pruned) if name in modules}
        quantization_config = None
        if quantized:
            quantization_config = save_compressed_(loaded.model, quantized, folder, self.device)
            self.notes.append(
                "transformers runs compressed-tensors checkpoints by decompressing the weights to float at load: "
                + (
                    "the optimized peak memory is measured on that path, its speed on torch's low-bit kernels "
                    "(report `speed`)"
                    if self.device.type == "cuda"
                    else "the optimized latency and memory are measured on that path (vLLM runs the integer kernels)"
                )
            )
        else:
            write_layerwise_(loaded.model, folder, self.device)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(folder)
        report(0.6, "writing manifest")
        write_manifest(
            folder,
            {
                "job": self.request.spec.model_dump(mode="json"),
                "libraries": library_versions(),
                "source_format": self.request.model_format,
                "sparsity": {"layers": sparsity} if sparsity else None,
                "quantization": quantization_config,
            },
        )
        report(0.8, "packing model.tar")
        tar_folder(folder, archive)
        report(1.0, "exported")

    def evaluate_artifact(
        self,
        folder: Path,
        plan: EvalPlan,
        report: Callable[[float, str], None],
        speed: dict | None,
        divergence: ReferenceReader | None,
        scratch: Path,
    ) -> tuple[dict, list[dict]]:
        """The artifact's metrics, and its task scores, measured on the model transformers reloads from disk."""
        report(0.0, "reloading the artifact with transformers")
        reloaded = load_model(folder, "hf", self.device, to_device=not self.onloaded)
        result = evaluate(reloaded.model, reloaded.tokenizer, plan, report, speed, divergence, self.onloaded)
        result["metrics"]["size_bytes"] = safetensors_bytes(folder)
        result["metrics"]["size_method"] = "bytes of the artifact's *.safetensors files on disk"
        return result, self.score_tasks(reloaded.model, reloaded.tokenizer, scratch, report)

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen CPU copy of the model (a distillation teacher), made without a second copy on the GPU: each
    parameter and buffer is copied straight to host memory (deepcopy's memo hands those copies in, so tied
    weights stay tied), and only the module structure is deep-copied."""
    memo: dict[int, object] = {}
    for tensor in model.parameters():
        memo[id(tensor)] = torch.nn.Parameter(tensor.detach().to("cpu", copy=True), requires_grad=False)
    for tensor in model.buffers():
        memo[id(tensor)] = tensor.detach().to("cpu", copy=True)
    copy = deepcopy(model, memo).eval()
    copy.requires_grad_(False)
    return copy
