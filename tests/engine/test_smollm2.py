"""The real SmolLM2-135M (a Q4_1 GGUF, dequantized to float32 on load). Slow: minutes on CPU."""

import json
import tarfile

import pytest
import torch

from modelpress.specs import JobSpec
from tests.utils.factories import SHARED_DATA, SMOLLM2_GGUF, smollm2_dir, smollm2_marks, unpack_task, write_cloze_task
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


def test_cloze_task_accuracy_before_and_after(tmp_path, monkeypatch):
    """The cloze task built from WikiText-2 test paragraphs: the real model picks the last word far above the
    25% chance rate; a registry task with the hub off fails only its own entry, with a message that says why."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    task = unpack_task(
        write_cloze_task(
            tmp_path / "cloze.tar", (SHARED_DATA / "wikitext2-test.txt").read_text(), min_words=30, max_documents=100
        ),
        tmp_path / "cloze",
    )
    spec = {
        "model_id": "smollm2",
        "recipe": [{"type": "quantize", "method": "rtn", "weights": {"bits": 4, "group_size": 64}}],
        "calibration": {"dataset_id": "wikitext2-valid", "samples": 4, "seq_len": 256},
        "evaluation": {
            "dataset_id": "wikitext2-test",
            "seq_len": 256,
            "max_windows": 4,
            "tasks": [{"dataset_id": "cloze"}, {"name": "arc_easy", "limit": 10}],
        },
    }
    request = EngineRequest(
        model_path=smollm2_dir() / SMOLLM2_GGUF,
        model_format="gguf",
        spec=JobSpec.model_validate(spec),
        calibration_path=SHARED_DATA / "wikitext2-valid.txt",
        calibration_format="txt",
        evaluation_path=SHARED_DATA / "wikitext2-test.txt",
        evaluation_format="txt",
        output_dir=tmp_path / "out",
        device="cpu",
        datasets={"cloze": (task, "lm-eval")},
    )
    report = run_pipeline(request, lambda event: None)
    cloze, registry = report["quality"]["tasks"]
    assert cloze["task"] == "cloze" and cloze["error"] is None
    base, opt = cloze["baseline"], cloze["optimized"]
    assert base["n"] == opt["n"] == 100
    assert base["accuracy"] > 0.25 + 4 * base["stderr"], base  # chance is 1 in 4
    assert 0.0 <= opt["accuracy"] <= 1.0 and cloze["drop"] == pytest.approx(base["accuracy"] - opt["accuracy"])
    assert registry["task"] == "arc_easy" and registry["baseline"] is None
    assert "hub" in registry["error"] and "upload the task" in registry["error"]
    assert report["quality"]["kl_divergence"]["mean"] > 0
    worst = report["damage"]["worst"]
    assert len(worst) == 5 and all(entry["measure"] == "output (outputs)" for entry in worst)
