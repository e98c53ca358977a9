"""KL divergence to the baseline: the top-k + rest estimate against the full-vocabulary KL, through the stored
file, on a tiny model; it is zero for the model itself and grows with the damage done to it."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.utils.factories import quantize_decoder_
from worker.engine.evaluate import ReferenceReader, ReferenceWriter, perplexity
from worker.engine.evaluate.divergence import bucket_kl, full_kl, quantile, summarize_kl, top_k_reference

CPU = torch.device("cpu")


def windows(model, n: int = 3, seq: int = 48) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, seq), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Scored logits of every window, stacked as perplexity scores them: (windows · (seq − 1), vocabulary)."""
    return torch.cat([model(input_ids=w[None], use_cache=False).logits[0, :-1].float() for w in ids])


def kl_through_file(baseline, model, ids, tmp_path, k: int = 64) -> dict:
    """The pipeline's route: the baseline's evaluation writes its top-k, the other model's reads it."""
    writer = ReferenceWriter(tmp_path / "reference.safetensors", k)
    perplexity(baseline, ids, CPU, lambda f, m: None, writer)
    reader = ReferenceReader(writer.save())
    perplexity(model, ids, CPU, lambda f, m: None, reader)
    return reader.result()


@pytest.fixture()
def peaked(tiny):
    """The tiny model with a trained model's peaked next-token distribution (≈2.6 nats of entropy over 512
    tokens; the random one is nearly uniform, ≈6): its final norm scaled up, which sharpens every softmax."""
    with torch.no_grad():
        tiny.model.model.norm.weight.mul_(20)
    return tiny.model


@pytest.fixture()
def int4(peaked):
    damaged = copy.deepcopy(peaked)
    quantize_decoder_(damaged, bits=4, group_size=None)
    return damaged


def test_top_k_estimate_is_a_close_lower_bound_of_the_full_kl(peaked, int4):
    ids = windows(peaked)
    reference, damaged = logits_of(peaked, ids), logits_of(int4, ids)
    exact = full_kl(reference, damaged)
    estimate, _ = bucket_kl(*top_k_reference(reference, 64), damaged)
    assert exact.mean() > 1e-2  # int4 per channel moves the distribution measurably
    assert (estimate <= exact + 1e-6).all()  # merging the tail into one bucket never raises a KL
    assert float(estimate.mean()) == pytest.approx(float(exact.mean()), rel=0.1)


def test_top_k_estimate_of_a_flat_distribution_stays_a_lower_bound(tiny):
    """Nearly uniform distributions put most mass in the rest bucket: the estimate falls short, never over."""
    damaged = copy.deepcopy(tiny.model)
    quantize_decoder_(damaged, bits=4, group_size=None)
    ids = windows(tiny.model)
    reference, other = logits_of(tiny.model, ids), logits_of(damaged, ids)
    estimate, _ = bucket_kl(*top_k_reference(reference, 64), other)
    assert (estimate <= full_kl(reference, other) + 1e-7).all()


def test_top_k_covering_the_vocabulary_is_exact(peaked, int4):
    ids = windows(peaked)
    reference, damaged = logits_of(peaked, ids), logits_of(int4, ids)
    vocabulary = reference.shape[-1]
    estimate, _ = bucket_kl(*top_k_reference(reference, vocabulary + 10), damaged)
    torch.testing.assert_close(estimate, full_kl(reference, damaged), atol=1e-5, rtol=1e-4)


def test_the_model_against_itself_through_the_stored_file_is_zero(peaked, tmp_path):
    ids = windows(peaked)
    result = kl_through_file(peaked, peaked, ids, tmp_path)
    assert result["mean"] < 1e-6 and result["p99"] < 1e-6
    assert result["top1_agreement"] == 1.0
    assert result["positions"] == ids.shape[0] * (ids.shape[1] - 1)


def test_kl_grows_with_damage_and_matches_the_direct_figure(peaked, tmp_path):
    ids = windows(peaked)
    results, exact = {}, {}
    for bits in (8, 4):
        damaged = copy.deepcopy(peaked)
        quantize_decoder_(damaged, bits=bits, group_size=None)
        results[bits] = kl_through_file(peaked, damaged, ids, tmp_path / str(bits))
        exact[bits] = float(full_kl(logits_of(peaked, ids), logits_of(damaged, ids)).mean())
    assert 0 < 10 * results[8]["mean"] < results[4]["mean"]
    assert results[8]["top1_agreement"] > results[4]["top1_agreement"]
    for bits in (8, 4):
        assert results[bits]["mean"] == pytest.approx(exact[bits], rel=0.1)
        assert results[bits]["mean"] <= exact[bits] * (1 + 1e-4)


def test_summary_statistics_and_method():
    kl = torch.tensor([0.4, 0.1, 0.3, 0.2, 10.0])
    agree = torch.tensor([True, True, False, True, False])
    result = summarize_kl(kl, agree, k=2, vocabulary=100)
    assert result["mean"] == pytest.approx(2.2)
    assert result["median"] == pytest.approx(0.3)
    assert result["p99"] == pytest.approx(float(torch.quantile(kl.double(), 0.99)))
    assert result["top1_agreement"] == pytest.approx(0.6)
    assert result["positions"] == 5 and not result["exact"]
    assert "top-2 tokens plus one bucket" in result["method"]
    assert summarize_kl(kl, agree, k=100, vocabulary=100)["exact"]


def test_quantile_interpolates_like_torch():
    values = torch.linspace(0, 1, 7).square().double()
    for q in (0.0, 0.25, 0.5, 0.99, 1.0):
        assert quantile(values, q) == pytest.approx(float(torch.quantile(values, q)))


def test_a_different_vocabulary_is_refused(tiny, tmp_path):
    writer = ReferenceWriter(tmp_path / "reference.safetensors", 8)
    writer.observe(0, torch.randn(5, 32))
    reader = ReferenceReader(writer.save())
    with pytest.raises(ValueError, match="same vocabulary"):
        reader.observe(0, torch.randn(5, 33))
