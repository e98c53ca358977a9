"""The real Gemma-3-270M (a Q4_K_M GGUF that transformers dequantizes to float32 on load). Slow: minutes on CPU."""

import json
import tarfile

import pytest
import torch

from modelpress.specs import JobSpec
from tests.utils.factories import SHARED_DATA, gemma3_gguf, gemma3_marks
from worker.engine import EngineRequest, run_pipeline

pytestmark = gemma3_marks()


def test_gguf_rtn_int8_job_through_the_pipeline(tmp_path):
    spec = {
        "model_id": "gemma3",
        "recipe": [
            {"type": "quantize", "method": "rtn", "weights": {"bits": 8, "group_size": None, "symmetric": True}}
        ],
        "calibration": None,
        "evaluation": {"dataset_id": "wikitext2-test", "seq_len": 256, "max_windows": 4},
    }
    request = EngineRequest(
        model_path=gemma3_gguf(),
        model_format="gguf",
        spec=JobSpec.model_validate(spec),
        calibration_path=None,
        calibration_format=None,
        evaluation_path=SHARED_DATA / "wikitext2-test.txt",
        evaluation_format="txt",
        output_dir=tmp_path / "out",
        device="cpu",
    )
    torch.manual_seed(0)
    report = run_pipeline(request, lambda event: None)
    base, opt = report["baseline"], report["optimized"]
    # 290 measured on these 4 windows: the Q4_K_M 270M model, windows cut without a leading <bos>; random weights
    # over Gemma's 262k vocabulary would give hundreds of thousands
    assert 5 < base["perplexity"] < 1000
    assert opt["perplexity"] == pytest.approx(base["perplexity"], rel=0.02)  # int8 per channel costs little
    (quant,) = report["steps"]
    names = {layer["name"] for layer in quant["layers"]}
    assert len(names) == 18 * 7 and "lm_head" not in names  # 18 layers × q/k/v/o/gate/up/down; the head is tied
    with tarfile.open(tmp_path / "out" / "model.tar") as tar:
        config = json.loads(tar.extractfile("config.json").read())
    assert config["model_type"] == "gemma3_text" and config["tie_word_embeddings"]
    assert config["quantization_config"]["format"] == "pack-quantized"
