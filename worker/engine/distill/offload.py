"""Host memory for what does not fit on the GPU: flat host buffers, copies that overlap compute, a model whose
decoder layers' weights are streamed to the device one layer at a time, and bit-packed sparsity masks.

Used by the lean `distill:kd` mode (see distill.py). On the CPU the "host" and the "device" are the same memory:
every copy is a plain copy and nothing is pinned, so the same code runs in the CPU tests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from worker.engine.calibrate.layerwise import decoder_layers

ALIGN = 256  # bytes: every tensor in a flat buffer starts here (cuBLAS and vectorized kernels want aligned data)


# --- flat buffers ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where tensors lie in one flat byte buffer: many tensors, one allocation and one copy.

    Why flat: torch's pinned-memory allocator rounds every allocation up to a power of two (a 33.6 MB weight takes
    64 MiB), and one host-to-device copy per layer is cheaper than one per tensor."""

    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, tensors: Iterable[torch.Tensor]) -> Layout:
        tensors = list(tensors)
        offsets, end = [], 0
        for tensor in tensors:
            offsets.append(end)
            end += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
        return cls(tuple(t.shape for t in tensors), tuple(t.dtype for t in tensors), tuple(offsets), end)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The tensors as views of `flat` (uint8, `nbytes` long, on any device)."""
        return [
            flat[offset : offset + shape.numel() * dtype.itemsize].view(dtype).view(shape)
            for shape, dtype, offset in zip(self.shapes, self.dtypes, self.offsets, strict=True)
        ]


def host_buffer(nbytes: int, pin: bool, zero: bool = False) -> torch.Tensor:
    """A flat uint8 host buffer, page-locked when `pin` (needed for copies that overlap compute on CUDA)."""
    make = torch.zeros if zero else torch.empty
    return make(nbytes, dtype=torch.uint8, pin_memory=pin)


def host_like(tensors: list[torch.Tensor], pin: bool, zero: bool = False) -> list[torch.Tensor]:
    """Host tensors shaped like `tensors`, all in one flat buffer."""
    layout = Layout.of(tensors)
    return layout.views(host_buffer(layout.nbytes, pin, zero))


def release_pinned_cache(device: torch.device) -> None:
    """Give freed page-locked host memory back to the system: torch's pinned allocator keeps it cached for reuse,
    and a worker that ran one lean step would otherwise hold tens of GB of locked memory for good."""
    if device.type != "cuda":
        return
    # torch.accelerator.empty_host_cache is recent (the 2.13 this project pins has it); older builds have the
    # private call, and the oldest neither (then the memory stays cached for this process's next pinned buffers)
    release = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if release is not None:
        release()


# --- copies that overlap compute ------------------------------------------------------------------------------
@dataclass
class Fetch:
    """Device copies of host tensors, in flight on a copy stream until `CopyStream.wait` returns them."""

    tensors: list[torch.Tensor]
    event: torch.cuda.Event | None


class CopyStream:
    """Host↔device copies on a CUDA stream of their own, so that they overlap the compute stream's kernels.

    Ordering is explicit: the compute stream waits for a fetch's event before it reads the copies, and a store waits
    for the compute stream before it reads a device tensor. The caching allocator hands a freed block to the next
    allocation on the stream that made it, whatever other streams still do with it, so every device tensor that
    another stream uses is marked with `record_stream`. On the CPU a fetch is a clone and a store a copy."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def fetch(self, host: list[torch.Tensor]) -> Fetch:
        """Start copying host tensors (pinned, and not written until the fetch is waited for) to the device."""
        if self.stream is None:
            return Fetch([t.clone() for t in host], None)
        with torch.cuda.stream(self.stream):
            copies = [t.to(self.device, non_blocking=True) for t in host]
        return Fetch(copies, self.stream.record_event())

    def wait(self, fetch: Fetch) -> list[torch.Tensor]:
        """The fetched tensors, once the compute stream is ordered after their copies."""
        if fetch.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(fetch.event)
            for tensor in fetch.tensors:
                tensor.record_stream(current)
        return fetch.tensors

    def store(self, host: torch.Tensor, tensor: torch.Tensor) -> None:
        """Copy a device tensor, as the compute stream leaves it, into pinned host memory (in flight until `sync`)."""
        if self.stream is None:
            host.copy_(tensor)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self.stream)

    def after(self, other: CopyStream) -> None:
        """Order this stream's later copies after every copy `other` has been given so far."""
        if self.stream is not None and other.stream is not None:
            self.stream.wait_stream(other.stream)

    def sync(self) -> None:
        """Block the host until every copy given so far is done (before the CPU reads what they wrote)."""
        if self.stream is not None:
            self.stream.synchronize()


# --- a model streamed layer by layer --------------------------------------------------------------------------
def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's parameters and buffers, each once (tied weights are one tensor)."""
    return list({id(t): t for t in (*module.parameters(), *module.buffers())}.values())


def _point_(tensors: list[torch.Tensor], storage: list[torch.Tensor]) -> None:
    for tensor, data in zip(tensors, storage, strict=True):
        tensor.data = data


class StreamedLayers:
    """`with StreamedLayers(model, device):` the model runs forward on `device` while its decoder layers' weights
    stay in host memory, so the GPU holds one or two layers of it instead of all of them.

    On entry the layers' weights move into one host buffer, page-locked on CUDA (each layer a contiguous slice);
    everything else (embeddings, final norm, output layer, rotary buffers: a few percent of an 8B model) moves to
    the device for the duration. A forward pre-hook points a layer's tensors at a device copy of its slice, waiting
    for the copy that the previous layer's pre-hook started on a copy stream, and starts the next layer's; a forward
    hook points them back at host memory, which frees the copy. On exit every tensor is in ordinary host memory
    again and the page-locked buffer is given back. For inference only: no gradients flow to the weights."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.layers = list(decoder_layers(model)[1])
        self.copies = CopyStream(device)
        self.groups = [_tensors(layer) for layer in self.layers]
        inside = {id(t) for group in self.groups for t in group}
        self.resident = [t for t in _tensors(model) if id(t) not in inside]
        self.layouts = [Layout.of(group) for group in self.groups]
        self.slices: list[torch.Tensor] = []
        self.host_views: list[list[torch.Tensor]] = []
        self.originals: list[torch.Tensor] = []
        self.prefetched: dict[int, Fetch] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> torch.nn.Module:
        buffer = host_buffer(sum(layout.nbytes for layout in self.layouts), pin=self.device.type == "cuda")
        start = 0
        for group, layout in zip(self.groups, self.layouts, strict=True):
            flat = buffer[start : start + layout.nbytes]
            start += layout.nbytes
            views = layout.views(flat)
            for view, tensor in zip(views, group, strict=True):
                view.copy_(tensor)
            _point_(group, views)  # the pageable originals are freed here, one tensor at a time
            self.slices.append(flat)
            self.host_views.append(views)
        self.originals = [t.data for t in self.resident]
        _point_(self.resident, [t.to(self.device) for t in self.originals])
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre_hook(index)))
            self.handles.append(layer.register_forward_hook(self._post_hook(index)))
        return self.model

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.prefetched.clear()
        for group, views in zip(self.groups, self.host_views, strict=True):
            _point_(group, [view.clone() for view in views])  # pageable copies: the pinned buffer goes
        _point_(self.resident, self.originals)
        self.slices, self.host_views = [], []
        release_pinned_cache(self.device)

    def _pre_hook(self, index: int):
        def load(module: torch.nn.Module, args: object) -> None:
            fetch = self.prefetched.pop(index, None) or self.copies.fetch([self.slices[index]])
            (flat,) = self.copies.wait(fetch)
            _point_(self.groups[index], self.layouts[index].views(flat))
            if index + 1 < len(self.layers):
                self.prefetched[index + 1] = self.copies.fetch([self.slices[index + 1]])

        return load

    def _post_hook(self, index: int):
        def unload(module: torch.nn.Module, args: object, output: object) -> None:
            _point_(self.groups[index], self.host_views[index])

        return unload


# --- sparsity masks, 8 to a byte ------------------------------------------------------------------------------
def _bit_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes of 8 flags each (an 8B model's masks: 1 GB instead of 8 GB)."""
    flags = keep.reshape(-1).to(torch.uint8)
    flags = torch.nn.functional.pad(flags, (0, -flags.numel() % 8))
    return (flags.view(-1, 8) << _bit_shifts(flags.device)).sum(-1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The flags of `pack_mask` as 0 or 1 in `like`'s shape and dtype (multiply by it to apply the mask)."""
    flags = (bits.unsqueeze(-1) >> _bit_shifts(bits.device)) & 1
    return flags.view(-1)[: like.numel()].view(like.shape).to(like.dtype)
