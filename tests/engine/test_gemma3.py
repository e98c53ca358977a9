"""The real Gemma-3-270M (a Q4_K_M GGUF that transformers dequantizes to float32 on load). Slow: minutes on CPU."""

import json

import pytest
import torch

from tests.utils.factories import SHARED_DATA, gemma3_gguf, gemma3_marks, run_engine_job

pytestmark = gemma3_marks()


def test_gguf_rtn_int8_job_through_the_pipeline(tmp_path):
    recipe = [{"type": "quantize", "method": "rtn", "weights": {"bits": 8, "group_size": None, "symmetric": True}}]
    evaluation = (SHARED_DATA / "wikitext2-test.txt", {"seq_len": 256, "max_windows": 4})
    torch.manual_seed(0)
    report, artifact = run_engine_job(
        gemma3_gguf(), recipe, tmp_path / "out", model_format="gguf", evaluation=evaluation
    )
    base, opt = report["baseline"], report["optimized"]
    # 73.3 measured on these 4 windows, each <bos> and 255 tokens (290 without the <bos> Gemma is trained to
    # see first); random weights over Gemma's 262k vocabulary would give hundreds of thousands
    assert 20 < base["perplexity"] < 100
    assert opt["perplexity"] == pytest.approx(base["perplexity"], rel=0.02)  # int8 per channel costs little
    (quant,) = report["steps"]
    names = {layer["name"] for layer in quant["layers"]}
    assert len(names) == 18 * 7 and "lm_head" not in names  # 18 layers × q/k/v/o/gate/up/down; the head is tied
    config = json.loads((artifact / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["tie_word_embeddings"]
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert "lm_head" in config["quantization_config"]["ignore"]
