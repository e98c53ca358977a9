"""The size summary that structured and depth pruning report: tied parameters once, reductions of each."""

from __future__ import annotations

import torch

from worker.engine.prune.size import model_size, size_summary


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.body = torch.nn.ModuleList([torch.nn.Linear(4, 4, bias=False) for _ in range(3)])
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: one tensor, counted once


def test_size_counts_tied_parameters_once_and_summary_gives_each_reduction():
    model = _Tied().to(torch.float16)
    shared, layer = 10 * 4, 4 * 4  # the tied embedding/head matrix, one body Linear
    before = model_size(model)
    assert before == (shared + 3 * layer, 2 * (shared + 3 * layer))  # float16: 2 bytes a parameter
    del model.body[0]
    summary = size_summary(before, model, torch.zeros(5, 7, dtype=torch.long))
    after = shared + 2 * layer
    assert summary == {
        "parameters_before": before.parameters,
        "parameters_after": after,
        "parameter_reduction": 1 - after / before.parameters,
        "bytes_before": before.bytes,
        "bytes_after": 2 * after,
        "size_reduction": 1 - 2 * after / before.bytes,
        "calibration_windows": 5,
    }
