"""Weights whose shapes do not follow from config.json are refused at upload (422 naming tensor and shapes).

The uploads are the tiny Llama with a crafted safetensors header (zeros for data); the other families' names
(fused phi3 projections, qwen2 biases, qwen3 q/k norms, gemma's head_dim) are checked on tensor tables.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.archives import ArchiveError
from app.weight_shapes import check_weight_shapes
from tests.api import builders
from tests.api.test_uploads_refused import post, refused
from tests.utils.factories import tar_folder

L0 = "model.layers.0."


@pytest.mark.usefixtures("nothing_stored")
@pytest.mark.parametrize(
    ("changes", "config", "fragments"),
    [
        ({L0 + "self_attn.q_proj.weight": [48, 64]}, {}, ("q_proj", "[48, 64]", "[64, 64]", "num_attention_heads")),
        ({L0 + "self_attn.k_proj.weight": [64, 64]}, {}, ("k_proj", "[64, 64]", "[32, 64]", "num_key_value_heads")),
        ({L0 + "self_attn.o_proj.weight": [64, 32]}, {}, ("o_proj", "[64, 32]", "[64, 64]")),
        ({L0 + "mlp.gate_proj.weight": [96, 64]}, {}, ("gate_proj", "[96, 64]", "[128, 64]", "intermediate_size")),
        ({L0 + "mlp.down_proj.weight": [128, 64]}, {}, ("down_proj", "[128, 64]", "[64, 128]")),
        ({L0 + "input_layernorm.weight": [32]}, {}, ("input_layernorm", "[32]", "[64]", "hidden_size")),
        ({"model.norm.weight": [65]}, {}, ("model.norm.weight", "[65]", "[64]")),
        ({"lm_head.weight": [389, 32]}, {}, ("lm_head.weight", "[389, 32]", "[389, 64]", "vocab_size")),
        ({}, {"num_key_value_heads": 4}, ("k_proj", "[32, 64]", "[64, 64]")),
        ({}, {"intermediate_size": 256}, ("down_proj", "[64, 128]", "[64, 256]", "intermediate_size")),
        ({"model.layers.2.input_layernorm.weight": [64]}, {}, ("model.layers.2", "layer 2", "num_hidden_layers = 2")),
        ({}, {"num_hidden_layers": 4}, ("num_hidden_layers = 4", "layer(s) 2, 3")),
    ],
    ids=[
        "q_proj",
        "k_proj",
        "o_proj",
        "gate_proj",
        "down_proj-transposed",
        "layernorm",
        "final-norm",
        "lm_head",
        "config-kv-heads",
        "config-intermediate",
        "extra-layer",
        "missing-layers",
    ],
)
def test_mismatched_shapes_are_refused(client, tmp_path, tiny_model_dir, changes, config, fragments) -> None:
    folder = builders.with_tensors(tiny_model_dir, tmp_path / "m", changes, **config)
    refused(post(client, tar_folder(folder, tmp_path / "m.tar")), 422, "do not match" if changes else "", *fragments)


def test_crafted_header_with_right_shapes_is_accepted(client: httpx.Client, tmp_path: Path, tiny_model_dir) -> None:
    """The crafted file itself is fine: the same table, rewritten, uploads (so the refusals are the shapes)."""
    folder = builders.with_tensors(tiny_model_dir, tmp_path / "m", {})
    response = post(client, tar_folder(folder, tmp_path / "m.tar"))
    assert response.status_code == 201, response.text
    assert client.delete(f"/v1/models/{response.json()['id']}").status_code == 204


def table(**shapes: list[int]) -> dict[str, dict]:
    return {name.replace("__", "."): {"dtype": "BF16", "shape": shape} for name, shape in shapes.items()}


def sizes(model_type: str, **overrides: int) -> dict:
    base = {"hidden_size": 64, "intermediate_size": 96, "vocab_size": 100, "num_hidden_layers": 1}
    base.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return {"model_type": model_type, **base, **overrides}


@pytest.mark.parametrize(
    ("model_type", "good", "bad", "fragment"),
    [
        ("phi3", {"self_attn.qkv_proj.weight": [128, 64]}, {"self_attn.qkv_proj.weight": [192, 64]}, "qkv_proj"),
        ("phi3", {"mlp.gate_up_proj.weight": [192, 64]}, {"mlp.gate_up_proj.weight": [96, 64]}, "gate_up_proj"),
        ("qwen2", {"self_attn.k_proj.bias": [32]}, {"self_attn.k_proj.bias": [64]}, "k_proj.bias"),
        ("qwen3", {"self_attn.q_norm.weight": [16]}, {"self_attn.q_norm.weight": [64]}, "q_norm"),
        ("gemma2", {"pre_feedforward_layernorm.weight": [64]}, {"post_feedforward_layernorm.weight": [96]}, "post_"),
        ("mistral", {"self_attn.v_proj.weight": [32, 64]}, {"self_attn.v_proj.weight": [64, 64]}, "v_proj"),
    ],
)
def test_family_names(model_type: str, good: dict, bad: dict, fragment: str) -> None:
    layer = {f"model.layers.0.{name}": {"dtype": "BF16", "shape": shape} for name, shape in good.items()}
    check_weight_shapes(layer, sizes(model_type))
    broken = {f"model.layers.0.{name}": {"dtype": "BF16", "shape": shape} for name, shape in bad.items()}
    with pytest.raises(ArchiveError, match=fragment):
        check_weight_shapes(broken, sizes(model_type))


def test_gemma_head_dim_is_not_hidden_over_heads() -> None:
    """Gemma-7B: 16 heads of 256 on a 3072-wide model; q_proj is 4096 × 3072."""
    gemma = sizes("gemma", hidden_size=3072, num_attention_heads=16, num_key_value_heads=16, head_dim=256)
    check_weight_shapes(table(model__layers__0__self_attn__q_proj__weight=[4096, 3072]), gemma)
    with pytest.raises(ArchiveError, match=r"\[4096, 3072\]"):
        check_weight_shapes(table(model__layers__0__self_attn__q_proj__weight=[3072, 3072]), gemma)


def test_integer_tensors_and_other_families_are_left_alone() -> None:
    packed = {"model.layers.0.self_attn.q_proj.weight": {"dtype": "I32", "shape": [8, 64]}}
    check_weight_shapes(packed, sizes("llama"))  # quantized checkpoints pack integers into other shapes
    check_weight_shapes(table(model__layers__0__self_attn__q_proj__weight=[1, 1]), sizes("gpt2"))
