"""Mixture-of-experts layers with one Linear per expert matrix, so every method treats each expert as its own.

transformers keeps a sparse MoE block's experts as fused 3-D parameters (`experts.gate_up_proj` of shape
[experts, 2 · intermediate, hidden], `experts.down_proj` of shape [experts, hidden, intermediate]). Here they
become `experts.<i>.gate_proj / up_proj / down_proj` Linears, the names a Mixtral or Qwen3-MoE checkpoint
uses on disk, that compressed-tensors writes and vLLM's FusedMoE loader reads (`experts.<i>.<proj>.weight_packed`).
The forward computes exactly what the fused module does: each expert sees only the tokens routed to it, so a
Linear's calibration hooks see those tokens and nothing else. The router (`mlp.gate`) is left as it is.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

log = logging.getLogger(__name__)

_EXPERT_NAME = re.compile(r"\.experts\.\d+\.[^.]+$")


PROJECTION_NAMES: dict[str, tuple[str, str, str]] = {"mixtral": ("w1", "w3", "w2")}
"""(gate, up, down) names of an expert's matrices in checkpoints of this model_type, where they are not
gate_proj / up_proj / down_proj: transformers' loader merges only these names into its fused tensors."""


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) · up(x)), its Linears named as the model's checkpoints name them."""

    def __init__(
        self, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor], names: tuple[str, str, str], act_fn: nn.Module
    ) -> None:
        super().__init__()
        self.names = names
        for name, weight in zip(names, weights, strict=True):
            setattr(self, name, _linear(weight))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.ModuleList):
    """A drop-in for transformers' fused experts module: same call `(hidden, top_k_index, top_k_weights)`."""

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            token, slot = torch.where(top_k_index == index)
            if token.numel() == 0:
                continue
            routed = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, routed.to(out.dtype))
        return out


def is_expert_linear(name: str) -> bool:
    """Whether a module name is one matrix of one expert (`...experts.<i>.<proj>`)."""
    return _EXPERT_NAME.search(name) is not None


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return linear


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3
        and down.dim() == 3
        and not getattr(module, "has_bias", False)
        and not getattr(module, "is_transposed", False)
    )


def fused_expert_modules(model: nn.Module) -> list[str]:
    """Names of the fused experts modules in `model` (empty for a dense model)."""
    return [name for name, module in model.named_modules() if _is_fused_experts(module)]


@torch.no_grad()
def unfuse(fused: nn.Module, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> UnfusedExperts:
    """The per-expert Linears of a fused experts module (gate is the first half of gate_up_proj's rows)."""
    gate_up, down = fused.gate_up_proj, fused.down_proj
    intermediate = gate_up.shape[1] // 2
    experts = [
        ExpertMLP((gate_up[i, :intermediate], gate_up[i, intermediate:], down[i]), names, fused.act_fn)
        for i in range(gate_up.shape[0])
    ]
    return UnfusedExperts(experts)


def unfuse_experts_(model: nn.Module) -> int:
    """Replace every fused experts module of `model` by `UnfusedExperts`, in place; the number replaced."""
    names = fused_expert_modules(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    projections = PROJECTION_NAMES.get(model_type, ("gate_proj", "up_proj", "down_proj"))
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, unfuse(getattr(parent, child), projections))
    if names:
        log.info("split %d fused expert modules into one Linear per expert matrix", len(names))
    return len(names)
