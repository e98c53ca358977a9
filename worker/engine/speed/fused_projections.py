"""Fused projections for decoding: q/k/v as one `qkv_proj` Linear and gate/up as one `gate_up_proj` Linear.

At batch 1 a decode step reads each weight once, and a small Linear (k_proj, v_proj: 1024 x 4096 on Llama-3-8B)
costs a kernel launch that reads far below the device's bandwidth; one product of the concatenated weights is
one kernel and one read (what vLLM, gpt-fast and TensorRT-LLM do).

How a layer is fused, per instance (other models in the process are unaffected):
- The member Linears' weights (and biases) are concatenated along the output dimension into a new, ordinary
  `torch.nn.Linear` named `qkv_proj` / `gate_up_proj`; the members are removed from the module.
- The module's class is swapped for a small subclass whose forward applies the fused Linear to the input and
  then runs the *original* forward on that product, with `q_proj` / `k_proj` / `v_proj` (`gate_proj` / `up_proj`)
  now plain callables (not modules) that take their columns of it. So rotary embeddings, the KV cache update
  (whatever transformers calls the cache argument or passes to `update` in this version) and the
  attention-interface dispatch are the original forward's own: nothing of it is copied here.
- Only a structure that is recognized is fused: the module's direct Linear children are exactly the members and
  their consumer (o_proj / down_proj), all plain `nn.Linear` with one in_features, one dtype and device, biases
  on all or none, shapes that agree (k and v alike, o_proj reading q's width; gate and up alike, down_proj
  reading their width), and no hooks but one: the same per-token activation quantization (`TokenQuantHook`, the
  activation half of fp8 or int8 W8A8) on every member, which the fused Linear then carries (the members read
  one input, so quantizing it once is what each did). Anything else is left as it is, with the reason.

Quantization records (`QuantizedWeight`) and 2:4-sparse names of the members go with them: a group whose
members all have compatible records (same scheme; scales and zero points (out, groups) concatenated along dim 0)
gets one record under the fused name; a group where only some have records, or records that differ, is not fused.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

from worker.engine.quantize import TokenQuantHook
from worker.engine.steps import QuantizedWeight

log = logging.getLogger(__name__)

SCHEME_FIELDS = ("bits", "group_size", "symmetric", "kind", "activations", "actorder")


@dataclass(frozen=True)
class Group:
    """Linears of one module that read the same input and can be computed as one product."""

    members: tuple[str, ...]  # in the order their columns are concatenated
    fused: str  # the fused Linear's name
    consumer: str  # the Linear that reads (a function of) their product, with the first member's width
    same_out: tuple[str, ...]  # members whose out_features must be equal
    label: str


QKV = Group(("q_proj", "k_proj", "v_proj"), "qkv_proj", "o_proj", ("k_proj", "v_proj"), "q/k/v")
GATE_UP = Group(("gate_proj", "up_proj"), "gate_up_proj", "down_proj", ("gate_proj", "up_proj"), "gate/up")
GROUPS = (QKV, GATE_UP)


class FusedRefused(Exception):
    """This group cannot be fused; the message says why."""


# --- Records --------------------------------------------------------------------------------------------------


def fused_record(records: list[QuantizedWeight]) -> QuantizedWeight:
    """One record for Linears concatenated along the output dimension: their scales and zero points
    concatenated along dim 0; FusedRefused when the schemes or group layouts differ."""
    first = records[0]
    for record in records[1:]:
        for field in SCHEME_FIELDS:
            if getattr(record, field) != getattr(first, field):
                raise FusedRefused(f"quantization records differ in {field}")
        if (record.zero_point is None) != (first.zero_point is None):
            raise FusedRefused("quantization records differ in having zero points")
        if record.scale.shape[1:] != first.scale.shape[1:]:
            raise FusedRefused(f"scales of {tuple(record.scale.shape)} and {tuple(first.scale.shape)} differ in groups")
    scale = torch.cat([r.scale.to(first.scale.device) for r in records])
    zero = None
    if first.zero_point is not None:
        zero = torch.cat([r.zero_point.to(first.zero_point.device) for r in records])
    return dataclasses.replace(first, scale=scale, zero_point=zero)


def _fused_annotations(
    names: list[str], quantized: dict[str, QuantizedWeight], sparse_24: set[str]
) -> tuple[QuantizedWeight | None, bool]:
    """The fused Linear's record and sparsity from its members'; FusedRefused when only some have one."""
    recorded = [n for n in names if n in quantized]
    if recorded and len(recorded) != len(names):
        raise FusedRefused(f"only {', '.join(n.rpartition('.')[2] for n in recorded)} have quantization records")
    sparse = [n for n in names if n in sparse_24]
    if sparse and len(sparse) != len(names):
        raise FusedRefused(f"only {', '.join(n.rpartition('.')[2] for n in sparse)} are 2:4 sparse")
    record = fused_record([quantized[n] for n in names]) if recorded else None
    return record, bool(sparse)


# --- Structure ------------------------------------------------------------------------------------------------


def _has_hooks(module: torch.nn.Module) -> bool:
    return any(
        getattr(module, hooks, None)
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def _token_quant_kind(name: str, linear: torch.nn.Linear) -> str | None:
    """The kind of the member's per-token activation quantization when that is its only hook, None when it has
    no hook; FusedRefused for any other hook (it may do something the fused Linear would not)."""
    if not _has_hooks(linear):
        return None
    pre_hooks = list(linear._forward_pre_hooks.values())
    others = any(getattr(linear, h, None) for h in ("_forward_hooks", "_backward_hooks", "_backward_pre_hooks"))
    if others or len(pre_hooks) != 1 or not isinstance(pre_hooks[0], TokenQuantHook):
        raise FusedRefused(f"{name} has hooks")
    return pre_hooks[0].kind


def check_structure(module: torch.nn.Module, group: Group) -> str | None:
    """FusedRefused unless `module` holds exactly `group`'s Linears and their consumer, in shapes that agree;
    the members' shared per-token activation quantization kind (None: none), which the fused Linear carries."""
    if hasattr(module, group.fused):
        raise FusedRefused(f"already has {group.fused}")
    linears = {name for name, child in module.named_children() if isinstance(child, torch.nn.Linear)}
    expected = {*group.members, group.consumer}
    if linears != expected:
        raise FusedRefused(f"its Linears are {sorted(linears)}, not {sorted(expected)}")
    if _has_hooks(module):
        raise FusedRefused("the module has hooks")
    members = [getattr(module, name) for name in group.members]
    kinds = set()
    for name, linear in zip(group.members, members, strict=True):
        if type(linear) is not torch.nn.Linear:
            raise FusedRefused(f"{name} is a {type(linear).__name__}, not a plain nn.Linear")
        kinds.add(_token_quant_kind(name, linear))
    if len(kinds) != 1:
        raise FusedRefused("the members' inputs are not quantized alike")
    first = members[0]
    if len({m.in_features for m in members}) != 1:
        raise FusedRefused("the members differ in in_features")
    if len({(m.weight.dtype, m.weight.device) for m in members}) != 1:
        raise FusedRefused("the members' weights differ in dtype or device")
    if len({m.bias is None for m in members}) != 1:
        raise FusedRefused("only some members have a bias")
    if len({getattr(module, name).out_features for name in group.same_out}) != 1:
        raise FusedRefused("the members' out_features do not match")
    if getattr(module, group.consumer).in_features != first.out_features:
        raise FusedRefused(f"{group.consumer} does not read {group.members[0]}'s width")
    return kinds.pop()


def concatenated_linear(linears: list[torch.nn.Linear]) -> torch.nn.Linear:
    """An nn.Linear whose output is the members' outputs side by side (weights and biases concatenated)."""
    with torch.no_grad():
        weight = torch.cat([linear.weight for linear in linears])
        bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    grad = linears[0].weight.requires_grad
    fused.weight = torch.nn.Parameter(weight, requires_grad=grad)
    if bias is not None:
        fused.bias = torch.nn.Parameter(bias, requires_grad=grad)
    return fused


# --- The forward ----------------------------------------------------------------------------------------------


class ColumnSlice:
    """Stands in for a fused member Linear inside the original forward: its columns of the fused product.
    Not a Module, so the model's modules, parameters and state dict list only the fused Linear."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __call__(self, product: torch.Tensor) -> torch.Tensor:
        return product[..., self.start : self.stop]

    def __repr__(self) -> str:
        return f"ColumnSlice({self.start}, {self.stop})"


class _FusedInput:
    """Mixin put in front of the module's own class: the original forward, run on `<fused>(input)`."""

    _fused_name: str
    _input_name: str

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        fused = getattr(self, self._fused_name)
        if args:
            args = (fused(args[0]), *args[1:])
        else:
            kwargs[self._input_name] = fused(kwargs[self._input_name])
        return super().forward(*args, **kwargs)


_FUSED_CLASSES: dict[tuple[type, str], type] = {}


def _fused_class(cls: type, group: Group) -> type:
    """The subclass of `cls` (one per class and group) whose forward computes `group` as one product."""
    key = (cls, group.fused)
    if key not in _FUSED_CLASSES:
        attributes = {"_fused_name": group.fused, "_input_name": _input_name(cls), "__module__": __name__}
        _FUSED_CLASSES[key] = type(f"Fused{cls.__name__}", (_FusedInput, cls), attributes)
    return _FUSED_CLASSES[key]


def _input_name(cls: type) -> str | None:
    """The name of `cls.forward`'s first argument after self, or None when it has no positional one."""
    try:
        parameters = list(inspect.signature(cls.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)
    return parameters[1].name if len(parameters) >= 2 and parameters[1].kind in positional else None


def fuse_group_(module: torch.nn.Module, group: Group, token_quant: str | None = None) -> None:
    """Replace `group`'s Linears of `module` by one fused Linear, quantizing its input per token as `token_quant`
    says (None: not), and swap in the fused forward (no checks: see `check_structure`)."""
    members = [getattr(module, name) for name in group.members]
    fused = concatenated_linear(members)
    if token_quant is not None:
        fused.register_forward_pre_hook(TokenQuantHook(token_quant))
    start = 0
    for name, linear in zip(group.members, members, strict=True):
        delattr(module, name)
        setattr(module, name, ColumnSlice(start, start + linear.out_features))  # a plain attribute now
        start += linear.out_features
    setattr(module, group.fused, fused)
    module.__class__ = _fused_class(type(module), group)


# --- The model ------------------------------------------------------------------------------------------------


def fuse_projections_(
    model: torch.nn.Module,
    quantized: dict[str, QuantizedWeight] | None = None,
    sparse_24: set[str] | None = None,
) -> dict[str, str]:
    """Fuse each recognized attention's q/k/v and MLP's gate/up Linears of `model` in place; return
    {module: "fused q/k/v" | "fused gate/up" | "unchanged: <reason>"} for every module that has any of them.

    `quantized` and `sparse_24` (the members' records and 2:4-sparse names) are updated in place: a fused
    group's member names are replaced by its fused name (pass copies to keep the originals). The fused
    Linears' weights are new tensors: Linears shared with another model are not modified."""
    quantized = {} if quantized is None else quantized
    sparse_24 = set() if sparse_24 is None else sparse_24
    results: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        for group in GROUPS:
            if not any(isinstance(getattr(module, m, None), torch.nn.Module) for m in group.members):
                continue
            prefix = f"{name}." if name else ""
            names = [prefix + member for member in group.members]
            try:
                token_quant = check_structure(module, group)
                if _input_name(type(module)) is None:
                    raise FusedRefused(f"{type(module).__name__}.forward has no positional input to fuse")
                record, sparse = _fused_annotations(names, quantized, sparse_24)
            except FusedRefused as exc:
                results[name] = f"unchanged: {exc}"
                log.info("%s keeps separate %s: %s", name, group.label, exc)
                continue
            fuse_group_(module, group, token_quant)
            for member in names:
                quantized.pop(member, None)
                sparse_24.discard(member)
            if record is not None:
                quantized[prefix + group.fused] = record
            if sparse:
                sparse_24.add(prefix + group.fused)
            results[name] = f"fused {group.label}"
    return results
