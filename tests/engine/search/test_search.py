"""The search end to end on a tiny Llama: the budget-0 and no-candidate cases, a mixed-precision artifact that
transformers alone reloads, and a resumed search that skips what an earlier attempt finished."""

from __future__ import annotations

import dataclasses
import json
import tarfile

import pytest
import torch
from transformers import AutoModelForCausalLM

from modelpress.specs import SearchFormat, SearchMethod, SearchSpec
from worker.engine import EngineRequest, ProgressEvent
from worker.engine.calibrate.targets import select_linears
from worker.engine.calibrate.windows import token_windows
from worker.engine.evaluate import ReferenceWriter, perplexity
from worker.engine.load.checkpoint import load_model
from worker.engine.search import candidates as cand
from worker.engine.search import run_search

SEQ_LEN, WINDOWS = 32, 4


def search_spec(
    budget: dict, formats=("bf16", "int8", "int4_g32"), methods=("rtn",), pruning=(), evaluation_tasks=(), **extra
) -> SearchSpec:
    return SearchSpec.model_validate(
        {
            "model_id": "m",
            "calibration": {"dataset_id": "c", "samples": WINDOWS, "seq_len": SEQ_LEN},
            "evaluation": {
                "dataset_id": "e",
                "seq_len": SEQ_LEN,
                "max_windows": WINDOWS,
                "tasks": list(evaluation_tasks),
            },
            "budget": budget,
            "space": {"formats": list(formats), "methods": list(methods), "pruning": list(pruning)},
            "sensitivity_windows": 2,
            **extra,
        }
    )


def search_request(model_dir, text, out, spec, checkpoint=None) -> EngineRequest:
    return EngineRequest(
        model_path=model_dir,
        model_format="hf",
        spec=spec,
        calibration_path=text,
        calibration_format="txt",
        evaluation_path=text,
        evaluation_format="txt",
        output_dir=out,
        device="cpu",
        checkpoint_dir=checkpoint,
    )


def test_budget_zero_chooses_the_unquantized_model(tiny_model_dir, text_dataset, tmp_path):
    report = run_search(
        search_request(tiny_model_dir, text_dataset, tmp_path / "out", search_spec({"perplexity_increase": 0})),
        lambda event: None,
    )
    assert report["chosen"] == "c1" and len(report["candidates"]) == 1
    chosen = report["candidates"][0]
    assert set(chosen["formats"]) == {SearchFormat.bf16.value}
    assert chosen["measured"]["perplexity"] == pytest.approx(report["baseline"]["perplexity"], rel=1e-6)
    assert chosen["meets_budget"] and chosen["pareto"]
    with tarfile.open(tmp_path / "out" / "model.tar") as tar:
        config = json.loads(tar.extractfile("config.json").read())
    assert "quantization_config" not in config
    assert json.loads((tmp_path / "out" / "report.json").read_text())["chosen"] == "c1"


def test_a_budget_no_candidate_meets_chooses_nothing_and_says_so(tiny_model_dir, text_dataset, tmp_path):
    spec = search_spec({"kl_divergence": 1e-9}, formats=("int4_g32",))
    report = run_search(search_request(tiny_model_dir, text_dataset, tmp_path / "out", spec), lambda event: None)
    assert report["chosen"] is None
    assert report["message"].startswith("no candidate met the budget")
    assert report["candidates"] and not any(c["meets_budget"] for c in report["candidates"])
    assert all(c["measured"]["kl_divergence"]["mean"] > 1e-9 for c in report["candidates"])
    assert not (tmp_path / "out" / "model.tar").exists() and (tmp_path / "out" / "report.json").is_file()


def test_mixed_formats_export_one_group_per_scheme_and_reload_with_transformers(tiny_model_dir, text_dataset, tmp_path):
    loaded = load_model(tiny_model_dir, "hf", torch.device("cpu"))
    windows = token_windows(loaded.tokenizer, text_dataset, "txt", SEQ_LEN, WINDOWS, "evaluation")
    linears = select_linears(loaded.model)
    cycle = [SearchFormat.int8, SearchFormat.int4_g64, SearchFormat.fp8, SearchFormat.bf16, SearchFormat.int4_g32]
    assignment = {name: cycle[i % len(cycle)].value for i, name in enumerate(linears)}
    predicted = cand.predicted_size(loaded.model, linears, assignment)
    writer = ReferenceWriter(tmp_path / "top-k.safetensors")
    baseline = perplexity(loaded.model, windows, torch.device("cpu"), lambda f, m: None, writer)["perplexity"]
    writer.save()

    quantized = cand.build_(
        loaded.model, linears, assignment, SearchMethod.gptq, windows, torch.device("cpu"), lambda f, m: None
    )
    assert set(quantized) == {name for name, fmt in assignment.items() if fmt != "bf16"}
    folder = tmp_path / "artifact"
    config = cand.export_(loaded.model, loaded.tokenizer, quantized, folder, {"test": True})
    schemes = {
        (g["weights"]["num_bits"], g["weights"]["type"], g["weights"]["group_size"]): set(g["targets"])
        for g in config["config_groups"].values()
    }
    assert set(schemes) == {(8, "int", None), (4, "int", 64), (8, "float", None), (4, "int", 32)}
    for (bits, kind, group), targets in schemes.items():
        fmt = "fp8" if kind == "float" else ("int8" if bits == 8 else f"int4_g{group}")
        assert targets == {name for name, f in assignment.items() if f == fmt}

    measured = cand.measure(folder, windows, torch.device("cpu"), tmp_path / "top-k.safetensors", baseline, print)
    assert measured["tensor_bytes"] == predicted  # the size is predicted exactly from the assignment
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # transformers alone
    alone = perplexity(reloaded, windows, torch.device("cpu"), lambda f, m: None)["perplexity"]
    assert alone == pytest.approx(measured["perplexity"], rel=1e-5)
    assert measured["kl_divergence"]["mean"] > 0 and measured["perplexity"] != baseline


class Killed(Exception):
    """Stands for a worker that died: raised from the progress callback once candidate 1 is stored."""


def test_a_resumed_search_skips_the_finished_candidates(tiny_model_dir, text_dataset, tmp_path):
    spec = search_spec({"kl_divergence": 0.002}, methods=("rtn", "gptq"), max_candidates=3)
    checkpoint = tmp_path / "checkpoint"
    stored: list[str] = []

    def die_after_first(event: ProgressEvent) -> None:
        if event.step == "candidate 2" and event.fraction == 0.0:
            raise Killed

    with pytest.raises(Killed):
        run_search(search_request(tiny_model_dir, text_dataset, tmp_path / "a", spec, checkpoint), die_after_first)
    first = json.loads(next((checkpoint / "search" / "candidates").glob("*.json")).read_text())

    events: list[ProgressEvent] = []
    request = search_request(tiny_model_dir, text_dataset, tmp_path / "b", spec, checkpoint)
    request = dataclasses.replace(request, on_checkpoint=lambda path: stored.append(path.name))
    report = run_search(request, events.append)
    messages = [e.message for e in events]
    assert "baseline measured by an earlier attempt" in messages
    assert "sensitivity measured by an earlier attempt" in messages
    assert "candidate 1 finished by an earlier attempt" in messages
    c1 = report["candidates"][0]
    assert c1["key"] == first["key"] and c1["duration_s"] == first["duration_s"]  # read back, not rebuilt
    assert f"{first['key']}.tar" not in stored and len(report["candidates"]) >= 2
    assert {c["method"] for c in report["candidates"][:2]} == {"rtn", "gptq"}  # each method on the first assignment
