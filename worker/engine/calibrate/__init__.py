"""Calibrate: what the data-driven steps share: token windows from a dataset, the layer-by-layer driver that
passes calibration activations from one decoder layer to the next, input statistics, the per-layer damage
measured on them, and target selection."""

from worker.engine.calibrate.damage import DAMAGE_FIELDS, layer_damage
from worker.engine.calibrate.layerwise import (
    MIN_ROUTED_TOKENS,
    HessianAccumulator,
    LayerPass,
    SharedInputs,
    decoder_layers,
    hook_inputs,
    input_stages,
    observe_shared,
    sequential_layers,
)
from worker.engine.calibrate.targets import fitted_linears, matches, select_linears, untied_linears
from worker.engine.calibrate.windows import read_text, token_windows

__all__ = [
    "DAMAGE_FIELDS",
    "MIN_ROUTED_TOKENS",
    "HessianAccumulator",
    "LayerPass",
    "SharedInputs",
    "decoder_layers",
    "fitted_linears",
    "hook_inputs",
    "input_stages",
    "layer_damage",
    "matches",
    "observe_shared",
    "read_text",
    "select_linears",
    "sequential_layers",
    "token_windows",
    "untied_linears",
]
