"""The real SmolLM2-135M (a Q4_1 GGUF, dequantized to float32 on load). Slow: minutes on CPU."""

import json
import tarfile

import pytest
import torch

from modelpress.specs import JobSpec
from tests.utils.factories import SHARED_DATA, SMOLLM2_GGUF, smollm2_dir, smollm2_marks
from worker.engine import EngineRequest, run_pipeline
from worker.engine.load.checkpoint import load_model

pytestmark = smollm2_marks()


def test_gguf_loads_with_tied_embeddings_and_tokenizer():
    loaded = load_model(smollm2_dir() / SMOLLM2_GGUF, "gguf", torch.device("cpu"))
    model = loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model.config, "quantization_config", None) is None  # saved later as a plain float checkpoint
    assert model.dtype == torch.float32 and sum(p.numel() for p in model.parameters()) > 130e6
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, ids.shape[1] :])


def test_prune_and_int8_pipeline(tmp_path):
    spec = {
        "model_id": "smollm2",
        "recipe": [
            {"type": "prune", "method": "magnitude", "sparsity": 0.5},
            {"type": "quantize", "method": "rtn", "weights": {"bits": 8, "group_size": None, "symmetric": True}},
        ],
        "calibration": None,
        "evaluation": {"dataset_id": "wikitext2-test", "seq_len": 256, "max_windows": 8},
    }
    request = EngineRequest(
        model_path=smollm2_dir() / SMOLLM2_GGUF,
        model_format="gguf",
        spec=JobSpec.model_validate(spec),
        calibration_path=None,
        calibration_format=None,
        evaluation_path=SHARED_DATA / "wikitext2-test.txt",
        evaluation_format="txt",
        output_dir=tmp_path / "out",
        device="cpu",
    )
    report = run_pipeline(request, lambda event: None)
    base, opt = report["baseline"], report["optimized"]
    assert 5 < base["perplexity"] < 60
    assert base["perplexity"] < opt["perplexity"] < 30 * base["perplexity"]  # 50% unstructured hurts a 135M model
    prune, quant = report["steps"]
    assert prune["summary"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert quant["summary"]["targeted_weight_bytes_after"] < 0.35 * quant["summary"]["targeted_weight_bytes_before"]
    assert opt["size_bytes"] < 0.6 * base["size_bytes"]  # tied float embeddings stay: about a fifth of the model
    with tarfile.open(tmp_path / "out" / "model.tar") as tar:
        config = json.loads(tar.extractfile("config.json").read())
    assert config["quantization_config"]["format"] == "pack-quantized" and config["tie_word_embeddings"]
