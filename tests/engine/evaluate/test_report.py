"""The report's `damage` and `quality` sections, built from the steps' layer records and the KL summary."""

from __future__ import annotations

import pytest

from worker.engine.evaluate.report import damage_section, quality_section, tasks_section


def layer(name: str, relative: float, output: float | None = None, source: str | None = None) -> dict:
    return {"name": name, "relative_error": relative, "output_error": output, "output_error_from": source}


STEPS = [
    {"index": 0, "type": "distill", "method": "kd", "layers": [{"name": "model", "final_loss": 2.1}]},
    {
        "index": 1,
        "type": "prune",
        "method": "magnitude",
        "layers": [layer("a", 0.40), layer("b", 0.55)],
    },
    {
        "index": 2,
        "type": "quantize",
        "method": "gptq",
        "layers": [
            layer("a", 0.9, 0.05, "gram"),  # a large weight error, a small output error: ranked by the output
            layer("b", 0.2, 0.70, "gram"),
            layer("c", 0.1, 0.30, "gram"),
            layer("d", 0.1, 0.20, "gram"),
            layer("e", 0.1, 0.10, "gram"),
        ],
    },
]


def test_worst_layers_rank_output_error_where_measured_else_weight_error():
    damage = damage_section(STEPS)
    worst = [(entry["key"], entry["layer"], entry["error"], entry["measure"]) for entry in damage["worst"]]
    assert worst == [
        ("quantize:gptq", "b", 0.70, "output (gram)"),
        ("prune:magnitude", "b", 0.55, "weight"),
        ("prune:magnitude", "a", 0.40, "weight"),
        ("quantize:gptq", "c", 0.30, "output (gram)"),
        ("quantize:gptq", "d", 0.20, "output (gram)"),
    ]
    assert damage["worst"][0]["output_error"] == 0.70 and damage["worst"][1]["output_error"] is None
    assert damage["not_measured"] == [{"step": 0, "key": "distill:kd"}]
    gptq = damage["steps"][1]
    assert gptq["key"] == "quantize:gptq" and gptq["layers"] == 5 and gptq["max_error"] == 0.70
    assert gptq["mean_error"] == (0.05 + 0.70 + 0.30 + 0.20 + 0.10) / 5
    assert damage["steps"][0]["measure"] == "weight" and "Gram" in damage["method"]


def test_quality_without_kl_is_null_with_a_note():
    assert quality_section(None) == {
        "kl_divergence": None,
        "tasks": None,
        "tasks_method": None,
        "note": "no evaluation dataset: the KL divergence was not measured",
    }
    assert quality_section({"mean": 0.1})["note"] is None


def test_tasks_pair_baseline_and_optimized_and_keep_errors():
    cloze = {"source": {"dataset_id": "d"}, "task": "cloze"}
    registry = {"source": {"name": "hellaswag"}, "task": "hellaswag"}
    tasks = tasks_section(
        [{**cloze, "accuracy": 0.62, "stderr": 0.049, "n": 100}, {**registry, "error": "no hub"}],
        [{**cloze, "accuracy": 0.55, "stderr": 0.05, "n": 100}, {**registry, "error": "no hub"}],
    )
    assert tasks[0] == {
        **cloze,
        "baseline": {"accuracy": 0.62, "stderr": 0.049, "n": 100},
        "optimized": {"accuracy": 0.55, "stderr": 0.05, "n": 100},
        "drop": pytest.approx(0.07),
        "error": None,
    }
    assert tasks[1] == {**registry, "error": "no hub", "baseline": None, "optimized": None, "drop": None}
    quality = quality_section(None, tasks)
    assert quality["tasks"] is tasks and "lm-eval-harness" in quality["tasks_method"]
