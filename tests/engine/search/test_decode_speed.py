"""The decode_speed objective on a tiny Llama: on a CPU the speed model decides and every candidate says so; with a
decode timing (injected here, as CUDA gives one), the measured figure decides the choice and the front."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from modelpress.specs import SearchMethod
from tests.engine.search.test_search import SEQ_LEN, WINDOWS, search_request, search_spec
from worker.engine.calibrate.targets import select_linears
from worker.engine.calibrate.windows import token_windows
from worker.engine.load.checkpoint import load_model, pick_device
from worker.engine.search import candidates as cand
from worker.engine.search import run_search
from worker.engine.search.pareto import pareto_front
from worker.engine.search.speed import all_measured, measured_decode_speed, speed_prompt
from worker.engine.speed import measure_speed

BUDGET = {"kl_divergence": 0.05}
SPACE = {"formats": ("bf16", "int8", "int4_g32"), "max_candidates": 3}


def test_on_a_cpu_the_speed_model_decides_and_each_candidate_says_so(tiny_model_dir, text_dataset, tmp_path):
    spec = search_spec(BUDGET, objective="decode_speed", **SPACE)
    report = run_search(search_request(tiny_model_dir, text_dataset, tmp_path / "out", spec), lambda event: None)
    assert report["objective"]["speed_source"] == "model" and "not timed" in report["objective"]["method"]
    assert report["baseline"]["decode"] is None
    assert all(c["speed_source"] == "model" and c["measured"]["decode"] is None for c in report["candidates"])
    meeting = [c for c in report["candidates"] if c["meets_budget"]]
    assert meeting, report["message"]
    chosen = next(c for c in report["candidates"] if c["id"] == report["chosen"])
    assert chosen["predicted"]["linear_weight_bytes"] == min(c["predicted"]["linear_weight_bytes"] for c in meeting)


def timed_on_cpu(calls: list):
    """The speed room's harness on the model as it is (eager on a CPU): a real timing, in the shape the search's
    CUDA timing returns."""

    def measure(model, records, prompt):
        calls.append(set(records))
        decode = measure_speed(model, prompt, prompt, 4, repeats=1)["decode"][0]
        return {"tokens_per_s": decode["tokens_per_s"], "ms_per_token": decode["ms_per_step"], "method": "eager"}

    return measure


def test_a_measured_decode_speed_decides_the_choice_and_the_front(tiny_model_dir, text_dataset, tmp_path):
    spec = search_spec(BUDGET, objective="decode_speed", **SPACE)
    calls: list[set] = []
    request = search_request(tiny_model_dir, text_dataset, tmp_path / "out", spec)
    report = run_search(request, lambda event: None, decode_speed=timed_on_cpu(calls))
    candidates = report["candidates"]
    assert len(calls) == 1 + len(candidates) and calls[0] == set()  # the baseline, then each built candidate
    for c, quantized in zip(candidates, calls[1:], strict=True):
        assert c["speed_source"] == "measured" and c["measured"]["decode"]["tokens_per_s"] > 0
        assert quantized == {name for name, fmt in c["assignment"].items() if fmt != "bf16"}
    assert report["baseline"]["decode"]["tokens_per_s"] > 0
    assert report["objective"]["speed_source"] == "measured" and "decode measured" in report["objective"]["method"]
    meeting = [c for c in candidates if c["meets_budget"]]
    chosen = next(c for c in candidates if c["id"] == report["chosen"])
    assert chosen["measured"]["decode"]["ms_per_token"] == min(c["measured"]["decode"]["ms_per_token"] for c in meeting)
    points = [(c["measured"]["decode"]["ms_per_token"], c["measured"]["kl_divergence"]["mean"]) for c in candidates]
    assert [c["pareto"] for c in candidates] == pareto_front(points)


def test_the_size_objective_times_nothing(tiny_model_dir, text_dataset, tmp_path):
    calls: list[set] = []
    spec = search_spec(BUDGET, **SPACE)
    request = search_request(tiny_model_dir, text_dataset, tmp_path / "out", spec)
    report = run_search(request, lambda event: None, decode_speed=timed_on_cpu(calls))
    assert not calls and all(c["speed_source"] == "model" for c in report["candidates"])


@pytest.mark.parametrize(
    ("sources", "expected"),
    [(["measured", "measured"], True), (["measured", "model"], False), ([], False)],
)
def test_a_choice_never_mixes_measured_and_modelled_speeds(sources, expected):
    assert all_measured([{"speed_source": s} for s in sources]) is expected


def _is_timing(decode: dict | None) -> bool:
    """A real decode timing at batch 1: positive, its two figures agreeing, on the bfloat16 serving copy."""
    return (
        decode is not None
        and decode["tokens_per_s"] > 0
        and decode["ms_per_token"] > 0
        and decode["tokens_per_s"] == pytest.approx(1000.0 / decode["ms_per_token"])
        and decode["dtype"] == "bfloat16"
        and decode["method"].startswith("cuda")
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_on_cuda_the_decode_is_timed_on_the_serving_kernels(tiny_model_dir, text_dataset):
    """The search's CUDA timing of a quantized model: a real figure, some Linears on low-bit kernels, the model
    itself unchanged (the candidate is exported after it is timed); off CUDA nothing is timed."""
    cuda = pick_device("cuda")
    loaded = load_model(tiny_model_dir, "hf", cuda)
    windows = token_windows(loaded.tokenizer, text_dataset, "txt", SEQ_LEN, WINDOWS, "evaluation")
    linears = select_linears(loaded.model)
    assignment = {name: ("int8", "int4_g32")[i % 2] for i, name in enumerate(linears)}
    quantized = cand.build_(loaded.model, linears, assignment, SearchMethod.rtn, windows, cuda, lambda f, m: None)
    before = {name: tensor.clone() for name, tensor in loaded.model.state_dict().items()}
    prompt = speed_prompt(loaded.model, windows, cuda)
    assert prompt.device == cuda and prompt.shape == (1, SEQ_LEN)
    decode = measured_decode_speed(loaded.model, quantized, prompt)
    assert _is_timing(decode), decode
    assert any(not k.startswith(("unchanged", "fused")) for k in decode["kernels"]), decode["kernels"]
    after = loaded.model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert _is_timing(measured_decode_speed(loaded.model, {}, prompt))  # the baseline: no quantized Linear
    assert measured_decode_speed(loaded.model, quantized, prompt.cpu()) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_on_cuda_a_search_is_chosen_by_its_measured_decode_speed(tiny_model_dir, text_dataset, tmp_path):
    """A decode_speed search on CUDA with the default timing: the baseline and every candidate carry a measured
    decode speed, and the chosen candidate decodes fastest among those that meet the budget (tight enough that
    several mixes of int8 and int4 are built)."""
    spec = search_spec({"kl_divergence": 2e-5}, objective="decode_speed", **SPACE)
    request = search_request(tiny_model_dir, text_dataset, tmp_path / "out", spec)
    report = run_search(dataclasses.replace(request, device="cuda"), lambda event: None)
    assert not report["device"].startswith("cpu")
    candidates = report["candidates"]
    assert candidates and _is_timing(report["baseline"]["decode"])
    for c in candidates:
        assert c["speed_source"] == "measured" and _is_timing(c["measured"]["decode"]), c["measured"]["decode"]
    assert report["objective"]["speed_source"] == "measured" and "decode measured" in report["objective"]["method"]
    meeting = [c for c in candidates if c["meets_budget"]]
    assert meeting, report["message"]
    chosen = next(c for c in candidates if c["id"] == report["chosen"])
    assert chosen["measured"]["decode"]["ms_per_token"] == min(c["measured"]["decode"]["ms_per_token"] for c in meeting)
    assert "tokens/s" in report["message"]
