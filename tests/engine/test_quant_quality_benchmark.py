"""benchmarks/quant_quality.py refuses a group size that does not divide a targeted width before running it."""

from __future__ import annotations

import torch

from benchmarks import quant_quality


def test_a_group_size_that_does_not_divide_a_width_is_refused():
    model = torch.nn.Module()
    model.up = torch.nn.Linear(640, 96)
    model.down = torch.nn.Linear(96, 640)
    model.lm_head = torch.nn.Linear(640, 100)
    int4 = {"method": "gptq", "weights": {"bits": 4, "group_size": 64}}
    assert quant_quality.undivided_widths(model, int4) == [96]
    assert quant_quality.undivided_widths(model, {"method": "rtn", "weights": {"bits": 8, "group_size": None}}) == []
    assert quant_quality.undivided_widths(model, {"method": "fp8"}) == []
    assert quant_quality.undivided_widths(model, None) == []
