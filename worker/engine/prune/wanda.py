"""`prune:wanda` (Sun et al., 2023): score |W_ij| · ‖X_j‖₂ and drop the lowest scores of each output row
(or keep the N highest of every M consecutive inputs). Activations come layer by layer, sequentially."""

from __future__ import annotations

from typing import Any

import torch

from modelpress.specs import WandaPrune
from worker.engine.calibrate.layerwise import MIN_ROUTED_TOKENS
from worker.engine.load.experts import is_expert_linear
from worker.engine.prune.masks import score_mask
from worker.engine.prune.sequential import prune_sequentially
from worker.engine.steps import StepContext, StepResult, register


class ColumnNorms:
    """Running Σ x_j² of every input feature j, in float32."""

    def __init__(self, features: int, device: torch.device, min_tokens: int = 0) -> None:
        self.squares = torch.zeros(features, dtype=torch.float32, device=device)
        self.tokens = 0
        self.min_tokens = min_tokens  # fewer tokens than this (a rarely routed expert): score by |W| alone

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.to(self.squares.device, torch.float32)
        self.squares += x.square().sum(0)
        self.tokens += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        return self.squares.sqrt()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖₂, broadcast over the output rows."""
    return weight.detach().float().abs() * input_norms.to(weight.device).unsqueeze(0)


@torch.no_grad()
def wanda_prune_linear_(
    linear: torch.nn.Linear, norms: ColumnNorms, sparsity: float, pattern: tuple[int, int] | None
) -> dict[str, Any]:
    """Prune by Wanda's score; a Linear that read too few tokens (a rarely routed expert) by |W| alone."""
    details: dict[str, Any] = {"tokens": norms.tokens}
    input_norms = norms.norms
    if norms.tokens < norms.min_tokens:
        input_norms = torch.ones_like(input_norms)
        details["calibration"] = f"magnitude: only {norms.tokens} calibration tokens reached this layer"
    keep = score_mask(wanda_scores(linear.weight, input_norms), sparsity, pattern)
    linear.weight.mul_(keep.to(linear.weight.dtype))
    return details


@register(WandaPrune)
def prune_wanda(model: torch.nn.Module, spec: WandaPrune, context: StepContext) -> StepResult:
    experts = {id(m) for name, m in model.named_modules() if is_expert_linear(name)}

    def new_statistic(linear: torch.nn.Linear) -> ColumnNorms:
        floor = MIN_ROUTED_TOKENS if id(linear) in experts else 0
        return ColumnNorms(linear.in_features, linear.weight.device, floor)

    return prune_sequentially(
        model,
        spec,
        context,
        new_statistic,
        wanda_prune_linear_,
        damage_inputs=lambda norms: {"input_norms": norms.norms},
    )
