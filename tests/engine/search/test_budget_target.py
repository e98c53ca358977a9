"""The next target the perplexity and KL limits ask for, read off the measured against predicted damage of the
candidates built so far (no model: pairs of numbers)."""

from __future__ import annotations

import math

import pytest

from worker.engine.search.budget import LADDER_STEP, TARGET_MARGIN, Budget, corrected_target

LIMIT = math.log1p(0.01)
AIM = TARGET_MARGIN * LIMIT


def test_one_candidate_scales_the_target_by_its_measured_over_predicted_damage():
    assert corrected_target([(0.01, 0.004)], LIMIT, LIMIT) == pytest.approx(AIM * 0.01 / 0.004)  # under: up
    assert corrected_target([(0.01, 0.0005)], LIMIT, LIMIT) == pytest.approx(0.01 * LADDER_STEP)  # at most 4x
    assert corrected_target([(0.09, 0.02)], LIMIT, LIMIT) == pytest.approx(AIM * 0.09 / 0.02)  # over: down
    assert corrected_target([(0.01, -0.001)], LIMIT, 0.02) == pytest.approx(0.01 * LADDER_STEP)  # no damage
    assert corrected_target([(0.0, 0.0)], LIMIT, 0.02) == 0.02  # nothing predicted: nothing to scale


def test_a_bracket_interpolates_between_the_best_that_met_and_the_least_above_it_that_missed():
    points = [(0.0097, 0.0010), (0.0888, 0.0189)]
    expected = 0.0097 + (AIM - 0.0010) * (0.0888 - 0.0097) / (0.0189 - 0.0010)
    assert corrected_target(points, LIMIT, LIMIT) == pytest.approx(expected)
    # a nearer miss narrows the bracket; a miss below the best that met does not count as its upper end
    nearer = [*points, (0.0442, 0.0107), (0.0050, 0.0120)]
    expected = 0.0097 + (AIM - 0.0010) * (0.0442 - 0.0097) / (0.0107 - 0.0010)
    assert corrected_target(nearer, LIMIT, LIMIT) == pytest.approx(expected)
    assert 0.0097 < corrected_target(nearer, LIMIT, LIMIT) < 0.0442
    # a candidate that met the limit above the aim lifts the aim halfway to the limit: the next one is cheaper
    close = [(0.05, 0.0095), (0.06, 0.0120)]
    lifted = (0.0095 + LIMIT) / 2
    expected = 0.05 + (lifted - 0.0095) * (0.06 - 0.05) / (0.0120 - 0.0095)
    assert corrected_target(close, LIMIT, LIMIT) == pytest.approx(expected) and expected > 0.05
    # an unmeasurable miss (no KL read) bisects
    assert corrected_target([(0.01, 0.001), (0.03, math.inf)], LIMIT, LIMIT) == pytest.approx(0.02)


def test_several_limits_take_the_tightest_and_no_limit_or_no_record_asks_nothing():
    def record(predicted: float, nll: float, kl: float) -> dict:
        return {
            "predicted": {"nll_increase": predicted},
            "measured": {"nll_increase": nll, "kl_divergence": {"mean": kl}},
        }

    both = Budget(nats={"perplexity_increase": LIMIT, "kl_divergence": 0.002}, task_drop=None)
    records = [record(0.01, 0.001, 0.004)]  # KL measured 0.004 against 0.002 allowed
    assert both.nats_target(records, LIMIT) == pytest.approx(TARGET_MARGIN * 0.002 * 0.01 / 0.004)  # KL binds
    assert Budget(nats={}, task_drop=0.02).nats_target(records, LIMIT) is None
    assert both.nats_target([], LIMIT) is None
