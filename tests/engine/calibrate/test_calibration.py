"""Sequential calibration runner: exact replay of the model, modifications seen downstream, Hessian maths."""

from __future__ import annotations

import pytest
import torch

from worker.engine.calibrate.layerwise import HessianAccumulator, decoder_layers, sequential_layers
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
