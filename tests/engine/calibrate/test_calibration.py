"""Sequential calibration runner: exact replay of the model, modifications seen downstream, Hessian maths."""

from __future__ import annotations

import pytest
import torch

from worker.engine.calibrate.layerwise import HessianAccumulator, _capture, decoder_layers, sequential_layers
from worker.engine.load.checkpoint import LoadedModel


def _windows(model: torch.nn.Module, n: int = 3, seq: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (n, seq), generator=generator)


def _final_hidden(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """The last decoder layer's output (before the final norm), from the model's own forward."""
    captured = []
    _, layers = decoder_layers(model)
    handle = layers[-1].register_forward_hook(
        lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        for window in windows:
            model(input_ids=window.unsqueeze(0), use_cache=False)
    handle.remove()
    return torch.cat(captured)


def test_decoder_layers_finds_the_stack(tiny: LoadedModel) -> None:
    name, layers = decoder_layers(tiny.model)
    assert name == "model.layers" and len(layers) == tiny.model.config.num_hidden_layers


def test_unmodified_pass_reproduces_the_model(tiny: LoadedModel) -> None:
    model, windows = tiny.model, _windows(tiny.model)
    expected = _final_hidden(model, windows)
    outputs = None
    for step in sequential_layers(model, windows, "cpu"):
        assert step.name == f"model.layers.{step.index}"
        assert sum(1 for _ in step.inputs()) == len(windows)
        outputs = step.forward()
    torch.testing.assert_close(torch.cat(outputs), expected, rtol=1e-5, atol=1e-5)


def test_observe_gives_two_d_linear_inputs_and_removes_hooks(tiny: LoadedModel) -> None:
    model, windows = tiny.model, _windows(tiny.model, n=2, seq=8)
    seen: dict[str, list[torch.Tensor]] = {}
    for step in sequential_layers(model, windows, "cpu"):
        names = [f"{step.name}.self_attn.q_proj", f"{step.name}.mlp.down_proj"]
        step.observe({n: (lambda x, n=n: seen.setdefault(n, []).append(x)) for n in names})
    down = seen["model.layers.0.mlp.down_proj"]
    assert len(down) == 2 and down[0].shape == (8, model.config.intermediate_size)
    assert seen["model.layers.1.self_attn.q_proj"][0].shape == (8, model.config.hidden_size)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_modified_layer_is_seen_by_the_next(tiny: LoadedModel) -> None:
    model, windows = tiny.model, _windows(tiny.model)
    inputs_of_layer_1 = []
    for step in sequential_layers(model, windows, "cpu"):
        if step.index == 0:
            before = step.forward()
            with torch.no_grad():
                step.layer.mlp.down_proj.weight.mul_(0.5)
            after = step.forward()
        if step.index == 1:
            inputs_of_layer_1 = list(step.inputs())
    assert not torch.allclose(torch.cat(before), torch.cat(after))
    torch.testing.assert_close(torch.cat(inputs_of_layer_1), torch.cat(after))
    # and the whole model now agrees with the pass
    expected = _final_hidden(model, windows)
    assert expected.shape[0] == len(windows)


def test_hessian_accumulator_is_a_running_mean() -> None:
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 6, generator=generator) for n in (5, 1, 12)]
    accumulator = HessianAccumulator(6)
    for batch in batches:
        accumulator.add(batch)
    x = torch.cat(batches).double()
    expected = (2.0 / x.shape[0]) * x.T @ x
    assert accumulator.count == 18
    torch.testing.assert_close(accumulator.hessian.double(), expected, rtol=1e-5, atol=1e-6)


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in a keyword argument (a tensor, or a tuple of them such as the position embeddings)."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value for t in _tensors(item)] if isinstance(value, tuple | list) else []


def test_captured_embeddings_go_where_they_are_stored(tiny: LoadedModel) -> None:
    """The capture computes the embeddings on the compute device and puts each window's where the activations are
    stored (host memory for an onloaded model; the meta device stands in for it here), while the layers' keyword
    arguments stay on the compute device, where the layers read them. Without a store, nothing moves."""
    model, windows = tiny.model, _windows(tiny.model)
    _, layers = decoder_layers(model)
    cpu = torch.device("cpu")
    kept, kept_kwargs = _capture(model, layers, windows, cpu)
    stored, stored_kwargs = _capture(model, layers, windows, cpu, torch.device("meta"))
    assert [w.device.type for w in kept] == ["cpu"] * len(windows)
    assert [w.device.type for w in stored] == ["meta"] * len(windows)
    assert [w.shape for w in stored] == [w.shape for w in kept] == [(1, windows.shape[1], model.config.hidden_size)] * 3
    for kwargs in (*kept_kwargs, *stored_kwargs):
        assert kwargs["position_embeddings"] is not None
        assert all(t.device.type == "cpu" for value in kwargs.values() for t in _tensors(value))
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_empty_windows_are_refused(tiny: LoadedModel) -> None:
    from worker.engine.steps import EngineError

    with pytest.raises(EngineError):
        next(sequential_layers(tiny.model, torch.zeros(0, 8, dtype=torch.long), "cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device beside host memory")
def test_onloaded_pass_keeps_activations_in_host_memory(tiny: LoadedModel) -> None:
    """A model in host memory calibrated on the GPU: each layer visits the GPU, its inputs stay on the host
    (the GPU holds one window at a time), and the pass still reproduces the model."""
    model, windows = tiny.model, _windows(tiny.model)
    expected = _final_hidden(model, windows)
    cuda = torch.device("cuda")
    final: list[torch.Tensor] = []
    for step in sequential_layers(model, windows, cuda, final=final):
        assert all(window.device.type == "cpu" for window in step._hidden)
        assert next(step.layer.parameters()).device.type == "cuda"
        assert all(window.device.type == "cuda" for window in step.inputs())
    assert all(p.device.type == "cpu" for p in model.parameters()), "every layer went back to host memory"
    assert all(window.device.type == "cpu" for window in final)
    torch.testing.assert_close(torch.cat(final), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device beside host memory")
def test_onloaded_capture_holds_one_window_on_the_gpu(tiny: LoadedModel) -> None:
    """An onloaded model's embeddings go to host memory window by window as they are captured: until the first
    layer pass, the GPU holds the moved modules (embeddings, rotary, layer 0) and about one window, never the
    whole set of windows."""
    model = tiny.model
    windows = _windows(model, n=128, seq=512)
    cuda = torch.device("cuda", torch.cuda.current_device())
    _, layers = decoder_layers(model)
    window_bytes = windows.shape[1] * model.config.hidden_size * model.dtype.itemsize
    moved = (model.get_input_embeddings(), model.model.rotary_emb, layers[0])
    moved_bytes = sum(t.numel() * t.element_size() for m in moved for t in (*m.parameters(), *m.buffers()))
    bound = moved_bytes + 4 * window_bytes + (2 << 20)  # the slack: masks, position ids, allocator rounding
    assert len(windows) * window_bytes > 4 * bound, "the windows must dwarf the bound for the check to mean anything"
    torch.cuda.synchronize(cuda)
    torch.cuda.reset_peak_memory_stats(cuda)
    before = torch.cuda.memory_allocated(cuda)
    passes = sequential_layers(model, windows, cuda)
    step = next(passes)
    peak = torch.cuda.max_memory_allocated(cuda) - before
    assert len(step._hidden) == len(windows) and all(w.device.type == "cpu" for w in step._hidden)
    passes.close()
    assert peak < bound, f"GPU peak {peak} bytes while capturing; one window is {window_bytes}"
    assert all(p.device.type == "cpu" for p in model.parameters())
