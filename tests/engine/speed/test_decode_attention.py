"""The copy-free grouped attention of the speed harness: same tokens and logits as transformers' sdpa."""

from __future__ import annotations

import pytest
import torch

from tests.utils.factories import tiny_llama
from worker.engine.speed import decode_attention
from worker.engine.speed.decode_attention import GROUPED_DECODE, use_grouped_decode_attention_
from worker.engine.speed.harness import StaticDecoder


def _decode_logits(model, prompt: torch.Tensor, steps: int, compiled: bool = False) -> tuple[torch.Tensor, list]:
    """Greedy tokens after `prompt`, and the logits of each decode step (eager) or of the last step (compiled)."""
    decoder = StaticDecoder(model, prompt.shape[0], prompt.shape[1] + steps + 2, compiled=compiled)
    with torch.no_grad():
        ids = decoder.prefill(prompt)
        tokens, logits = [ids], []
        for _ in range(steps):
            if compiled:
                ids = decoder._step(ids).clone()
            else:
                logits.append(model(input_ids=ids, **decoder.kwargs).logits)
                ids = logits[-1][:, -1:].argmax(dim=-1)
            tokens.append(ids)
    return torch.cat(tokens, dim=1), logits


def test_grouped_decode_matches_sdpa_and_never_copies_the_cache(monkeypatch):
    model = tiny_llama(hidden=64)
    prompt = torch.randint(1, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    reference_tokens, reference = _decode_logits(model, prompt, 4)

    assert use_grouped_decode_attention_(model) and model.config._attn_implementation == GROUPED_DECODE
    delegated = []
    sdpa = decode_attention._sdpa_forward()
    monkeypatch.setattr(
        decode_attention,
        "_sdpa_forward",
        lambda: lambda m, q, *a, **k: delegated.append(q.shape[2]) or sdpa(m, q, *a, **k),
    )
    tokens, logits = _decode_logits(model, prompt, 4)

    assert torch.equal(tokens, reference_tokens)
    for ours, theirs in zip(logits, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert delegated == [9, 9]  # the prompt of each of the 2 layers; no decode step went to sdpa


def test_models_it_does_not_fit_are_left_as_they_are():
    eager = tiny_llama(hidden=64)
    eager.set_attn_implementation("eager")
    assert not use_grouped_decode_attention_(eager) and eager.config._attn_implementation == "eager"

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4,
    )  # fmt: skip
    multi_head = LlamaForCausalLM(config)
    assert not use_grouped_decode_attention_(multi_head)
    assert multi_head.config._attn_implementation == "sdpa"


def test_the_speed_copy_switches_and_the_evaluated_model_does_not():
    from worker.engine.evaluate.evaluation import EvalPlan, kernel_speed

    model = tiny_llama(hidden=64, max_positions=128)
    plan = EvalPlan(
        device=torch.device("cpu"), windows=None, latency_ids=torch.randint(1, 512, (1, 16)), decode_tokens=3,
        repeats=1,
    )  # fmt: skip
    speed = kernel_speed(model, plan, {}, set())
    assert speed["attention"].startswith(GROUPED_DECODE)
    assert model.config._attn_implementation == "sdpa"
    assert kernel_speed(model, plan, {}, set(), fuse=False)["attention"] == "sdpa"


def _compiled_step_logits(model, prompt: torch.Tensor, feed: torch.Tensor) -> torch.Tensor:
    """Logits of compiled one-token steps fed `feed` (batch, steps) after an eager prefill of `prompt`."""
    decoder = StaticDecoder(model, prompt.shape[0], prompt.shape[1] + feed.shape[1] + 2, compiled=False)
    torch._dynamo.reset()
    step = torch.compile(lambda ids: model(input_ids=ids, **decoder.kwargs).logits, fullgraph=True, dynamic=False)
    with torch.no_grad():
        decoder.prefill(prompt)
        return torch.cat([step(feed[:, i : i + 1]).float() for i in range(feed.shape[1])], dim=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_compiled_grouped_decode_on_cuda_matches_sdpa():
    model = tiny_llama(hidden=256, layers=2).to("cuda", torch.bfloat16)
    ids = torch.randint(1, 512, (2, 40), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    reference = _compiled_step_logits(model, ids[:, :33], ids[:, 33:])
    assert use_grouped_decode_attention_(model)
    ours = _compiled_step_logits(model, ids[:, :33], ids[:, 33:])
    torch.testing.assert_close(ours, reference, rtol=2e-2, atol=2e-2)
