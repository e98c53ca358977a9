"""HostAdamW does what torch.optim.AdamW does after masked gradients and clip_grad_norm_, with the same state_dict
layout, while no gradient stays on the parameters."""

from __future__ import annotations

import copy

import pytest
import torch

from worker.engine.distill.host_adamw import HostAdamW
from worker.engine.distill.modes import apply_masks_, packed_sparsity_masks, sparsity_masks

CPU = torch.device("cpu")


def pruned_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        model[0].weight[:, ::2] = 0
    return model


def reference_step(model, optimizer, masks, max_norm) -> float:
    """The fast mode's update, as distill_modes._fast_update runs it."""
    apply_masks_(model, masks, grads=True)
    norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    apply_masks_(model, masks)
    return float(norm)


@pytest.mark.parametrize("max_norm", [0.05, 1e6])  # clipping engaged, and not
def test_host_adamw_matches_adamw_with_masks_and_clipping(max_norm):
    reference, ours = pruned_mlp(), pruned_mlp()
    ref_masks = sparsity_masks(reference)
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0, foreach=False)
    masks, layers = packed_sparsity_masks(ours, pin=False)
    assert [layer["name"] for layer in layers] == ["0"] and layers[0]["sparsity"] == pytest.approx(0.5)
    host = HostAdamW(list(ours.parameters()), lr=1e-2, device=CPU, masks=masks, max_grad_norm=max_norm)
    norms = []
    for step in range(4):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step))
        reference(x).pow(2).sum().backward()
        norms.append(reference_step(reference, adamw, ref_masks, max_norm))
        ours(x).pow(2).sum().backward()
        assert all(p.grad is None for p in ours.parameters())  # moved to host memory as soon as they were final
        host.step()
    assert (min(norms) > max_norm) == (max_norm < 1)
    for a, b in zip(reference.parameters(), ours.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (ours[0].weight[:, ::2] == 0).all()
    ref_state, our_state = adamw.state_dict()["state"], host.state_dict()["state"]
    assert ref_state.keys() == our_state.keys()
    for index, state in ref_state.items():
        assert state.keys() == our_state[index].keys()
        for key, value in state.items():
            assert torch.equal(value, our_state[index][key]), (index, key)
    host.close()


def test_host_adamw_resumes_from_its_state_dict_and_drives_a_schedule():
    model = pruned_mlp()
    optimizer = HostAdamW(list(model.parameters()), lr=1e-2, device=CPU)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(x).pow(2).sum().backward()
        optimizer.step()
        schedule.step()
    saved = copy.deepcopy(optimizer.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)

    other = copy.deepcopy(model)
    resumed = HostAdamW(list(other.parameters()), lr=1e-2, device=CPU)
    resumed_schedule = torch.optim.lr_scheduler.LambdaLR(resumed, lambda s: 1.0 / (s + 1))
    resumed.load_state_dict(saved)
    resumed_schedule.load_state_dict(schedule.state_dict())
    for ours, theirs in ((model, optimizer), (other, resumed)):
        ours(x).pow(2).sum().backward()
        theirs.step()
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.state[next(other.parameters())]["step"].item() == 3.0
    optimizer.close()
    resumed.close()
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_host_adamw_refuses_a_second_backward_before_its_step():
    model = pruned_mlp()
    optimizer = HostAdamW(list(model.parameters()), lr=1e-2, device=CPU)
    x = torch.randn(4, 16)
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="one backward pass per step"):
        model(x).sum().backward()
    optimizer.close()
