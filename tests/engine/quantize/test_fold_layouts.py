"""AWQ and SmoothQuant scale folding beyond the Llama layout. Gemma 3: (1 + weight) norms refuse a fold, and the
MLP's input norm is `pre_feedforward_layernorm` (Gemma's `post_attention_layernorm` normalizes the attention
output). Phi-3: the norms fold into the fused qkv_proj and gate_up_proj as a whole, v → o into qkv_proj's value
rows and up → down into gate_up_proj's up rows only."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tests.utils.factories import build_tiny_model_of
from worker.engine.calibrate import select_linears
from worker.engine.load import load_model
from worker.engine.quantize.awq import FOLDS, NORM_FOLDS, fold_checked_, fold_groups
from worker.engine.quantize.common import LayerGroup

pytestmark = pytest.mark.usefixtures("one_thread")
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


class _Pass:
    """Just what fold_groups reads from a LayerPass: the layer and its full name."""

    def __init__(self, layer, name):
        self.layer, self.name = layer, name


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_model_of(tmp_path_factory.mktemp("gemma3") / "model", "gemma3_text")


def gemma3(folder, plain_norms: bool):
    """The tiny Gemma 3 with random norm weights; with `plain_norms`, each norm computes x̂ · w (same function)."""
    model = load_model(folder, "hf", torch.device("cpu")).model
    g = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        for name in NORMS:
            norm = getattr(layer, name)
            with torch.no_grad():
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) - 0.5)
            if plain_norms:
                plain = LlamaRMSNorm(norm.weight.numel(), eps=norm.eps)
                with torch.no_grad():
                    plain.weight.copy_(1 + norm.weight)
                setattr(layer, name, plain)
    return model


def fold_every_layer(model, folds=FOLDS) -> list[tuple[str, bool]]:
    """Fold random scales wherever fold_groups allows; (producer name, folded) for each."""
    g = torch.Generator().manual_seed(0)
    linears = select_linears(model)
    done = []
    for index, layer in enumerate(model.model.layers):
        group = LayerGroup(step=_Pass(layer, f"model.layers.{index}"), linears=linears, stats={})
        names = {id(m): n for n, m in layer.named_modules()}
        for site in fold_groups(group, folds):
            s = 0.25 + 4 * torch.rand(site.features, generator=g)
            folded = fold_checked_(site, [linears[c] for c in site.consumers], s)
            done.append((names[id(site.producer)], folded))
    return done


@pytest.mark.parametrize("plain_norms", [False, True], ids=["gemma-norms", "plain-norms"])
def test_gemma3_folds_keep_the_function(folder, plain_norms) -> None:
    model = gemma3(folder, plain_norms)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    done = fold_every_layer(model)
    producers = [name for name, _ in done[:4]]
    assert producers == ["input_layernorm", "self_attn.v_proj", "pre_feedforward_layernorm", "mlp.up_proj"]
    norms_folded = {folded for name, folded in done if name.endswith("layernorm")}
    assert norms_folded == {plain_norms}  # x · (1 + w) cannot absorb a scale; x · w can
    assert all(folded for name, folded in done if name.endswith("_proj"))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def phi3_folder(tmp_path_factory):
    return build_tiny_model_of(tmp_path_factory.mktemp("phi3") / "model", "phi3")


@pytest.mark.parametrize("folds", [FOLDS, NORM_FOLDS], ids=["awq", "smoothquant"])
def test_phi3_fused_folds_keep_the_function(phi3_folder, folds) -> None:
    """Scales folded across the fused projections leave the model's outputs unchanged (before any rounding)."""
    model = load_model(phi3_folder, "hf", torch.device("cpu")).model
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        gate_rows = [layer.mlp.gate_up_proj.weight[:128].clone() for layer in model.model.layers]
        qk_rows = [layer.self_attn.qkv_proj.weight[:96].clone() for layer in model.model.layers]
    done = fold_every_layer(model, folds)
    expected_producers = ["input_layernorm", "self_attn.qkv_proj", "post_attention_layernorm", "mlp.gate_up_proj"]
    if folds is NORM_FOLDS:
        expected_producers = ["input_layernorm", "post_attention_layernorm"]
    assert done == [(name, True) for name in expected_producers] * len(model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    if folds is FOLDS:  # only the value rows and the up rows took a producer's 1/s; q/k and gate rows kept theirs
        for layer, gate, qk in zip(model.model.layers, gate_rows, qk_rows, strict=True):
            ratio_gate = layer.mlp.gate_up_proj.weight[:128] / gate
            ratio_qk = layer.self_attn.qkv_proj.weight[:96] / qk
            assert ratio_gate.std(dim=0).max() < 1e-5  # each column scaled once (by the norm's s), rows alike
            assert ratio_qk.std(dim=0).max() < 1e-5
