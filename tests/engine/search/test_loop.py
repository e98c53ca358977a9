"""The candidate loop without a model: a fake build that measures a fixed share of the predicted damage, to see
which targets the loop proposes and when it stops."""

from __future__ import annotations

import math

from modelpress.specs import SearchMethod
from worker.engine.search.budget import Budget
from worker.engine.search.loop import Plan, explore
from worker.engine.search.solver import Option

LAYERS = {
    f"layer{i}": [
        Option("bf16", 4.0, 0.0),
        Option("int8", 2.0, 0.0001 * (i + 1)),
        Option("int4_g64", 1.0, 0.004 * (i + 1)),
    ]
    for i in range(12)
}


def fake_build(share: float, budget: Budget, plans: list[Plan]):
    def build(in_family: int, plan: Plan) -> dict:
        plans.append(plan)
        nll = share * plan.predicted
        record = {
            "key": plan.key,
            "method": plan.method.value,
            "predicted": {"nll_increase": plan.predicted},
            "measured": {"nll_increase": nll, "kl_divergence": {"mean": nll}},
        }
        return {**record, "meets_budget": budget.meets(record)}

    return build


def test_the_loop_builds_each_assignment_once_around_the_budget():
    budget = Budget(nats={"perplexity_increase": math.log1p(0.03)}, task_drop=None)
    plans: list[Plan] = []
    records = explore(LAYERS, [SearchMethod.gptq], budget, 4, fake_build(0.25, budget, plans))
    assert 2 <= len(records) == len(plans) <= 4 and len({p.key for p in plans}) == len(plans)  # each built once
    assert plans[0].target == budget.nats["perplexity_increase"]  # the budget itself first
    assert plans[1].target > plans[0].target  # it measured under the budget: the next target rises
    assert any(r["meets_budget"] for r in records)
    best = max(r["predicted"]["nll_increase"] for r in records if r["meets_budget"])
    assert best > plans[0].predicted  # a cheaper candidate than the first met the budget


def test_every_method_builds_the_first_assignment_and_a_zero_budget_stops_at_once():
    budget = Budget(nats={"perplexity_increase": math.log1p(0.03)}, task_drop=None)
    plans: list[Plan] = []
    explore(LAYERS, [SearchMethod.rtn, SearchMethod.gptq], budget, 3, fake_build(0.25, budget, plans))
    assert [p.method for p in plans[:2]] == [SearchMethod.rtn, SearchMethod.gptq]
    assert plans[0].assignment == plans[1].assignment
    zero = Budget(nats={"perplexity_increase": 0.0}, task_drop=None)
    plans = []
    records = explore(LAYERS, [SearchMethod.gptq], zero, 4, fake_build(0.25, zero, plans))
    assert len(records) == 1 and set(plans[0].assignment.values()) == {"bf16"}
