"""Write a model's weights as sharded safetensors one decoder layer at a time, as transformers names them.

`save_pretrained` builds the whole state dict, and with a model on the GPU its shards go through host memory
whole (up to 50 GB each by default). Here each decoder layer is visited in turn (onloaded to the device when it
lives in host memory, so that compressed-tensors packs it there), its tensors go to the current shard, and a
shard is written as soon as it passes `MAX_SHARD_BYTES`: host memory holds at most about one shard besides the
model. The files are what transformers writes: `model.safetensors` when one shard holds everything, else
`model-00001-of-0000N.safetensors` … with `model.safetensors.index.json` (`metadata.total_size`, `weight_map`).
Tied weights are written once (transformers' own rule) and any renaming transformers reverts on save is
reverted per layer (`revert_weight_conversion`, as transformers does shard by shard for offloaded models).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from worker.engine.calibrate.layerwise import decoder_layers, onloaded

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 5 * 10**9  # transformers' shard size before 5.0 (its 50 GB default would hold most models whole)
INDEX_NAME = "model.safetensors.index.json"


class ShardWriter:
    """Collects tensors (moved to host memory) and writes a shard whenever the next tensor would overflow it."""

    def __init__(self, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        self.folder, self.max_shard_bytes = Path(folder), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_shard_bytes:
                self.flush()
            self.pending[name] = tensor.detach().to("cpu").contiguous()
            self.pending_bytes += size
            self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.folder / f".shard-{len(self.shards)}.partial"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is left, name the shards as transformers does (and the index when there are several);
        return the file names."""
        self.flush()
        count = len(self.shards)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        weight_map = {}
        for (path, tensors), name in zip(self.shards, names, strict=True):
            path.rename(self.folder / name)
            weight_map.update(dict.fromkeys(tensors, name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names


def _tied_copies(model: torch.nn.Module) -> set[str]:
    """State-dict keys save_pretrained leaves out (the second name of a tied weight)."""
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        return set()
    state = model.state_dict()
    return set(state) - set(remove_tied_weights_from_state_dict(state, model))


def _on_disk(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names transformers writes (it reverts the renamings it applies at load, when it has any)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return tensors
    return revert_weight_conversion(model, tensors)


def write_layerwise_(
    model: torch.nn.Module,
    folder: Path,
    device: torch.device,
    prepare_: Callable[[torch.nn.Module], None] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
    """Write the model's config and weights into `folder`, one decoder layer at a time. `prepare_(module)` runs
    first on the leaf modules outside the decoder layers (where they are), then on each decoder layer (on
    `device`), before their tensors are taken (compressed-tensors packs quantized weights there). Returns the
    weight files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.dtype = str(model.dtype).split(".")[1]
    dropped = _tied_copies(model)
    prefix, layers = decoder_layers(model)
    writer = ShardWriter(folder, max_shard_bytes)

    def take(tensors: dict[str, torch.Tensor]) -> None:
        writer.add(_on_disk(model, {n: t for n, t in tensors.items() if n not in dropped}))

    if prepare_ is not None:
        inside = {id(m) for m in layers.modules()}
        for module in list(model.modules()):
            if id(module) not in inside and not list(module.children()):
                prepare_(module)
    before: dict[str, torch.Tensor] = {}  # in the state dict's order: the embeddings come before the layers
    after: dict[str, torch.Tensor] = {}  # final norm, output layer
    seen_layers = False
    for name, tensor in model.state_dict().items():  # the layers' own tensors are taken layer by layer below
        if name.startswith(prefix + "."):
            seen_layers = True
        elif seen_layers:
            after[name] = tensor
        else:
            before[name] = tensor
    take(before)
    for index, layer in enumerate(layers):
        with onloaded(layer, device) if prepare_ is not None else contextlib.nullcontext():
            if prepare_ is not None:
                prepare_(layer)
            take(layer.state_dict(prefix=f"{prefix}.{index}."))
    take(after)
    names = writer.close()
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    log.info("wrote %d safetensors shards layer by layer into %s", len(names), folder)
    return names
