"""Models larger than the GPU: the execution plan, and a job run onloaded (the model in host memory, one decoder
layer at a time on the device) measures and writes what the same job run whole does. On the CPU a "small
device" is posed through `device_memory_bytes`, which forces the onloaded mode."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from modelpress.specs import JobSpec
from tests.utils.factories import build_sharded_model, build_tiny_model, build_tiny_model_of, tiny_llama
from worker.engine import EngineError, EngineRequest, run_pipeline
from worker.engine.evaluate.evaluation import perplexity
from worker.engine.execution import ONLOADED, WHOLE, job_working_bytes, plan_execution
from worker.engine.export import sharded
from worker.engine.export.sharded import INDEX_NAME, write_layerwise_

GIB = 2**30
CPU = torch.device("cpu")
GPTQ = {"type": "quantize", "method": "gptq", "weights": {"bits": 4, "group_size": 32, "symmetric": True}}
WANDA = {"type": "prune", "method": "wanda", "sparsity": 0.5}


def job(model_dir: Path, out: Path, text: Path, recipe: list[dict], **overrides) -> EngineRequest:
    spec = JobSpec.model_validate(
        {
            "model_id": "m1",
            "recipe": recipe,
            "calibration": {"dataset_id": "c1", "samples": 4, "seq_len": 32},
            "evaluation": {"dataset_id": "e1", "seq_len": 32, "max_windows": 4},
        }
    )
    fields = {
        "model_path": model_dir,
        "model_format": "hf",
        "spec": spec,
        "calibration_path": text,
        "calibration_format": "txt",
        "evaluation_path": text,
        "evaluation_format": "txt",
        "output_dir": out,
        "device": "cpu",
    }
    return EngineRequest(**{**fields, **overrides})


def artifact_tensors(out: Path, into: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with tarfile.open(out / "model.tar") as tar:
        tar.extractall(into, filter="data")
    tensors = {}
    for path in sorted(into.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as stored:
            tensors.update({name: stored.get_tensor(name) for name in stored.keys()})  # noqa: SIM118
    return tensors, json.loads((into / "config.json").read_text())


# --- the plan -------------------------------------------------------------------------------------------------


def test_plan_runs_whole_when_the_model_and_its_work_fit_and_onloaded_otherwise():
    cuda = torch.device("cuda")
    assert plan_execution(10 * GIB, 2 * GIB, 13 * GIB, cuda).mode == WHOLE
    tight = plan_execution(10 * GIB, 2 * GIB, 11 * GIB, cuda)
    assert tight.mode == ONLOADED and "do not fit" in tight.reason and tight.to_dict()["device_free_bytes"] == 11 * GIB
    assert plan_execution(10**12, 10**12, None, CPU).mode == WHOLE  # no limit known: host and device are one


def test_work_estimate_grows_with_the_calibration_windows():
    config = tiny_llama().config
    few = job_working_bytes(config, 2, (4, 128), None)
    many = job_working_bytes(config, 2, (128, 2048), None)
    assert many - few >= (128 * 2048 - 4 * 128) * config.hidden_size * 2


# --- whole and onloaded run the same job ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory) -> Path:
    return build_sharded_model(tmp_path_factory.mktemp("bf16") / "model", max_shard_size="200KB")


def test_onloaded_job_measures_and_writes_what_the_whole_job_does(bf16_model, text_dataset, tmp_path):
    recipe = [WANDA, GPTQ]  # a calibrated pruner, then the quantizer that keeps its zeros
    whole = run_pipeline(job(bf16_model, tmp_path / "whole", text_dataset, recipe), lambda _e: None)
    onloaded = run_pipeline(
        job(bf16_model, tmp_path / "onloaded", text_dataset, recipe, device_memory_bytes=1), lambda _e: None
    )
    assert whole["execution"]["mode"] == WHOLE and onloaded["execution"]["mode"] == ONLOADED
    assert onloaded["execution"]["peak_host_bytes"] > 0
    for side in ("baseline", "optimized"):
        assert onloaded[side]["perplexity"] == whole[side]["perplexity"]
    assert onloaded["quality"]["kl_divergence"] == whole["quality"]["kl_divergence"]
    assert onloaded["baseline"]["prefill_ms"] is None and onloaded["samples"] == []
    assert any("execution onloaded" in note for note in onloaded["notes"])
    mine, config = artifact_tensors(tmp_path / "onloaded", tmp_path / "a")
    theirs, _ = artifact_tensors(tmp_path / "whole", tmp_path / "b")
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[name], theirs[name]) for name in mine)
    assert config["dtype"] == "bfloat16"  # bf16 in, bf16 out
    assert mine["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_a_distill_step_that_cannot_fit_is_refused_before_any_work(bf16_model, text_dataset, tmp_path):
    recipe = [{"type": "distill", "method": "kd", "dataset_id": "c1", "steps": 1, "seq_len": 16, "batch_size": 1}]
    request = job(bf16_model, tmp_path / "out", text_dataset, recipe, device_memory_bytes=1)
    with pytest.raises(EngineError) as error:
        run_pipeline(request, lambda _e: None)
    assert error.value.code == "model_too_large" and "distill:kd" in error.value.message
    assert not (tmp_path / "out" / "model.tar").exists()


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])  # gemma3: a sliding-window layer, then a global one
def test_layer_by_layer_perplexity_is_the_whole_models(tmp_path, model_type):
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model_of(tmp_path / "m", model_type)).eval()
    windows = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    whole = perplexity(model, windows, CPU, lambda _f, _m: None)
    onloaded = perplexity(model, windows, CPU, lambda _f, _m: None, onloaded=True)
    assert onloaded == whole


# --- the layer-by-layer writer --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layerwise_shards_carry_transformers_names_and_reload(tmp_path, dtype):
    model = tiny_llama(layers=4).to(dtype)
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    names = write_layerwise_(model, tmp_path, CPU, max_shard_bytes=100_000)
    count = len(names)
    assert count > 2 and names == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(names)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto", local_files_only=True)
    assert reloaded.dtype == dtype
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_layerwise_export_holds_about_one_shard_beside_the_model(tmp_path, monkeypatch):
    """Tensor byte accounting: what the writer hands to safetensors at once (its only copies) stays near one
    shard, not the model."""
    model = tiny_llama(hidden=256, layers=8).to(torch.bfloat16)  # about 10 MB
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    written: list[int] = []
    save = sharded.save_file

    def counting_save(tensors, path, metadata=None):
        written.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        save(tensors, path, metadata=metadata)

    monkeypatch.setattr(sharded, "save_file", counting_save)
    shard = model_bytes // 10
    write_layerwise_(model, tmp_path, CPU, max_shard_bytes=shard)
    largest_tensor = max(t.numel() * t.element_size() for t in model.state_dict().values())
    assert sum(written) == model_bytes
    assert max(written) <= max(shard, largest_tensor) < 0.3 * model_bytes


def test_a_float32_checkpoint_loads_in_float32_and_a_bf16_one_in_bf16(tmp_path):
    from worker.engine.load.checkpoint import load_model

    full = load_model(build_tiny_model(tmp_path / "f32"), "hf", CPU).model
    half = load_model(build_sharded_model(tmp_path / "bf16"), "hf", CPU).model
    assert full.dtype == torch.float32 and half.dtype == torch.bfloat16
