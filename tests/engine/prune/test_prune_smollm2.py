"""Slow: on the real SmolLM2-135M, Wanda at 50% beats magnitude at 50% by a wide margin (few windows, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.utils.factories import SHARED_DATA, SMOLLM2_GGUF, smollm2_dir, smollm2_marks
from worker.engine.calibrate.windows import token_windows
from worker.engine.evaluate.evaluation import perplexity
from worker.engine.load.checkpoint import load_model
from worker.engine.steps import StepContext, run_step, step_spec

pytestmark = [
    *smollm2_marks(),
    pytest.mark.skipif(not (SHARED_DATA / "wikitext2-test.txt").exists(), reason="shared wikitext2 data missing"),
]


def test_wanda_beats_magnitude_at_half_sparsity():
    loaded = load_model(smollm2_dir() / SMOLLM2_GGUF, "gguf", torch.device("cpu"))
    tokenizer = loaded.tokenizer
    calibration = token_windows(tokenizer, SHARED_DATA / "wikitext2-valid.txt", "txt", 256, 8, "calibration")
    evaluation = token_windows(tokenizer, SHARED_DATA / "wikitext2-test.txt", "txt", 256, 4, "evaluation")
    scores = {}
    for method in ("magnitude", "wanda"):
        model = copy.deepcopy(loaded.model)
        spec = {"type": "prune", "method": method, "sparsity": 0.5}
        run_step(model, step_spec(spec), StepContext(calibration=calibration, report_progress=lambda f, m: None))
        scores[method] = perplexity(model, evaluation, torch.device("cpu"), lambda f, m: None)["perplexity"]
    assert scores["wanda"] < 0.5 * scores["magnitude"], scores
