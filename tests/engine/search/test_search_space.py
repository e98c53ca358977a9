"""The search's space beyond rounding: AWQ as a method (scales searched per layer format, bf16 layers left alone)
and pruning options as families of candidates whose zeros survive in the artifact transformers reloads."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
from transformers import AutoModelForCausalLM

from modelpress.specs import SearchFormat, SearchMethod, SearchSpec
from tests.engine.search.test_search import SEQ_LEN, WINDOWS, search_request, search_spec
from worker.engine.calibrate.targets import select_linears
from worker.engine.calibrate.windows import token_windows
from worker.engine.evaluate import ReferenceWriter, perplexity
from worker.engine.load.checkpoint import load_model
from worker.engine.search import candidates as cand
from worker.engine.search import run_search

CPU = torch.device("cpu")


def built(model_dir, windows, method: SearchMethod, assignment: dict[str, str]):
    loaded = load_model(model_dir, "hf", CPU)
    linears = select_linears(loaded.model)
    quantized = cand.build_(loaded.model, linears, assignment, method, windows, CPU, lambda f, m: None)
    return loaded, linears, quantized


def test_an_awq_candidate_leaves_bf16_layers_alone_and_reloads_with_transformers(
    tiny_model_dir, text_dataset, tmp_path
):
    original = load_model(tiny_model_dir, "hf", CPU)
    windows = token_windows(original.tokenizer, text_dataset, "txt", SEQ_LEN, WINDOWS, "evaluation")
    names = list(select_linears(original.model))
    # layer 0 all int (every fold applies, mixed int formats in one fold: q int4_g32, k int8, v int4_g32 …);
    # layer 1 has bf16 and fp8 layers beside int ones
    cycle = [SearchFormat.int4_g32, SearchFormat.int8, SearchFormat.int4_g32, SearchFormat.int4_g32]
    assignment = {name: cycle[i % len(cycle)].value for i, name in enumerate(names) if ".layers.0." in name}
    layer1 = [name for name in names if ".layers.1." in name]
    one = [SearchFormat.bf16, SearchFormat.int4_g32, SearchFormat.fp8, SearchFormat.int8]
    assignment |= {name: one[i % len(one)].value for i, name in enumerate(layer1)}
    writer = ReferenceWriter(tmp_path / "top-k.safetensors")
    baseline = perplexity(original.model, windows, CPU, lambda f, m: None, writer)["perplexity"]
    writer.save()

    loaded, linears, quantized = built(tiny_model_dir, windows, SearchMethod.awq, assignment)
    _, rtn_linears, _ = built(tiny_model_dir, windows, SearchMethod.rtn, assignment)
    before = dict(original.model.named_modules())
    for name, fmt in assignment.items():
        if fmt == SearchFormat.bf16:  # untouched, bit for bit: no fold made through it
            assert torch.equal(linears[name].weight, before[name].weight), name
        elif ".layers.0." in name:  # AWQ's scales and clipping give other weights than rounding to nearest
            assert not torch.equal(linears[name].weight, rtn_linears[name].weight), name
    down = next(name for name in layer1 if name.endswith("down_proj"))  # fp8, its producer up_proj int4
    assert assignment[down] == "fp8" and assignment[down.replace("down", "up")] == "int4_g32"
    # a fold with no int consumer is not made: the fp8 layer is rounded to nearest from its own weights
    assert torch.equal(linears[down].weight, rtn_linears[down].weight)
    assert set(quantized) == {name for name, fmt in assignment.items() if fmt != "bf16"}

    folder = tmp_path / "artifact"
    config = cand.export_(loaded.model, loaded.tokenizer, quantized, folder, {"test": True})
    schemes = {
        (g["weights"]["num_bits"], g["weights"]["type"], g["weights"]["group_size"])
        for g in config["config_groups"].values()
    }
    assert schemes == {(8, "int", None), (4, "int", 32), (8, "float", None)}  # one config group per scheme
    measured = cand.measure(folder, windows, CPU, tmp_path / "top-k.safetensors", baseline, lambda f, m: None)
    assert measured["tensor_bytes"] == cand.predicted_size(original.model, select_linears(original.model), assignment)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # transformers alone
    alone = perplexity(reloaded, windows, CPU, lambda f, m: None)["perplexity"]
    assert alone == pytest.approx(measured["perplexity"], rel=1e-5)
    assert measured["kl_divergence"]["mean"] > 0


def test_awq_is_tried_on_the_first_assignment_beside_rtn(tiny_model_dir, text_dataset, tmp_path):
    spec = search_spec({"kl_divergence": 0.05}, methods=("rtn", "awq"), max_candidates=3)
    report = run_search(search_request(tiny_model_dir, text_dataset, tmp_path / "out", spec), lambda event: None)
    first, second = report["candidates"][:2]
    assert (first["method"], second["method"]) == ("rtn", "awq") and first["assignment"] == second["assignment"]
    assert first["measured"]["perplexity"] != second["measured"]["perplexity"]
    best = min((first, second), key=lambda c: c["measured"]["kl_divergence"]["mean"])
    assert all(c["method"] == best["method"] for c in report["candidates"][2:])  # the best one builds the rest
    assert report["families"] == [{"pruning": None, "candidates": len(report["candidates"])}]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["families"] == report["families"]


def unpack_candidate(checkpoint, key: str, folder):
    with tarfile.open(checkpoint / "search" / "candidates" / f"{key}.tar") as tar:
        tar.extractall(folder, filter="data")
    return folder


def test_a_pruning_option_is_a_family_whose_zeros_survive_the_reload(tiny_model_dir, text_dataset, tmp_path):
    spec = search_spec(
        {"perplexity_increase": 0.5},
        formats=("bf16", "int8", "int4_g32"),
        methods=("rtn",),
        max_candidates=2,
        pruning=[{"method": "magnitude", "pattern": "2:4"}],
    )
    checkpoint = tmp_path / "checkpoint"
    events = []
    request = search_request(tiny_model_dir, text_dataset, tmp_path / "out", spec, checkpoint)
    report = run_search(request, events.append)
    assert "prune 1" in {e.step for e in events} and "prune 1 candidate 1" in {e.step for e in events}
    unpruned = [c for c in report["candidates"] if c["pruning"] is None]
    pruned = [c for c in report["candidates"] if c["pruning"] is not None]
    assert unpruned and pruned and report["families"][1]["label"] == "magnitude 2:4"
    assert pruned[0]["pruning"] == {"method": "magnitude", "sparsity": None, "pattern": "2:4"}
    assert {c["key"] for c in pruned}.isdisjoint({c["key"] for c in unpruned})

    candidate = pruned[0]
    assert candidate["measured"]["sparsity"] >= 0.5  # measured on the weights transformers reloaded
    folder = unpack_candidate(checkpoint, candidate["key"], tmp_path / "pruned")
    manifest = json.loads((folder / "modelpress_manifest.json").read_text())
    assert manifest["candidate"]["pruning"]["pattern"] == "2:4"
    assert all(share >= 0.5 for share in manifest["sparsity"]["layers"].values())
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    windows = token_windows(load_model(folder, "hf", CPU).tokenizer, text_dataset, "txt", SEQ_LEN, WINDOWS, "e")
    alone = perplexity(reloaded, windows, CPU, lambda f, m: None)["perplexity"]  # decompresses the weights
    assert alone == pytest.approx(candidate["measured"]["perplexity"], rel=1e-5)
    modules = dict(reloaded.named_modules())
    for name in select_linears(load_model(tiny_model_dir, "hf", CPU).model):
        weight = modules[name].weight
        zeros_per_four = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1)
        assert bool((zeros_per_four >= 2).all()), name  # 2:4 kept through quantization, export and reload
    # stored dense: the artifact takes the bytes of the same assignment unpruned, as predicted
    assert candidate["measured"]["tensor_bytes"] == candidate["predicted"]["size_bytes"]
    assert report["chosen"] is None or report["chosen"] in {c["id"] for c in report["candidates"]}


def test_a_calibrated_pruning_family_meets_a_loose_budget_and_is_chosen_only_if_cheaper(
    tiny_model_dir, text_dataset, tmp_path
):
    spec = search_spec(
        {"kl_divergence": 5.0},
        formats=("bf16", "int8"),
        methods=("rtn",),
        max_candidates=1,
        pruning=[{"method": "wanda", "sparsity": 0.25}],
    )
    report = run_search(search_request(tiny_model_dir, text_dataset, tmp_path / "out", spec), lambda event: None)
    unpruned, pruned = report["candidates"]
    assert pruned["pruning"]["method"] == "wanda" and 0.25 <= pruned["measured"]["sparsity"] < 0.5
    assert unpruned["assignment"] == pruned["assignment"]  # all int8 under so loose a budget, in both families
    assert unpruned["measured"]["size_bytes"] == pruned["measured"]["size_bytes"]  # sparse weights stored dense
    assert report["chosen"] == unpruned["id"]  # same bytes, less damage


@pytest.mark.parametrize(
    ("pruning", "fragment"),
    [
        ({"method": "wanda"}, "give `sparsity`"),
        ({"method": "wanda", "sparsity": 0.3, "pattern": "2:4"}, "pattern 2:4 means sparsity 0.5"),
        ({"method": "structured", "sparsity": 0.5}, "'magnitude', 'wanda' or 'sparsegpt'"),
        ({"method": "magnitude", "sparsity": 1.0}, "less than 1"),
        ({"method": "magnitude", "sparsity": 0.5, "scope": "layer"}, "Extra inputs"),
    ],
)
def test_bad_pruning_options_are_refused_with_what_to_fix(pruning, fragment):
    with pytest.raises(ValueError, match="space.pruning") as refused:
        search_spec({"kl_divergence": 1}, pruning=[pruning])
    assert fragment in str(refused.value)


def test_pruning_options_are_listed_once():
    with pytest.raises(ValueError, match="once"):
        search_spec({"kl_divergence": 1}, pruning=[{"method": "wanda", "sparsity": 0.5}] * 2)
    spec = search_spec({"kl_divergence": 1}, pruning=[{"method": "sparsegpt", "pattern": "2:4"}])
    (step,) = spec.space.prune_steps()
    assert step.key == "prune:sparsegpt" and step.target_sparsity == 0.5 and step.targets == spec.space.targets
    assert SearchSpec.model_validate(spec.model_dump(mode="json")) == spec


class Killed(Exception):
    """Stands for a worker that died during the pruned family."""


def test_a_resumed_search_reads_back_the_pruned_familys_sensitivity_and_candidates(
    tiny_model_dir, text_dataset, tmp_path
):
    spec = search_spec(
        {"kl_divergence": 5.0},
        methods=("rtn", "gptq"),
        max_candidates=2,
        pruning=[{"method": "wanda", "sparsity": 0.5}],
    )
    checkpoint = tmp_path / "checkpoint"

    def die_in_the_pruned_family(event) -> None:
        if event.step == "prune 1 candidate 2" and event.fraction == 0.0:
            raise Killed

    with pytest.raises(Killed):
        run_search(
            search_request(tiny_model_dir, text_dataset, tmp_path / "a", spec, checkpoint), die_in_the_pruned_family
        )
    events = []
    report = run_search(search_request(tiny_model_dir, text_dataset, tmp_path / "b", spec, checkpoint), events.append)
    done = [(e.step, e.message) for e in events if "earlier attempt" in e.message]
    assert ("prune 1", "sensitivity measured by an earlier attempt") in done
    assert ("prune 1 candidate 1", "candidate 3 finished by an earlier attempt") in done
    assert [(c["method"], c["pruning"] is not None) for c in report["candidates"]] == [
        ("rtn", False),
        ("gptq", False),
        ("rtn", True),
        ("gptq", True),
    ]
