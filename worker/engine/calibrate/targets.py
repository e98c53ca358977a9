"""Which Linear layers a step touches: `targets` minus `ignore`, by module name, class name or `re:` regex.

Patterns follow `modelpress.specs._TargetedStep`: an exact module name, a module class name (`Linear`), or a
regular expression after `re:` matched from the start of the name. Ignore wins over targets. Embeddings are
never touched, nor a Linear whose weight is tied to an embedding (a tied lm_head).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("Linear",)
DEFAULT_IGNORE = ("lm_head",)


def matches(name: str, module: torch.nn.Module, pattern: str) -> bool:
    """True when a pattern names this module exactly, by class, or by `re:` regex (re.match)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


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


def select_from_spec(model: torch.nn.Module, spec: dict[str, Any]) -> dict[str, torch.nn.Linear]:
    """`select_linears` with a step dict's `targets` / `ignore` (the specs' defaults when absent)."""
    targets = tuple(spec.get("targets") or DEFAULT_TARGETS)
    ignore = tuple(spec["ignore"]) if spec.get("ignore") is not None else DEFAULT_IGNORE
    return select_linears(model, targets, ignore)
