"""Next-token logits of a model that stays in host memory while each decoder layer visits the device in turn.

Window-major evaluation (every window through the whole model) needs the whole model on the device. Here the
order is layer-major, as in calibration: the embeddings of every window are captured, each decoder layer goes
to the device once and runs over all windows (`calibrate.sequential_layers`), then the model's own forward runs
window by window with its decoder layers replaced by stand-ins that hand back the final hidden states, so the
final norm, the output layer and whatever the architecture does after the layers (logit soft-capping, a final
projection) are the model's own code, on the device, one window's logits at a time. Each window computes what
the whole-model forward computes, in the same order of operations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from worker.engine.calibrate.layerwise import decoder_layers, sequential_layers

LAYER_SHARE = 0.9  # of the progress: the decoder layers; the rest is the output layer, window by window


class _Replay(torch.nn.Module):
    """Stands in for the first decoder layer: returns the final hidden states given to it for this window."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None
        if hasattr(layer, "attention_type"):  # models that pick each layer's mask by its attention type
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.hidden


class _PassThrough(torch.nn.Module):
    """Stands in for every later decoder layer: the final hidden states go through unchanged."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@torch.no_grad()
def onloaded_logits(
    model: torch.nn.Module, windows: torch.Tensor, device: torch.device, progress: Callable[[float, str], None]
) -> Iterator[tuple[int, torch.Tensor]]:
    """(window index, its next-token logits [positions, vocabulary] on `device`), for every window in order."""
    final: list[torch.Tensor] = []
    for _ in sequential_layers(model, windows, device, lambda f, m: progress(LAYER_SHARE * f, m), final=final):
        pass
    _, layers = decoder_layers(model)
    real = list(layers)
    home = model.get_input_embeddings().weight.device
    replay = _Replay(real[0])
    for index, layer in enumerate(real):
        layers[index] = replay if index == 0 else _PassThrough(layer)
    try:
        model.to(device)  # the layers are out: only the embeddings, final norm and output layer move
        for index, window in enumerate(windows):
            replay.hidden, final[index] = final[index].to(device), None
            logits = model(input_ids=window.unsqueeze(0).to(device), use_cache=False).logits[0, :-1]
            replay.hidden = None
            yield index, logits
            progress(LAYER_SHARE + (1 - LAYER_SHARE) * (index + 1) / len(windows), f"logits of window {index + 1}")
    finally:
        model.to(home)
        for index, layer in enumerate(real):
            layers[index] = layer
