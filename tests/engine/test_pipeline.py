import hashlib
import json
import math
import shutil
import tarfile
from typing import Literal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelpress.specs import JobSpec, StepType, TargetedStep
from worker.engine import EngineError, EngineRequest, ProgressEvent, registered_steps, run_pipeline
from worker.engine.execution import PARAMETERS_PER_THREAD, cpu_threads_for

SEQ_LEN, WINDOWS = 64, 8
RECIPE = [
    {
        "type": "prune",
        "method": "magnitude",
        "sparsity": 0.5,
        "scope": "row",
        "targets": ["Linear"],
        "ignore": ["lm_head"],
    },
    {"type": "quantize", "method": "rtn", "weights": {"bits": 8, "group_size": None, "symmetric": True}},
]
METRIC_KEYS = {
    "parameters",
    "nonzero_parameters",
    "size_bytes",
    "size_method",
    "perplexity",
    "evaluation_tokens",
    "prefill_ms",
    "prefill_tokens",
    "decode_ms_per_token",
    "decode_tokens",
    "peak_memory",
    "device",
}


def spec(recipe=RECIPE, evaluation=True):
    """The job as the API stores it and the manifest records it: the validated spec's JSON."""
    data = {
        "model_id": "m1",
        "recipe": recipe,
        "calibration": None,
        "evaluation": {"dataset_id": "d1", "seq_len": SEQ_LEN, "max_windows": WINDOWS} if evaluation else None,
    }
    return JobSpec.model_validate(data).model_dump(mode="json")


def request(model_dir, out, text_dataset, **overrides):
    fields = {
        "model_path": model_dir,
        "model_format": "hf",
        "spec": JobSpec.model_validate(spec()),
        "calibration_path": None,
        "calibration_format": None,
        "evaluation_path": text_dataset,
        "evaluation_format": "txt",
        "output_dir": out,
        "device": "cpu",
    }
    fields.update(overrides)
    if isinstance(fields["spec"], dict):
        fields["spec"] = JobSpec.model_validate(fields["spec"])
    return EngineRequest(**fields)


@pytest.fixture(scope="module")
def job(tiny_model_dir, text_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    events: list[ProgressEvent] = []
    report = run_pipeline(request(tiny_model_dir, out, text_dataset), events.append)
    return report, events, out


def test_registry_lists_the_spec_keys():
    from modelpress.specs import STEP_SPECS

    steps = set(registered_steps())
    assert steps <= set(STEP_SPECS)
    assert {"prune:magnitude", "prune:wanda", "prune:sparsegpt", "prune:structured", "prune:depth"} <= steps
    assert {"distill:kd", "quantize:rtn"} <= steps


def test_report_shape(job):
    report, _, out = job
    assert set(report) == {
        "baseline",
        "optimized",
        "steps",
        "samples",
        "environment",
        "ratios",
        "quality",
        "damage",
        "evaluation",
        "calibration",
        "notes",
        "speed",
        "execution",
    }
    execution = report["execution"]
    assert execution["mode"] == "whole" and execution["device"] == "cpu" and execution["peak_gpu_bytes"] is None
    assert execution["cpu_threads"] == 1 and report["baseline"]["device"] == "cpu (1 threads)"
    assert execution["peak_host_bytes"] > execution["model_bytes"] > 0
    speed = report["speed"]
    assert speed["path"].startswith("cpu: eager") and "no low-bit kernel" in speed["path"]
    for side in ("baseline", "optimized"):
        (decode,) = speed[side]["decode"]
        assert decode["batch"] == 1 and decode["tokens_per_s"] > 0 and decode["compiled"] is False
        assert speed[side]["prefill"]["tokens_per_s"] > 0 and "static KV cache" in speed[side]["method"]
    assert set(report["baseline"]) == set(report["optimized"]) == METRIC_KEYS
    assert json.loads((out / "report.json").read_text()) == report
    assert [s["type"] + ":" + s["method"] for s in report["steps"]] == ["prune:magnitude", "quantize:rtn"]
    prune, quant = report["steps"]
    assert prune["summary"]["sparsity"] == 0.5 and all(layer["sparsity"] == 0.5 for layer in prune["layers"])
    assert quant["summary"]["targeted_weight_bytes_after"] < 0.35 * quant["summary"]["targeted_weight_bytes_before"]
    assert all(layer["relative_error"] < 1e-2 for layer in quant["layers"])
    assert all(step["duration_s"] >= 0 for step in report["steps"])
    base, opt = report["baseline"], report["optimized"]
    assert base["parameters"] == opt["parameters"]
    assert opt["nonzero_parameters"] < base["nonzero_parameters"]
    assert opt["size_bytes"] < base["size_bytes"]
    assert report["ratios"]["size"] == pytest.approx(opt["size_bytes"] / base["size_bytes"])
    assert report["ratios"]["perplexity"] == pytest.approx(opt["perplexity"] / base["perplexity"])
    assert report["evaluation"] == {"seq_len": SEQ_LEN, "windows": WINDOWS, "max_windows": WINDOWS}
    assert len(report["samples"]) == 3 and all(
        s["baseline"] is not None and s["optimized"] is not None for s in report["samples"]
    )
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["compressed_tensors"]
    assert sorted(p.name for p in out.iterdir()) == ["model.tar", "report.json"]  # the scratch top-k file is gone


def test_report_gives_the_kl_divergence_to_the_baseline_over_the_perplexity_positions(job):
    report, _, _ = job
    kl = report["quality"]["kl_divergence"]
    assert kl["positions"] == report["optimized"]["evaluation_tokens"] == WINDOWS * (SEQ_LEN - 1)
    assert 0 < kl["median"] <= kl["p99"] and 0 < kl["mean"]
    assert 0 < kl["top1_agreement"] < 1  # 50% magnitude pruning moves some greedy choices, not all
    assert kl["top_k"] == 64 and not kl["exact"] and "top-64" in kl["method"]


def test_report_names_the_worst_layers_of_every_step(job):
    report, _, _ = job
    damage = report["damage"]
    assert [entry["key"] for entry in damage["steps"]] == ["prune:magnitude", "quantize:rtn"]
    assert all(entry["measure"] == "weight" for entry in damage["steps"])  # no calibration in this job
    errors = sorted((layer["relative_error"] for step in report["steps"] for layer in step["layers"]), reverse=True)
    assert [entry["error"] for entry in damage["worst"]] == errors[:5]
    assert {entry["key"] for entry in damage["worst"]} == {"prune:magnitude"}  # pruning half the weights hurts more
    assert damage["not_measured"] == []


def test_cpu_report_of_a_quantized_model_prints_no_speedup_and_says_why(job):
    report, _, _ = job
    ratios = report["ratios"]
    assert ratios["decode_speedup"] is None and ratios["prefill_speedup"] is None
    assert "decompressed to float" in ratios["speed_note"] and "CUDA" in ratios["speed_note"]
    assert ratios["size"] is not None  # what the CPU can compare stays
    assert report["baseline"]["decode_ms_per_token"] > 0 and report["optimized"]["decode_ms_per_token"] > 0


def test_progress_is_monotone_and_names_the_stages(job):
    _, events, _ = job
    assert [(e.step_index, e.fraction) for e in events] == sorted((e.step_index, e.fraction) for e in events)
    stages = list(dict.fromkeys(e.step for e in events))
    assert stages == ["load", "evaluate baseline", "prune:magnitude", "quantize:rtn", "export", "evaluate optimized"]
    assert all(e.total_steps == 6 and 0.0 <= e.fraction <= 1.0 for e in events)
    assert sum(e.message.startswith("perplexity window") for e in events) == 2 * WINDOWS


def test_artifact_is_a_plain_hf_folder_whose_perplexity_matches(job, text_dataset, tmp_path):
    report, _, out = job
    with tarfile.open(out / "model.tar") as tar:
        assert all("/" not in name for name in tar.getnames())
        tar.extractall(tmp_path, filter="data")
    manifest = json.loads((tmp_path / "modelpress_manifest.json").read_text())
    assert manifest["job"] == spec() and manifest["libraries"]["transformers"]
    assert set(manifest["sparsity"]["layers"].values()) == {0.5}
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == entry["sha256"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])

    model = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    ids = torch.tensor(tokenizer(text_dataset.read_text(), add_special_tokens=False)["input_ids"])
    windows = ids[: SEQ_LEN * WINDOWS].reshape(WINDOWS, SEQ_LEN)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    measured = math.exp(float(torch.stack(losses).mean()))
    assert measured == pytest.approx(report["optimized"]["perplexity"], rel=0.01)


def test_a_raising_callback_stops_the_pipeline(tiny_model_dir, text_dataset, tmp_path):
    class Cancelled(Exception):
        pass

    seen = []

    def progress(event):
        seen.append(event.step)
        if event.step == "prune:magnitude":
            raise Cancelled

    with pytest.raises(Cancelled):
        run_pipeline(request(tiny_model_dir, tmp_path, text_dataset), progress)
    assert "export" not in seen and not (tmp_path / "model.tar").exists()


def test_without_evaluation_dataset_perplexity_is_null(tiny_model_dir, tmp_path):
    recipe = [{"type": "prune", "method": "magnitude", "sparsity": 0.25}]
    report = run_pipeline(
        request(tiny_model_dir, tmp_path, None, spec=spec(recipe, evaluation=False), evaluation_format=None),
        lambda event: None,
    )
    assert report["baseline"]["perplexity"] is None and report["optimized"]["perplexity"] is None
    assert report["ratios"]["perplexity"] is None and report["evaluation"] is None
    assert any("no evaluation dataset" in note for note in report["notes"])
    assert report["quality"]["kl_divergence"] is None and "no evaluation dataset" in report["quality"]["note"]
    assert any("KL divergence" in note for note in report["notes"])
    with tarfile.open(tmp_path / "model.tar") as tar:
        config = json.loads(tar.extractfile("config.json").read())
    assert "quantization_config" not in config  # pruned only: a dense float checkpoint


def test_evaluation_without_tokenizer_is_a_clear_error(tiny_model_dir, text_dataset, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    with pytest.raises(EngineError) as info:
        run_pipeline(request(bare, tmp_path / "out", text_dataset), lambda event: None)
    assert info.value.code == "no_tokenizer"


def test_unknown_step_fails_before_any_work(tiny_model_dir, text_dataset, tmp_path):
    events = []

    class NoSuchPrune(TargetedStep):  # a step the specs could name but this engine has no code for
        type: Literal[StepType.prune] = StepType.prune
        method: Literal["no-such-method"] = "no-such-method"
        sparsity: float = 0.5

    bad = JobSpec.model_construct(model_id="m1", recipe=[NoSuchPrune()], calibration=None, evaluation=None)
    with pytest.raises(EngineError) as info:
        run_pipeline(request(tiny_model_dir, tmp_path, text_dataset, spec=bad), events.append)
    assert info.value.code == "unknown_step" and events == []


def test_a_job_sizes_its_cpu_threads_to_the_model_and_gives_the_setting_back(tiny_model_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []
        job = {"model_id": "m", "recipe": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}]}
        report = run_pipeline(
            request(tiny_model_dir, tmp_path, None, spec=job, evaluation_path=None, evaluation_format=None),
            lambda event: seen.append(torch.get_num_threads()),
        )
        assert report["execution"]["cpu_threads"] == 1
        assert seen[0] == 2 and set(seen[seen.index(1) :]) == {1}  # loading as set, then one thread for the rest
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_cpu_threads_grow_with_the_model_up_to_what_the_process_has():
    assert cpu_threads_for(50_000, 8) == 1
    assert cpu_threads_for(3 * PARAMETERS_PER_THREAD, 8) == 3
    assert cpu_threads_for(135_000_000, 8) == 8
    assert cpu_threads_for(135_000_000, 1) == 1
