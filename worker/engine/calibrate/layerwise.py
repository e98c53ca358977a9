"""Sequential, layer-by-layer calibration shared by GPTQ, AWQ, SmoothQuant, Wanda and SparseGPT.

`sequential_layers` captures what the first decoder layer receives (the embeddings) and the keyword arguments
the model passes each layer (position embeddings, attention mask, position ids: sliding-window and global layers
get their own), then yields one `LayerPass`
per decoder layer. The caller observes the layer's Linear inputs, changes its weights, and advances; the
runner then recomputes that layer's outputs with the changed weights and feeds them to the next layer, so a
later layer is calibrated on the outputs of the already pruned or quantized earlier ones.

Memory: only one layer's inputs are held (advancing replaces each window's input by its output), in the model
dtype: for 128 windows of 2048 tokens at hidden size 4096 in bf16, 2 GiB. The layer runs one window at a time, so
its intermediate activations (the MLP's 2048 × 14336 per window) are never materialized for all windows at once.
A model that lives on another device (CPU while `device` is CUDA: the onloaded mode) is moved there one layer at
a time, and its activations stay in host memory too, each window visiting `device` only while the layer reads
it (the embeddings too: each window's goes to host memory as it is captured), as llm-compressor's sequential
pipeline keeps them: at 32B (hidden 5120) one set is 2.7 GB, which the GPU then does not hold beside the layer
and its float32 Hessians.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch.utils.hooks import RemovableHandle

from worker.engine.steps import EngineError

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]

MIN_ROUTED_TOKENS = 32
"""An expert's Linear (mixture of experts) that read fewer calibration tokens than this is not calibrated on
them: GPTQ rounds it to nearest and Wanda scores it by magnitude, and its per-layer record says so
(`calibration`)."""


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The decoder layer stack and its module name: ("model.layers", layers) for Llama-like models."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] == "layers":
            if count is None or len(module) == count:
                return name, module
    raise EngineError(
        "unsupported_model",
        "no decoder layer stack ('<...>.layers' ModuleList) found: sequential calibration "
        "needs a transformers decoder model such as Llama, Mistral or Qwen",
    )


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


class _Captured(Exception):
    """Raised by the stand-in first layer once it has recorded its inputs."""


class _Catcher(torch.nn.Module):
    """Stands in for layer 0 during capture: records its hidden states (moved to `store` as each window arrives,
    when given) and keyword arguments, then stops."""

    def __init__(self, layer: torch.nn.Module, store: torch.device | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.store = store
        self.hidden: list[torch.Tensor] = []
        self.kwargs: dict[str, Any] | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise EngineError("unsupported_model", "decoder layers called with positional arguments are not supported")
        self.hidden.append(hidden_states if self.store is None else hidden_states.to(self.store))
        if self.kwargs is None:
            self.kwargs = kwargs
        raise _Captured


class _Recorder(torch.nn.Module):
    """Stands in for one decoder layer while the keyword arguments of every layer are recorded (models with
    sliding-window and global layers pass each kind its own mask and position embeddings): keeps them, hands
    the hidden states through, and stops the forward at the last layer."""

    def __init__(self, layer: torch.nn.Module, last: bool) -> None:
        super().__init__()
        self.layer = layer  # still a submodule: a model-wide forward pre-hook (compressed-tensors decompresses
        # the weights on the first forward) reaches it
        self.last = last
        self.kwargs: dict[str, Any] | None = None
        if hasattr(layer, "attention_type"):  # models that pick each layer's mask by its attention type
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.kwargs = kwargs
        if self.last:
            raise _Captured
        return hidden_states


def _layer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
    kept["use_cache"] = False
    return kept


class LayerPass:
    """One decoder layer during a sequential pass: its inputs are cached, its weights may be changed."""

    def __init__(
        self,
        index: int,
        name: str,
        layer: torch.nn.Module,
        hidden: list[torch.Tensor],
        kwargs: dict[str, Any],
        device: torch.device | None = None,
    ) -> None:
        self.index = index
        self.name = name  # "model.layers.3"
        self.layer = layer
        self._hidden = hidden  # on `device`, or in host memory when the model is onloaded
        self.kwargs = kwargs  # what the model passes every layer (position_embeddings, attention_mask, ...)
        self.device = device

    def _on_device(self, window: torch.Tensor) -> torch.Tensor:
        return window if self.device is None else window.to(self.device, non_blocking=True)

    def inputs(self) -> Iterator[torch.Tensor]:
        """The layer's input hidden states, one [1, seq, hidden] tensor per calibration window, each on the
        layer's device while it is read."""
        for window in self._hidden:
            yield self._on_device(window)

    def release(self) -> None:
        """Drop the cached inputs (the runner calls this once it has the outputs: whoever still holds this
        pass must not keep a whole layer's inputs alive while the next layer runs)."""
        self._hidden = []

    @torch.no_grad()
    def observe(self, callbacks: dict[str, Callable[[torch.Tensor], None]], windows: int | None = None) -> None:
        """Run the layer over every window (or the first `windows`); each callback gets the 2-D input
        [tokens, in_features] of the module with that full name (for example "model.layers.3.mlp.down_proj").
        Hooks are removed after."""
        modules = dict(self.layer.named_modules(prefix=self.name))
        missing = sorted(set(callbacks) - set(modules))
        if missing:
            raise EngineError("bad_spec", f"modules {missing} are not inside {self.name}")
        handles = hook_inputs(modules, callbacks)
        try:
            for hidden in self._hidden[:windows]:
                self.layer(self._on_device(hidden), **self.kwargs)
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def forward(self, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The layer's outputs with its current weights, one per window (on `inputs`, or the cached inputs)."""
        windows = inputs or self._hidden
        return [_layer_output(self.layer(self._on_device(hidden), **self.kwargs)) for hidden in windows]

    run = forward

    @torch.no_grad()
    def advance_(self) -> list[torch.Tensor]:
        """Replace the cached inputs by the layer's outputs, window by window, and hand them over: an input is
        not needed once its output exists, so one set of activations is held instead of two (2.7 GB for
        128 × 2048 tokens at hidden 5120 in bf16). The pass holds nothing after."""
        hidden = list(self._hidden)  # a list of our own: a caller may still hold the inputs' list
        self._hidden = []
        for i, window in enumerate(hidden):
            output = _layer_output(self.layer(self._on_device(window), **self.kwargs))
            hidden[i] = output if window.device == output.device else output.to(window.device)
            del window, output
        return hidden


@torch.no_grad()
def _capture(
    model: torch.nn.Module,
    layers: torch.nn.ModuleList,
    windows: torch.Tensor,
    device: torch.device,
    store: torch.device | None = None,
):
    """Embeddings output and layer keyword arguments for every window, with only the pre-layer modules moved.

    The embeddings are computed on `device`; with `store` (host memory, for an onloaded model) each window's
    goes there as soon as it is captured, so `device` holds one window's at a time. The keyword arguments are the
    first window's, on `device`, where the layers read them (every window has the same length)."""
    moved = [m for m in _pre_layer_modules(model, layers) if _device_of(m) not in (None, device)]
    homes = [_device_of(m) for m in moved]
    for module in moved:
        module.to(device)
    real = list(layers)
    recorders = [_Recorder(layer, last=i == len(real) - 1) for i, layer in enumerate(real)]
    catcher = _Catcher(real[0], store)
    try:
        for index, recorder in enumerate(recorders):
            layers[index] = recorder
        if len(windows):
            try:
                model(input_ids=windows[0].unsqueeze(0).to(device), use_cache=False)
            except _Captured:
                pass
        for index, layer in enumerate(real):
            layers[index] = catcher if index == 0 else layer
        for window in windows:
            try:
                model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        for index, layer in enumerate(real):
            layers[index] = layer
        for module, home in zip(moved, homes, strict=True):
            module.to(home)
    if catcher.kwargs is None or any(recorder.kwargs is None for recorder in recorders):
        raise EngineError("bad_spec", "no calibration windows: sequential calibration needs at least one")
    return catcher.hidden, [_layer_kwargs(recorder.kwargs) for recorder in recorders]


def _device_of(module: torch.nn.Module) -> torch.device | None:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return None


def _pre_layer_modules(model: torch.nn.Module, layers: torch.nn.ModuleList) -> list[torch.nn.Module]:
    """Modules that run before the layers: embeddings and rotary position embeddings (those with state)."""
    inside = {id(m) for m in layers.modules()}
    found = []
    for name, module in model.named_modules():
        if id(module) in inside or module is model:
            continue
        leaf = name.split(".")[-1]
        if isinstance(module, torch.nn.Embedding) or "rotary" in leaf:
            found.append(module)
    return found


def sequential_layers(
    model: torch.nn.Module,
    windows: torch.Tensor,
    device: torch.device | str,
    progress: ProgressFn | None = None,
    final: list[torch.Tensor] | None = None,
) -> Iterator[LayerPass]:
    """Yield a `LayerPass` per decoder layer, in order; advancing feeds the (modified) layer's outputs onward.

    `windows` is a [n, seq] tensor of token ids. The generator must be run to the end (or closed) to return
    the moved layers to their home device. `final`, when given, receives the last layer's outputs (one per
    window, on `device`, or in host memory when the model's layers live there) once the generator has run to
    the end.
    """
    device = torch.device(device)
    prefix, layers = decoder_layers(model)
    was_training = model.training
    model.eval()
    # an onloaded model's activations live where its layers do, each window visiting `device` while it is read
    host = next((home for home in map(_device_of, layers) if home not in (None, device)), None)
    onloaded = host is not None
    hidden, layer_kwargs = _capture(model, layers, windows, device, host)
    try:
        for index, layer in enumerate(layers):
            home = _device_of(layer)
            if home is not None and home != device:
                layer.to(device)
            try:
                step = LayerPass(
                    index, f"{prefix}.{index}", layer, hidden, layer_kwargs[index], device if onloaded else None
                )
                hidden = None  # the pass owns the inputs now: advancing frees each once its output exists
                yield step
                hidden = step.advance_()
                del step
            finally:
                if home is not None and home != device:
                    layer.to(home)
            if progress is not None:
                progress((index + 1) / len(layers), f"calibrated {prefix}.{index}")
        if final is not None:
            final.extend(hidden)
    finally:
        model.train(was_training)


@contextlib.contextmanager
def onloaded(module: torch.nn.Module, device: torch.device | str) -> Iterator[torch.nn.Module]:
    """The module on `device` for the block, back where it lived after (nothing moves when it is there)."""
    device = torch.device(device)
    home = _device_of(module)
    if home is None or home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextlib.contextmanager
def streamed(model: torch.nn.Module, device: torch.device | str) -> Iterator[torch.nn.Module]:
    """Whole-model forwards on `device` for a model whose decoder layers live elsewhere (host memory): the
    modules outside the layers move to `device` for the block, and each layer visits it during its own forward
    only. Every window then moves every layer (slow for large models: the layer-major `sequential_layers` is
    the fast path); a model already on `device` runs as it is."""
    device = torch.device(device)
    _, layers = decoder_layers(model)
    homes = [_device_of(layer) for layer in layers]
    outside_home = _device_of(model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None
    if all(home in (None, device) for home in homes) and outside_home in (None, device):
        yield model
        return
    real = list(layers)
    for index in range(len(real)):
        layers[index] = torch.nn.Identity()  # out of the way while the rest of the model moves
    try:
        model.to(device)
    finally:
        for index, layer in enumerate(real):
            layers[index] = layer
    hooks = []
    for layer, home in zip(real, homes, strict=True):
        if home not in (None, device):
            hooks.append(layer.register_forward_pre_hook(_mover(device)))
            hooks.append(layer.register_forward_hook(_mover(home)))
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        for index in range(len(real)):
            layers[index] = torch.nn.Identity()
        model.to(outside_home)
        for index, layer in enumerate(real):
            layers[index] = layer


def _mover(device: torch.device) -> Callable[..., None]:
    """A forward (pre-)hook that moves its module to `device`."""

    def move(module: torch.nn.Module, *_: Any) -> None:
        module.to(device)

    return move


class Statistic(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


S = TypeVar("S", bound=Statistic)


def hook_inputs(
    modules: Mapping[str, torch.nn.Module], callbacks: Mapping[str, Callable[[torch.Tensor], None]]
) -> list[RemovableHandle]:
    """Forward pre-hooks handing each named module's input, as 2-D [tokens, in_features], to its callback; the
    caller removes them."""
    return [
        modules[name].register_forward_pre_hook(lambda _module, args, fn=fn: fn(args[0].reshape(-1, args[0].shape[-1])))
        for name, fn in callbacks.items()
    ]


class SharedInputs(Generic[S]):
    """Each named module's 2-D inputs added to a statistic made by `new_statistic(name)`, in the order the modules
    read them. Modules fed the very same tensor (q/k/v, gate/up) share one statistic, computed once: `result()`
    maps each of them to the same object."""

    def __init__(self, names: list[str], new_statistic: Callable[[str], S]) -> None:
        self.names, self.new_statistic = names, new_statistic
        self.owned: dict[str, S] = {}
        self.alias: dict[str, str] = {}
        self.last: torch.Tensor | None = None  # kept alive, so its memory cannot be reused by another tensor
        self.last_owner: str | None = None

    def callbacks(self) -> dict[str, Callable[[torch.Tensor], None]]:
        return {name: functools.partial(self.collect, name) for name in self.names}

    def collect(self, name: str, x: torch.Tensor) -> None:
        seen = self.last
        same = (
            seen is not None
            and seen.data_ptr() == x.data_ptr()
            and seen.shape == x.shape
            and seen.stride() == x.stride()
        )
        if same and name not in self.owned:
            self.alias.setdefault(name, str(self.last_owner))
            return
        if name not in self.owned:
            self.owned[name] = self.new_statistic(name)
        self.owned[name].add(x)
        self.last, self.last_owner = x, name

    def result(self) -> dict[str, S]:
        """{name: its statistic}; a module that read nothing (an expert no token was routed to) gets an empty one."""
        self.last = None
        for name in self.names:
            if name not in self.owned and name not in self.alias:
                self.owned[name] = self.new_statistic(name)
        return {name: self.owned[self.alias.get(name, name)] for name in self.names}


def observe_shared(
    step: LayerPass, names: list[str], new_statistic: Callable[[str], S], windows: int | None = None
) -> dict[str, S]:
    """Run the layer over the calibration windows once (or the first `windows`), collecting `SharedInputs`."""
    shared = SharedInputs(names, new_statistic)
    step.observe(shared.callbacks(), windows)
    return shared.result()


def input_stages(step: LayerPass, names: list[str]) -> list[list[str]]:
    """The named modules grouped by shared input (q/k/v, o, gate/up, down), in the order the layer reads them,
    found by running the layer on one window."""
    created: list[_Mark] = []
    marks = observe_shared(step, names, lambda _name: _Mark(created), windows=1)
    stages: dict[int, list[str]] = {id(mark): [] for mark in created}
    for name, mark in marks.items():
        stages[id(mark)].append(name)
    return list(stages.values())


class _Mark:
    """A statistic that only records when it was first needed (see `input_stages`)."""

    def __init__(self, created: list[_Mark]) -> None:
        created.append(self)

    def add(self, x: torch.Tensor) -> None:
        pass


class HessianAccumulator:
    """H = 2/n · Σ x xᵀ over the rows x of every batch added, as a float32 running mean (GPTQ, SparseGPT).

    The running mean rescales the sum before each addition, so H stays O(|x|²) however many tokens are added.
    Products are accumulated in float32 whatever the input dtype (see `add_gram_`).
    """

    def __init__(self, features: int, device: torch.device | str | None = None) -> None:
        self._hessian = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.count = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(device=self._hessian.device)
        rows = x.shape[0]
        if rows == 0:
            return
        total = self.count + rows
        self._hessian.mul_(self.count / total)
        add_gram_(self._hessian, x, 2.0 / total)
        self.count = total

    @property
    def hessian(self) -> torch.Tensor:
        return self._hessian


@torch.no_grad()
def add_gram_(out: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    """out += alpha · xᵀx, in float32.

    bf16 / fp16 inputs on CUDA are multiplied on the tensor cores with float32 accumulation and output: the
    product of two half-precision numbers is exact in float32, so this equals the float32 product of the
    upcast inputs up to summation order, at about ten times the speed (the down_proj Hessian of an 8B model is
    14336² per window). Everything else is upcast to float32 first."""
    if x.dtype in (torch.bfloat16, torch.float16) and half_gram_supported(x.device, x.dtype):
        out.add_(torch.mm(x.T, x, out_dtype=torch.float32), alpha=alpha)
        return
    x = x.float()
    out.addmm_(x.T, x, alpha=alpha)


@functools.cache
def half_gram_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch can multiply `dtype` matrices on `device` into a float32 result (`mm(out_dtype=)`,
    CUDA only); checked once per device and dtype on a small exact case."""
    if device.type != "cuda":
        return False
    a = torch.tensor([[1.0, 2.0], [3.0, 1 / 256]], dtype=dtype, device=device)
    try:
        product = torch.mm(a.T, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        log.info("no float32-output half-precision matmul here (%s): Hessians upcast their inputs", exc)
        return False
    return product.dtype == torch.float32 and bool(torch.equal(product, a.float().T @ a.float()))
