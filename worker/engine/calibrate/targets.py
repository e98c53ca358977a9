"""Which Linear layers a step touches: `targets` minus `ignore`, by module name, class name or `re:` regex.

Patterns follow `modelpress.specs.TargetedStep` and are matched by `modelpress.specs.matches`: an exact module
name, a module class name (`Linear`), or a regular expression after `re:` matched from the start of the name.
Ignore wins over targets. Embeddings are never touched, nor a Linear whose weight is tied to an embedding (a
tied lm_head). `fitted_linears` also refuses a step that does not fit the model, by `modelpress.specs.check_fit`,
the check the API runs at submission.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

from modelpress.specs import DEFAULT_IGNORE, TargetedStep, check_fit
from modelpress.specs import matches as pattern_matches
from worker.engine.steps import EngineError

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("Linear",)


def matches(name: str, module: torch.nn.Module, pattern: str) -> bool:
    """True when a pattern names this module exactly, by class, or by `re:` regex (re.match)."""
    return pattern_matches(name, type(module).__name__, pattern)


def _matches_any(name: str, module: torch.nn.Module, patterns: Iterable[str]) -> bool:
    return any(matches(name, module, pattern) for pattern in patterns)


def _embedding_weights(model: torch.nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}


def select_linears(
    model: torch.nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, ignore: Sequence[str] = DEFAULT_IGNORE
) -> dict[str, torch.nn.Linear]:
    """The targeted Linear modules by name, in model order."""
    tied = _embedding_weights(model)
    selected: dict[str, torch.nn.Linear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not _matches_any(name, module, targets):
            continue
        if _matches_any(name, module, ignore):
            continue
        if id(module.weight) in tied:
            log.info("skipping %s: its weight is tied to an embedding, and embeddings are never changed", name)
            continue
        selected[name] = module
    return selected


def untied_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every Linear a step may touch (not tied to an embedding), by name, in model order."""
    tied = _embedding_weights(model)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in tied
    }


def fitted_linears(model: torch.nn.Module, spec: TargetedStep) -> dict[str, torch.nn.Linear]:
    """The Linears a step targets, after `check_fit` on this model: no match, a group size or an N:M pattern
    that does not divide a targeted input width is an EngineError with the check's code and message."""
    linears = untied_linears(model)
    shapes = {name: (linear.out_features, linear.in_features) for name, linear in linears.items()}
    classes = {name: type(linear).__name__ for name, linear in linears.items()}
    problems = check_fit(spec, shapes, classes)
    if problems:
        raise EngineError(problems[0].code, "; ".join(problem.message for problem in problems))
    return select_linears(model, spec.targets, spec.ignore)
