"""Job specs: the one JSON shape that is the request body, the task payload and the artifact manifest.

Imported by the API, the worker and the engine alike, so it must never import torch. Every recipe step is a
frozen pydantic model with `extra="forbid"` (a typo is a 422, never a silent default), selected by its
`type` and `method` pair. Each step class says once what the rest of the service needs to know about it: its
registry key, whether it learns from calibration text and whether it must close the recipe. The engine
registers its code under the class itself and receives the validated object, so every default lives here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    field_validator,
    model_validator,
)

DEFAULT_IGNORE = ("lm_head", r"re:.*\.mlp\.gate$")
"""The output head and mixture-of-experts routers (`mlp.gate`, not `mlp.gate_proj`) stay in full precision."""


def _step_selectors_required(schema: dict[str, Any]) -> None:
    """In a step's JSON schema, `type` and `method` are required (`method` not where its type has a default one).

    `step_key` picks the step's class by them before any class default applies, so a step without them is
    refused; with them required, the schema's union of steps accepts exactly what validation accepts.
    """
    properties = schema.get("properties", {})
    if "type" not in properties or "method" not in properties:
        return
    selectors = ["type"] if properties["type"].get("const") in DEFAULT_METHODS else ["type", "method"]
    schema["required"] = [*selectors, *(name for name in schema.get("required", []) if name not in selectors)]


class Spec(BaseModel):
    """Base for every spec: immutable, strict about unknown keys, no NaN or infinity."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", allow_inf_nan=False, json_schema_extra=_step_selectors_required
    )


class StepType(StrEnum):
    prune = "prune"
    quantize = "quantize"
    distill = "distill"


class StepSpec(Spec):
    """Base for every recipe step. A concrete step declares `type` and `method` literals; its class then carries:

    - `key`: `<type>:<method>`, derived from those literals (the registry and error messages use it);
    - `learns_from_data`: the step always needs the job's `calibration` text (see `needs_calibration`);
    - `final`: the step must be the recipe's last (quantization: later steps would undo its grid).
    """

    key: ClassVar[str] = ""
    learns_from_data: ClassVar[bool] = False
    final: ClassVar[bool] = False

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        step_type, method = cls.model_fields.get("type"), cls.model_fields.get("method")
        if step_type is not None and method is not None:
            cls.key = f"{step_type.default}:{method.default}"

    @property
    def needs_calibration(self) -> bool:
        """Whether this step, with its options, learns from calibration text."""
        return self.learns_from_data


class MagnitudeScope(StrEnum):
    """Where magnitude pruning compares weights: within each output row, a whole layer, or all layers."""

    row = "row"
    layer = "layer"
    global_ = "global"


class TargetedStep(StepSpec):
    """Targets and exclusions by module name, as llm-compressor names them.

    A pattern is either an exact module name, a module class name such as `Linear`, or a regular
    expression after `re:` matched from the start of the module name (`re:.*mlp.*`).
    Embeddings are never targeted (they are not Linear layers); lm_head and mixture-of-experts routers
    (`mlp.gate`) are ignored by default.
    """

    targets: tuple[str, ...] = Field(default=("Linear",), min_length=1)
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    @field_validator("targets", "ignore")
    @classmethod
    def _patterns_compile(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            if not pattern:
                raise ValueError("empty module pattern; use a module name, a class name or 're:<regex>'")
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from exc
        return patterns


class SparsityPattern(StrEnum):
    """Semi-structured N:M sparsity: exactly N nonzeros in every M consecutive input weights."""

    two_four = "2:4"
    four_eight = "4:8"

    @property
    def ratio(self) -> tuple[int, int]:
        n, m = self.value.split(":")
        return int(n), int(m)


class _UnstructuredPrune(TargetedStep):
    """Pruning that zeroes single weights: either a `sparsity` fraction or an N:M `pattern` (sparsity 1 − N/M)."""

    type: Literal[StepType.prune] = StepType.prune
    sparsity: float | None = Field(default=None, gt=0.0, lt=1.0, description="fraction of weights set to zero")
    pattern: SparsityPattern | None = None

    @model_validator(mode="after")
    def _sparsity_or_pattern(self) -> _UnstructuredPrune:
        if self.pattern is None:
            if self.sparsity is None:
                raise ValueError('give `sparsity` (a fraction in (0, 1)) or an N:M `pattern` such as "2:4"')
        else:
            n, m = self.pattern.ratio
            implied = 1 - n / m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"pattern {self.pattern.value} means sparsity {implied}, but sparsity {self.sparsity} was given; "
                    "drop `sparsity` or make it match"
                )
        return self

    @property
    def target_sparsity(self) -> float:
        if self.pattern is not None:
            n, m = self.pattern.ratio
            return 1 - n / m
        return float(self.sparsity)


class MagnitudePrune(_UnstructuredPrune):
    """Zero the weights of smallest magnitude (no data needed)."""

    method: Literal["magnitude"] = "magnitude"
    scope: MagnitudeScope = MagnitudeScope.row

    @model_validator(mode="after")
    def _pattern_is_per_row(self) -> MagnitudePrune:
        if self.pattern is not None and self.scope != MagnitudeScope.row:
            raise ValueError('an N:M pattern is chosen within each row: leave `scope` at "row"')
        return self


class WandaPrune(_UnstructuredPrune):
    """Wanda (Sun et al., 2023): score |W| · ‖X‖₂ per input channel, compared within each output row."""

    learns_from_data: ClassVar[bool] = True

    method: Literal["wanda"] = "wanda"


class SparseGPTPrune(_UnstructuredPrune):
    """SparseGPT (Frantar & Alistarh, 2023): OBS pruning with weight reconstruction from the layer Hessian."""

    learns_from_data: ClassVar[bool] = True

    method: Literal["sparsegpt"] = "sparsegpt"
    block_size: int = Field(default=128, ge=1, le=4096)
    dampening: float = Field(default=0.01, gt=0.0, le=1.0, description="fraction of the mean Hessian diagonal")


class StructuredPrune(StepSpec):
    """Width pruning that physically shrinks the model: MLP channels and attention KV groups, by importance."""

    learns_from_data: ClassVar[bool] = True

    type: Literal[StepType.prune] = StepType.prune
    method: Literal["structured"] = "structured"
    mlp_sparsity: float = Field(default=0.0, ge=0.0, lt=1.0, description="fraction of MLP channels removed")
    attention_sparsity: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="fraction of key/value head groups removed (query heads go along)"
    )

    @model_validator(mode="after")
    def _something_to_remove(self) -> StructuredPrune:
        if self.mlp_sparsity == 0 and self.attention_sparsity == 0:
            raise ValueError("set `mlp_sparsity` and/or `attention_sparsity` above 0: nothing would be removed")
        return self


class DepthImportance(StrEnum):
    angular = "angular"


class DepthPrune(StepSpec):
    """Drop whole decoder layers, the least important first (angular distance of a block's input and output)."""

    learns_from_data: ClassVar[bool] = True

    type: Literal[StepType.prune] = StepType.prune
    method: Literal["depth"] = "depth"
    num_layers: int = Field(ge=1, le=1024, description="how many decoder layers to remove")
    importance: DepthImportance = DepthImportance.angular


class _QuantizeStep(TargetedStep):
    """A quantize step: the recipe's last (a later step would move weights off the quantization grid)."""

    final: ClassVar[bool] = True

    type: Literal[StepType.quantize] = StepType.quantize


class WeightQuantArgs(Spec):
    """How weights are quantized: bit width, group size (None = one scale per output channel), symmetry."""

    bits: Literal[4, 8] = 8
    group_size: Literal[32, 64, 128] | None = None
    symmetric: bool = True


class RTNQuantize(_QuantizeStep):
    """Round-to-nearest weight-only quantization; stored as integers with their scales."""

    method: Literal["rtn"] = "rtn"
    weights: WeightQuantArgs = WeightQuantArgs()


class GPTQQuantize(_QuantizeStep):
    """GPTQ (Frantar et al., 2022): weight-only, error-compensating updates from the layer Hessian."""

    learns_from_data: ClassVar[bool] = True

    method: Literal["gptq"] = "gptq"
    weights: WeightQuantArgs = WeightQuantArgs(bits=4, group_size=128)
    act_order: bool = Field(default=False, description="quantize columns in order of decreasing Hessian diagonal")
    block_size: int = Field(default=128, ge=1, le=4096)
    dampening: float = Field(default=0.01, gt=0.0, le=1.0)
    true_sequential: bool = Field(
        default=True,
        description="inside each decoder layer, quantize q/k/v, o, gate/up and down in turn, each on inputs that "
        "went through the Linears already quantized (one extra layer forward per stage)",
    )
    clip_search: bool = Field(
        default=True,
        description="choose each group's range by the Hessian-weighted error of shrinking it (AWQ's clipping) "
        "instead of the full min..max range; costs a search per group, usually lowers the output error",
    )


class AWQLoss(StrEnum):
    """What AWQ's scale search minimizes for the norm folds (see AWQQuantize.loss)."""

    gram = "gram"
    block = "block"


class AWQQuantize(_QuantizeStep):
    """AWQ (Lin et al., 2023): activation-aware per-channel scales folded into the preceding operation."""

    learns_from_data: ClassVar[bool] = True

    method: Literal["awq"] = "awq"
    weights: WeightQuantArgs = WeightQuantArgs(bits=4, group_size=128)
    grid: int = Field(default=20, ge=2, le=100, description="scale exponents tried per layer group")
    duo_scaling: bool | Literal["both"] = Field(
        default=False,
        description="false: candidate scales mean|x|^α; true: mean|x|^α / mean|Ŵ|^(1−α), Ŵ the weights relative to "
        'their group\'s range (the form AutoAWQ and llm-compressor use by default); "both": half the grid each',
    )
    loss: AWQLoss = Field(
        default=AWQLoss.gram,
        description="what the scale search of the norm folds (q/k/v, gate/up) minimizes. gram: the consumers' "
        "output error from their input Gram matrix; block: the output error of self_attn / mlp over the "
        "calibration windows (the loss AutoAWQ and llm-compressor use; several times slower than gram)",
    )
    true_sequential: bool = Field(
        default=False,
        description="after every scale is folded, quantize q/k/v, o, gate/up and down in turn, each clipped on "
        "the outputs of the Linears already quantized (one extra layer forward per stage)",
    )
    clipped_search: bool = Field(
        default=False,
        description="score each candidate scale with the clip-searched rounding that follows it, instead of "
        "rounding over the full range",
    )


class SmoothQuant(_QuantizeStep):
    """SmoothQuant W8A8 (Xiao et al., 2022): migrate activation outliers into the weights, then int8 both."""

    learns_from_data: ClassVar[bool] = True

    method: Literal["smoothquant"] = "smoothquant"
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, description="migration strength")


class FP8Quantize(_QuantizeStep):
    """FP8 E4M3 weights per output channel with dynamic per-token activation scales."""

    method: Literal["fp8"] = "fp8"
    gptq: bool = Field(
        default=False,
        description="round the weights with GPTQ's error-compensating updates from calibration data instead of "
        "to nearest (needs `calibration`)",
    )

    @property
    def needs_calibration(self) -> bool:
        """Only the GPTQ rounding learns from data; rounding to nearest needs none."""
        return self.gptq


class KnowledgeDistill(StepSpec):
    """Logit distillation: the model as uploaded (or after step `teacher_step`) teaches the current model.

    Loss: alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · cross-entropy, plus `hidden_mse` times the
    mean squared error of the final hidden states when set (useful after structured pruning).
    """

    type: Literal[StepType.distill] = StepType.distill
    method: Literal["kd"] = "kd"
    dataset_id: str
    teacher_step: int | None = Field(
        default=None, ge=0, description="index of an earlier recipe step whose output teaches; null = as uploaded"
    )
    steps: int = Field(default=200, ge=1, le=1_000_000)
    batch_size: int = Field(default=8, ge=1, le=1024)
    seq_len: int = Field(default=512, ge=8, le=16384)
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    warmup_steps: int = Field(default=20, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    temperature: float = Field(default=2.0, gt=0.0, le=100.0)
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    hidden_mse: float = Field(default=0.0, ge=0.0)
    checkpoint_every: int = Field(default=50, ge=1)
    offload: bool | Literal["auto"] = Field(
        default="auto",
        description="GPU memory mode. true: teacher, optimizer state and gradients stay in host memory and are "
        "streamed to the GPU (about the model + 20 GB there, slower); false: all of it on the GPU (about 5 × the "
        'model and activations, fastest); "auto": true on a GPU only where false would not fit in its free memory',
    )

    @field_validator("offload", mode="before")
    @classmethod
    def _offload_is_a_mode(cls, value: Any) -> Any:
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError(f'offload must be true, false or "auto", not {value!r}')


DEFAULT_METHODS = {StepType.distill: "kd"}
"""Step types with one obvious method may leave `method` out."""


def step_key(value: Any) -> str | None:
    """The registry key of a step, `<type>:<method>`, from a JSON object or a spec object (None when unnamed)."""
    if isinstance(value, StepSpec):
        return value.key
    if isinstance(value, dict):
        step_type, method = value.get("type"), value.get("method")
    else:
        step_type, method = getattr(value, "type", None), getattr(value, "method", None)
    if method is None and step_type in DEFAULT_METHODS:
        method = DEFAULT_METHODS[step_type]
    if step_type is None or method is None:
        return None
    return f"{step_type}:{method}"


STEP_CLASSES: tuple[type[StepSpec], ...] = (
    MagnitudePrune,
    WandaPrune,
    SparseGPTPrune,
    StructuredPrune,
    DepthPrune,
    RTNQuantize,
    GPTQQuantize,
    AWQQuantize,
    SmoothQuant,
    FP8Quantize,
    KnowledgeDistill,
)
"""Every recipe step the service accepts. The engine registers code for each class."""

STEP_SPECS: dict[str, type[StepSpec]] = {cls.key: cls for cls in STEP_CLASSES}
"""The same classes by registry key (`<type>:<method>`)."""

NEEDS_CALIBRATION = frozenset(cls.key for cls in STEP_CLASSES if cls.learns_from_data)
"""Steps that always learn from the job's calibration text (others may, by option: `needs_calibration`)."""


Step = Annotated[
    Union[tuple(Annotated[cls, Tag(cls.key)] for cls in STEP_CLASSES)],  # noqa: UP007  (built from the classes)
    Discriminator(
        step_key,
        custom_error_type="unknown_step",
        custom_error_message="unknown recipe step: 'type' and 'method' must name one of "
        + ", ".join(sorted(STEP_SPECS)),
    ),
]


class CalibrationSpec(Spec):
    """Text the data-driven steps learn from: `samples` windows of `seq_len` tokens."""

    dataset_id: str
    samples: int = Field(default=64, ge=1, le=4096)
    seq_len: int = Field(default=512, ge=8, le=16384)


TASK_DATASET_FORMAT = "lm-eval"
"""The `format` of an uploaded dataset that is an lm-eval-harness task (a YAML config and its jsonl data)."""


class TaskSpec(Spec):
    """An lm-eval-harness task the report scores before and after the recipe: either an uploaded task
    (`dataset_id` of an lm-eval task dataset, runs with no hub access) or a task of lm-eval's own registry
    (`name`, e.g. "hellaswag": its data comes from the Hugging Face hub, so it runs only where the worker reaches
    the hub; otherwise the report's entry for it carries the error and the job still succeeds)."""

    dataset_id: str | None = None
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        description="a task name in lm-eval's registry",
    )
    limit: int | None = Field(default=None, ge=1, le=100_000, description="score at most this many documents")

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        if (self.dataset_id is None) == (self.name is None):
            raise ValueError(
                "give either `dataset_id` (an uploaded lm-eval task) or `name` (a task of lm-eval's registry, such "
                'as "hellaswag"), not both and not neither'
            )
        return self

    @property
    def label(self) -> str:
        return self.name if self.name is not None else f"dataset:{self.dataset_id}"


class EvaluationSpec(Spec):
    """Text the report measures perplexity and the KL divergence on (non-overlapping windows of `seq_len`
    tokens), and the lm-eval-harness `tasks` whose accuracy it reports before and after."""

    dataset_id: str
    seq_len: int = Field(default=512, ge=8, le=16384)
    max_windows: int | None = Field(default=40, ge=1, le=100_000)
    tasks: tuple[TaskSpec, ...] = Field(default=(), max_length=16)

    @field_validator("tasks")
    @classmethod
    def _tasks_differ(cls, tasks: tuple[TaskSpec, ...]) -> tuple[TaskSpec, ...]:
        labels = [task.label for task in tasks]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"evaluation.tasks names {', '.join(repeated)} more than once; list each task once")
        return tasks


class NotifySpec(Spec):
    """A webhook: when the job ends, its resource is POSTed to `url`, signed with `secret` (HMAC-SHA256)."""

    url: str = Field(
        min_length=8,
        max_length=2048,
        pattern=r"^https?://[^\s/?#@]+(/[^\s]*)?$",
        description="an http(s) URL; addresses on the service's own network are refused unless the operator allows "
        "them",
    )
    secret: SecretStr = Field(
        min_length=16,
        max_length=256,
        description="signs each delivery (`X-Modelpress-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "
        '"<t>.<body>">`); write-only: never answered or logged',
    )


class JobSpec(Spec):
    """What a user asks for: a model, an ordered recipe, and optional calibration and evaluation text."""

    model_id: str
    recipe: list[Step] = Field(min_length=1, max_length=32)
    calibration: CalibrationSpec | None = None
    evaluation: EvaluationSpec | None = None
    notify: NotifySpec | None = None

    def dataset_references(self) -> list[tuple[str, str]]:
        """(where in the spec, dataset id) for every dataset the job reads."""
        refs = [
            (f"{name}.dataset_id", part.dataset_id)
            for name, part in (("calibration", self.calibration), ("evaluation", self.evaluation))
            if part is not None
        ]
        refs += [
            (f"recipe.{i}.dataset_id", step.dataset_id)
            for i, step in enumerate(self.recipe)
            if isinstance(step, KnowledgeDistill)
        ]
        refs += self.task_dataset_references()
        return refs

    def task_dataset_references(self) -> list[tuple[str, str]]:
        """(where in the spec, dataset id) for the uploaded lm-eval tasks; every other reference is text."""
        tasks = () if self.evaluation is None else self.evaluation.tasks
        return [
            (f"evaluation.tasks.{i}.dataset_id", task.dataset_id) for i, task in enumerate(tasks) if task.dataset_id
        ]

    def dataset_ids(self) -> set[str]:
        return {dataset_id for _, dataset_id in self.dataset_references()}

    @model_validator(mode="after")
    def _recipe_is_coherent(self) -> JobSpec:
        final_at = None
        for index, step in enumerate(self.recipe):
            if step.needs_calibration and self.calibration is None:
                raise ValueError(
                    f"recipe.{index} ({step.key}) learns from calibration text: add a `calibration` section"
                )
            if final_at is not None:
                raise ValueError(
                    f"recipe.{index} ({step.key}) comes after the quantization step recipe.{final_at}; quantization "
                    "must be the last step (prune and distill first, then quantize once)"
                )
            if step.final:
                final_at = index
            if isinstance(step, KnowledgeDistill) and step.teacher_step is not None and step.teacher_step >= index:
                raise ValueError(
                    f"recipe.{index}.teacher_step is {step.teacher_step}, but a teacher must be an earlier step "
                    f"(0 to {index - 1}) or null for the model as uploaded"
                )
        return self


# --- Fit to a model --------------------------------------------------------------------------------------------

LinearShapes = Mapping[str, tuple[int, int]]
"""A model's Linear layers by module name: (out_features, in_features)."""


@dataclass(frozen=True)
class FitProblem:
    """Why a step does not fit the model: a stable `code` (no_targets, bad_group_size, bad_spec) and a message."""

    code: str
    message: str


def matches(name: str, class_name: str, pattern: str) -> bool:
    """True when a pattern names this module exactly, by class name, or by `re:` regex matched from the start."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or pattern == class_name


def selected(layers: Iterable[tuple[str, str]], targets: Iterable[str], ignore: Iterable[str]) -> list[str]:
    """Names of the (name, class name) layers that a target pattern matches and no ignore pattern does, in order."""
    targets, ignore = tuple(targets), tuple(ignore)
    return [
        name
        for name, class_name in layers
        if any(matches(name, class_name, p) for p in targets) and not any(matches(name, class_name, p) for p in ignore)
    ]


def _width_divisors(step: StepSpec) -> list[tuple[str, int, str, str]]:
    """(what, divisor, code, advice) for every option of a step that must divide each targeted input width."""
    divisors = []
    weights = getattr(step, "weights", None)
    if isinstance(weights, WeightQuantArgs) and weights.group_size is not None:
        divisors.append(
            (
                f"group_size {weights.group_size}",
                weights.group_size,
                "bad_group_size",
                "choose a group size that divides it (or null for per-channel scales), or ignore that layer",
            )
        )
    if isinstance(step, _UnstructuredPrune) and step.pattern is not None:
        m = step.pattern.ratio[1]
        divisors.append((f"pattern {step.pattern.value} (M={m})", m, "bad_spec", "ignore that layer"))
    return divisors


def check_fit(
    spec: StepSpec | JobSpec, linears: LinearShapes, classes: Mapping[str, str] | None = None
) -> list[FitProblem]:
    """What in a recipe, or in one step, does not fit a model's Linear layers (an empty list when all fits).

    - a step's `targets` minus `ignore` must select at least one Linear layer;
    - a quantization `group_size` must divide the input width of every Linear the step targets;
    - an N:M `pattern` must fit: M divides the input width of every Linear the step targets.

    `linears` are the Linear layers a step may touch, `classes` their class names for class-name patterns
    (`Linear` when not given). The engine calls this on the loaded model before each step, so a step sees the
    shapes the earlier steps left; the API calls it on the shapes read from the upload's safetensors headers,
    the model as uploaded. Where the API has no per-layer shapes (GGUF uploads) it cannot call this, and the
    engine's check is the one that refuses.
    """
    steps = list(enumerate(spec.recipe)) if isinstance(spec, JobSpec) else [(None, spec)]
    problems: list[FitProblem] = []
    for index, step in steps:
        if not isinstance(step, TargetedStep):
            continue
        label = step.key if index is None else f"recipe.{index} ({step.key})"
        names = selected(((n, (classes or {}).get(n, "Linear")) for n in linears), step.targets, step.ignore)
        if not names:
            sample = ", ".join(list(linears)[:4]) or "none"
            problems.append(
                FitProblem(
                    "no_targets",
                    f"{label} matched no Linear layer: targets {list(step.targets)} and ignore {list(step.ignore)} "
                    f"select none of the model's {len(linears)} Linear layers (e.g. {sample}); check 'targets' "
                    "and 'ignore'",
                )
            )
            continue
        for what, divisor, code, advice in _width_divisors(step):
            misfits = [name for name in names if linears[name][1] % divisor]
            if misfits:
                name, more = misfits[0], len(misfits) - 1
                problems.append(
                    FitProblem(
                        code,
                        f"{label}: {what} does not divide the input width {linears[name][1]} of {name}"
                        + (f" (nor that of {more} more targeted Linear layers)" if more else "")
                        + f": {advice}",
                    )
                )
    return problems


def is_finite_json(value: Any) -> bool:
    """True when no float anywhere in a JSON value is NaN or infinite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(is_finite_json(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(is_finite_json(v) for v in value)
    return True


# --- Quality-budget search -------------------------------------------------------------------------------------


class SearchFormat(StrEnum):
    """A per-layer storage format the search may give a Linear.

    `bf16` leaves the layer unquantized, at the precision the engine holds the model in (float32 on load, so its
    size is counted as stored); `int8` is symmetric int8 per output channel, `int4_g<N>` symmetric int4 in
    groups of N input columns (weight-only); `fp8` is E4M3 weights per channel with dynamic per-token activations.
    """

    bf16 = "bf16"
    int8 = "int8"
    int4_g128 = "int4_g128"
    int4_g64 = "int4_g64"
    int4_g32 = "int4_g32"
    fp8 = "fp8"

    @property
    def weights(self) -> WeightQuantArgs | None:
        """The integer weight arguments of this format (None for bf16 and fp8)."""
        if self == SearchFormat.int8:
            return WeightQuantArgs(bits=8, group_size=None)
        if self.value.startswith("int4_g"):
            return WeightQuantArgs(bits=4, group_size=int(self.value.removeprefix("int4_g")))
        return None


class SearchMethod(StrEnum):
    """How a candidate's quantized layers are rounded: to nearest; by GPTQ (fp8 layers by GPTQ's E4M3 loop); or
    by AWQ (activation-aware scales searched for each int layer's own format, then clipped rounding; fp8 layers
    rounded to nearest)."""

    rtn = "rtn"
    gptq = "gptq"
    awq = "awq"


class SearchPruneMethod(StrEnum):
    """The unstructured pruning methods a search may put before its quantization."""

    magnitude = "magnitude"
    wanda = "wanda"
    sparsegpt = "sparsegpt"


class SearchPruning(Spec):
    """One pruning option: a family of candidates whose model is pruned this way (the space's targets and ignore,
    the method's default options, calibrated as the recipe step is) before its assignment is quantized."""

    method: SearchPruneMethod
    sparsity: float | None = Field(default=None, gt=0.0, lt=1.0, description="fraction of weights set to zero")
    pattern: SparsityPattern | None = Field(default=None, description='N:M sparsity instead of a fraction: "2:4"')

    @model_validator(mode="after")
    def _is_a_step(self) -> SearchPruning:
        try:
            self.as_step(("Linear",), DEFAULT_IGNORE)
        except ValueError as exc:  # the recipe step's own message: sparsity or pattern, matching
            errors = getattr(exc, "errors", None)
            message = errors()[0]["msg"].removeprefix("Value error, ") if callable(errors) else str(exc)
            raise ValueError(message) from None
        return self

    def as_step(self, targets: tuple[str, ...], ignore: tuple[str, ...]) -> _UnstructuredPrune:
        """The recipe step that prunes as this option says."""
        step = {SearchPruneMethod.magnitude: MagnitudePrune, SearchPruneMethod.wanda: WandaPrune}.get(
            self.method, SparseGPTPrune
        )
        return step(sparsity=self.sparsity, pattern=self.pattern, targets=targets, ignore=ignore)

    @property
    def label(self) -> str:
        """A short name: "wanda 50%", "sparsegpt 2:4"."""
        amount = self.pattern.value if self.pattern is not None else f"{100 * self.sparsity:.3g}%"
        return f"{self.method.value} {amount}"


class SearchObjective(StrEnum):
    """What the search makes small: the artifact's bytes on disk, or the weight bytes read per decoded token."""

    size = "size"
    decode_speed = "decode_speed"


class SearchBudget(Spec):
    """The quality a candidate may lose, measured on the evaluation windows against the model as uploaded; a
    candidate meets the budget when every limit given holds."""

    perplexity_increase: float | None = Field(
        default=None, ge=0.0, le=100.0, description="relative perplexity increase allowed (0.02 = +2%)"
    )
    kl_divergence: float | None = Field(
        default=None, ge=0.0, le=100.0, description="mean KL(baseline ‖ candidate) allowed, in nats per token"
    )
    task_accuracy_drop: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="absolute accuracy drop allowed on every task of `evaluation.tasks` (0.02 = 2 points); needs "
        "those tasks",
    )

    @model_validator(mode="after")
    def _some_limit(self) -> SearchBudget:
        if self.perplexity_increase is None and self.kl_divergence is None and self.task_accuracy_drop is None:
            raise ValueError(
                "give at least one limit: `perplexity_increase` (0.02 = +2%), `kl_divergence` (nats) or "
                "`task_accuracy_drop` (0.02 = 2 points, with evaluation.tasks)"
            )
        return self


class SearchSpace(Spec):
    """What the search may combine: per-layer formats, the rounding methods, and which Linears it may touch."""

    formats: tuple[SearchFormat, ...] = Field(
        default=(SearchFormat.bf16, SearchFormat.int8, SearchFormat.int4_g128, SearchFormat.int4_g64),
        min_length=1,
        description="formats a layer may get; a group size that does not divide a layer's input width is left out "
        "for that layer",
    )
    methods: tuple[SearchMethod, ...] = Field(
        default=(SearchMethod.gptq,),
        min_length=1,
        description="rounding methods (rtn, gptq, awq); every method given is tried on the first assignment and "
        "the best measured one builds the rest",
    )
    pruning: tuple[SearchPruning, ...] = Field(
        default=(),
        max_length=4,
        description="pruning options, each one more family of candidates: the model is pruned first (calibrated), "
        "then the family searches its own assignments on the pruned model. Pruned weights are stored dense: a "
        "pruned candidate takes as many bytes as the same assignment unpruned",
    )
    targets: tuple[str, ...] = Field(default=("Linear",), min_length=1)
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    @field_validator("formats", "methods", "pruning")
    @classmethod
    def _distinct(cls, values: tuple) -> tuple:
        if len(set(values)) != len(values):
            raise ValueError("list each format, method or pruning option once")
        return values

    _patterns_compile = field_validator("targets", "ignore")(TargetedStep._patterns_compile.__func__)

    def as_step(self, fmt: SearchFormat, method: SearchMethod) -> TargetedStep:
        """The recipe step that would put every targeted layer in `fmt` with `method` (for fit checks)."""
        common = {"targets": self.targets, "ignore": self.ignore}
        if fmt == SearchFormat.fp8:
            return FP8Quantize(gptq=method == SearchMethod.gptq, **common)
        weights = fmt.weights or WeightQuantArgs()
        if method == SearchMethod.gptq:
            return GPTQQuantize(weights=weights, **common)
        if method == SearchMethod.awq:
            return AWQQuantize(weights=weights, **common)
        return RTNQuantize(weights=weights, **common)

    def prune_steps(self) -> list[_UnstructuredPrune]:
        """The recipe steps of the pruning options, on the space's targets (for fit checks and for the engine)."""
        return [option.as_step(self.targets, self.ignore) for option in self.pruning]


class SearchSpec(Spec):
    """A quality-budget search: the smallest (or fastest) per-layer mix of formats whose measured quality loss
    stays within `budget`. It needs calibration text (the sensitivity pass and GPTQ learn from it) and
    evaluation text (every candidate is measured there)."""

    model_id: str
    calibration: CalibrationSpec
    evaluation: EvaluationSpec
    budget: SearchBudget
    objective: SearchObjective = SearchObjective.size
    space: SearchSpace = SearchSpace()
    max_candidates: int = Field(
        default=4,
        ge=1,
        le=16,
        description="most assignments built and measured per family (the unpruned one and one per pruning option; "
        "each method tried counts)",
    )
    sensitivity_windows: int = Field(
        default=16, ge=1, le=4096, description="calibration windows the per-layer sensitivity pass reads"
    )

    @model_validator(mode="after")
    def _tasks_with_their_budget(self) -> SearchSpec:
        if self.budget.task_accuracy_drop is not None and not self.evaluation.tasks:
            raise ValueError(
                "budget.task_accuracy_drop needs the tasks it limits: list them in evaluation.tasks (an uploaded "
                'lm-eval task: {"dataset_id": "<id>"}), or drop the task budget'
            )
        if self.evaluation.tasks and self.budget.task_accuracy_drop is None:
            raise ValueError(
                "evaluation.tasks: a search scores its tasks against budget.task_accuracy_drop; give that limit "
                "(0.02 = 2 points; 1 only reports the accuracies), or leave tasks out"
            )
        return self

    def dataset_references(self) -> list[tuple[str, str]]:
        """(where in the spec, dataset id) for every dataset the search reads."""
        return [
            ("calibration.dataset_id", self.calibration.dataset_id),
            ("evaluation.dataset_id", self.evaluation.dataset_id),
            *self.task_dataset_references(),
        ]

    def task_dataset_references(self) -> list[tuple[str, str]]:
        """(where in the spec, dataset id) for the uploaded lm-eval tasks the task budget is measured on."""
        return [
            (f"evaluation.tasks.{i}.dataset_id", task.dataset_id)
            for i, task in enumerate(self.evaluation.tasks)
            if task.dataset_id
        ]

    def dataset_ids(self) -> set[str]:
        return {dataset_id for _, dataset_id in self.dataset_references()}


def stored_spec(kind: str, data: Mapping[str, Any]) -> JobSpec | SearchSpec:
    """A job row's spec as its class: a search's (kind "search") or a recipe job's (kind "job")."""
    return SearchSpec.model_validate(data) if kind == "search" else JobSpec.model_validate(data)
