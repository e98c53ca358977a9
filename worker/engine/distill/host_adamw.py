"""AdamW whose gradients and moments live in host memory: the lean `distill:kd` mode's optimizer.

On the GPU, AdamW for an 8B bf16 model needs its gradients (16 GB) and two moments (32 GB) beside the weights.
Here each parameter's gradient leaves the GPU as soon as backward has finished it: a post-accumulate-grad hook
masks it (pruned weights), takes its norm (for clipping) and copies it into pinned host memory on a copy stream,
then frees it. `step()` goes parameter by parameter: it fetches gradient, moments, step count and mask to the GPU
(the next parameter's fetch overlapping this one's update), scales the gradient by the clipping factor, applies
torch's own AdamW update (the fused kernel on CUDA, the single-tensor loop on the CPU: what torch.optim.AdamW
runs in the fast mode), re-zeroes the pruned weights, and stores moments and step count back. The GPU holds at
most two parameters' optimizer tensors at a time.

`state_dict()` has torch.optim.AdamW's per-parameter layout (`step`, `exp_avg`, `exp_avg_sq`), so checkpoints and
LambdaLR work as with AdamW. One backward pass per step: gradients are not accumulated across passes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adam import adam

from worker.engine.distill.offload import CopyStream, host_like, release_pinned_cache, unpack_mask


class HostAdamW(torch.optim.Optimizer):
    """AdamW (betas, eps and weight decay as torch.optim.AdamW's) with gradients and state in host memory.

    `masks` maps parameters to `offload.pack_mask` keep-flags in host memory; `max_grad_norm` clips as
    torch.nn.utils.clip_grad_norm_ does. Call `close()` when done: it removes the gradient hooks."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        *,
        lr: float,
        device: torch.device,
        masks: dict[torch.nn.Parameter, torch.Tensor] | None = None,
        max_grad_norm: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.device, self.fused = device, device.type == "cuda"
        self.masks, self.max_grad_norm = dict(masks or {}), max_grad_norm
        self.params = [p for group in self.param_groups for p in group["params"]]
        pin = self.fused
        self.grads = dict(zip(self.params, host_like(self.params, pin), strict=True))
        moments = zip(host_like(self.params, pin, zero=True), host_like(self.params, pin, zero=True), strict=True)
        steps = host_like([torch.zeros((), dtype=torch.float32)] * len(self.params), pin, zero=True)
        self.host = {
            p: {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
            for p, (exp_avg, exp_avg_sq), step in zip(self.params, moments, steps, strict=True)
        }
        self.state.update(self.host)
        self.loads, self.stores = CopyStream(device), CopyStream(device)
        self.ready: set[torch.nn.Parameter] = set()
        self.norms: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.hooks = [p.register_post_accumulate_grad_hook(self._offload_grad) for p in self.params]

    @torch.no_grad()
    def _offload_grad(self, param: torch.nn.Parameter) -> None:
        """Backward has finished `param.grad`: mask it, note its norm, copy it to host memory, free it here."""
        if param in self.ready:
            raise RuntimeError("HostAdamW takes one backward pass per step (gradients are not accumulated)")
        grad = param.grad
        keep = self.masks.get(param)
        if keep is not None:
            grad.mul_(unpack_mask(keep.to(grad.device, non_blocking=True), grad))
        if self.max_grad_norm is not None:
            self.norms[param] = torch.linalg.vector_norm(grad)
        self.stores.store(self.grads[param], grad)
        param.grad = None
        self.ready.add(param)

    def _clip_factor(self) -> torch.Tensor | None:
        """clip_grad_norm_'s factor min(1, max_norm / (‖g‖ + 1e-6)), from the per-parameter norms in its order."""
        if self.max_grad_norm is None or not self.norms:
            return None
        total = torch.linalg.vector_norm(torch.stack([self.norms[p] for p in self.params if p in self.norms]))
        return torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)

    def _fetch(self, param: torch.nn.Parameter):
        state, keep = self.host[param], self.masks.get(param)
        host = [self.grads[param], state["exp_avg"], state["exp_avg_sq"], state["step"]]
        return self.loads.fetch(host + ([] if keep is None else [keep]))

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        """Update every parameter that received a gradient since the last step, one at a time on the device."""
        factor = self._clip_factor()
        self.loads.after(self.stores)  # the gradients and the last step's moments have reached host memory
        group_of = {p: group for group in self.param_groups for p in group["params"]}
        todo = [p for p in self.params if p in self.ready]
        fetched = self._fetch(todo[0]) if todo else None
        for index, param in enumerate(todo):
            tensors = self.loads.wait(fetched)
            if index + 1 < len(todo):
                fetched = self._fetch(todo[index + 1])
            grad, exp_avg, exp_avg_sq, step, *keep = tensors
            if factor is not None:
                grad.mul_(factor)
            group = group_of[param]
            adam(
                [param],
                [grad],
                [exp_avg],
                [exp_avg_sq],
                [],
                [step],
                foreach=False,
                fused=self.fused,
                decoupled_weight_decay=True,
                amsgrad=False,
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )
            if keep:
                param.mul_(unpack_mask(keep[0], param))
            state = self.host[param]
            for key, tensor in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("step", step)):
                self.stores.store(state[key], tensor)
        self.ready.clear()
        self.norms.clear()

    def state_dict(self) -> dict[str, Any]:
        self.stores.sync()  # the CPU reads the moments next (torch.save)
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copy a saved state into the host buffers; the base class would move the moments to the parameters'
        device (twice the model on the GPU)."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        self.state.update(self.host)
        for index, param in enumerate(self.params):
            for key, value in saved.get(index, {}).items():
                self.host[param][key].copy_(torch.as_tensor(value))

    def close(self) -> None:
        """Remove the gradient hooks and give the host memory back (the optimizer is unusable afterwards)."""
        for hook in self.hooks:
            hook.remove()
        self.stores.sync()
        self.loads.sync()
        self.state.clear()
        self.host.clear()
        self.grads.clear()
        self.masks.clear()
        release_pinned_cache(self.device)
