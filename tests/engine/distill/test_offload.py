"""Host-memory plumbing of the lean distillation mode, on the CPU (host and device are one memory there, so what is
checked is the bookkeeping: layouts, masks, which layer's weights are swapped in when)."""

from __future__ import annotations

import pytest
import torch

from tests.utils.factories import tiny_llama
from worker.engine.distill.offload import Layout, StreamedLayers, host_buffer, pack_mask, unpack_mask


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (16, 33), (2, 3, 4)])
def test_masks_survive_bit_packing(shape):
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    bits = pack_mask(keep)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-keep.numel() // 8)
    weight = torch.randn(shape)
    flags = unpack_mask(bits, weight)
    assert flags.dtype == weight.dtype and torch.equal(flags.bool(), keep)


def test_layout_places_mixed_tensors_in_one_aligned_buffer():
    tensors = [torch.randn(3, 5), torch.arange(7, dtype=torch.int64), torch.randn(()).bfloat16(), torch.empty(0)]
    layout = Layout.of(tensors)
    flat = host_buffer(layout.nbytes, pin=False)
    views = layout.views(flat)
    for view, tensor in zip(views, tensors, strict=True):
        view.copy_(tensor)
        assert view.shape == tensor.shape and view.dtype == tensor.dtype and torch.equal(view, tensor)
        assert view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert all(offset % 256 == 0 for offset in layout.offsets)


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _in_host(streamer: StreamedLayers) -> list[bool]:
    """Per layer: whether its weights are the host buffer's (and not a device copy's)."""
    return [_storage(layer.self_attn.q_proj.weight) == _storage(streamer.slices[0]) for layer in streamer.layers]


def test_streamed_layers_give_the_same_outputs_with_one_layer_swapped_in_at_a_time():
    model = tiny_llama(layers=3)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    embed = model.model.embed_tokens.weight
    embed_storage = _storage(embed)
    streamer = StreamedLayers(model, torch.device("cpu"))
    seen = []

    def check(index):
        def hook(module, args):
            seen.append((index, _in_host(streamer)))

        return hook

    with streamer as streamed:
        hooks = [layer.register_forward_pre_hook(check(i)) for i, layer in enumerate(streamer.layers)]
        with torch.no_grad():
            logits = streamed(input_ids=ids, use_cache=False).logits
        for hook in hooks:
            hook.remove()
        between = _in_host(streamer)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    # during layer i's forward, only layer i's weights point at a (device) copy; between forwards, none do
    assert seen == [(i, [j != i for j in range(3)]) for i in range(3)]
    assert all(between)
    assert model.model.embed_tokens.weight is embed and _storage(embed) == embed_storage  # back to the original
    assert not any(layer._forward_pre_hooks or layer._forward_hooks for layer in streamer.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, expected, rtol=0, atol=0)
