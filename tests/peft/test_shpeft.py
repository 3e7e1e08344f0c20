"""SH-PEFT: exactly the budgeted weights train, and no other weight ever moves."""

from __future__ import annotations

import pytest
import torch
from _peft_toy import l1_loss

from autopeft.errors import PlanError
from autopeft.peft import apply_plan, count_trainable, merge_plan, trainable_fraction
from autopeft.peft.shpeft import top_k_masks


def _plan(**budget) -> dict:
    return {"backbone": "toy", "sites": {"*": {"method": "shpeft", **budget}}}


def _net_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.net.named_parameters()}


def test_masked_weights_never_move_under_adamw_weight_decay(envs) -> None:
    env = envs("toy")
    model = apply_plan(env.fresh(), _plan(count=37), importance=env.scores)
    assert count_trainable(model) == 37
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.5)
    for _ in range(4):
        optimizer.zero_grad()
        l1_loss(model, (env.x, env.target)).backward()
        optimizer.step()
    selected = {
        n.replace(".parametrizations.", ".").replace(".0.index", ""): set(b.tolist())
        for n, b in model.net.named_buffers()
        if n.endswith(".index")
    }
    assert sum(len(v) for v in selected.values()) == 37
    merge_plan(model)
    before = _net_weights(env.base)
    after = _net_weights(model)
    assert before.keys() == after.keys()
    moved = {n: set(torch.nonzero((after[n] != before[n]).reshape(-1)).flatten().tolist()) for n in before}
    for name, positions in moved.items():
        assert positions <= selected.get(name, set()), name
    assert sum(len(v) for v in moved.values()) > 0
    assert torch.equal(model.discriminator[0].weight, env.base.discriminator[0].weight)


def test_budget_is_exact_with_ties_and_deterministic(envs) -> None:
    env = envs("toy")
    flat = {name: torch.ones_like(score) for name, score in env.scores.items()}  # every score ties
    first = apply_plan(env.fresh(), _plan(count=101), importance=flat)
    second = apply_plan(env.fresh(), _plan(count=101), importance=flat)
    assert count_trainable(first) == count_trainable(second) == 101
    index_first = {n: b for n, b in first.named_buffers() if n.endswith(".index")}
    index_second = {n: b for n, b in second.named_buffers() if n.endswith(".index")}
    assert index_first.keys() == index_second.keys()
    assert all(torch.equal(index_first[n], index_second[n]) for n in index_first)


def test_fraction_budget_is_a_share_of_the_pretrained_network(envs) -> None:
    env = envs("toy")
    model = apply_plan(env.fresh(), _plan(fraction=0.01), importance=env.scores)
    total = sum(p.numel() for p in env.base.net.parameters())
    assert count_trainable(model) == round(0.01 * total)
    assert trainable_fraction(model) == pytest.approx(round(0.01 * total) / total)


def test_the_highest_scores_are_selected_and_unused_weights_never(envs) -> None:
    env = envs("toy")
    scores = {name: torch.zeros_like(s) for name, s in env.scores.items()}
    scores["toy.blocks.0.mlp.linear1.weight"][3, 4] = 5.0
    scores["toy.head.weight"].view(-1)[2] = 4.0
    scores["toy.blocks.0.norm_cross_attn.weight"][:] = 100.0  # never used by the network
    model = apply_plan(env.fresh(), _plan(count=2), importance=scores)
    indices = {n: b.tolist() for n, b in model.named_buffers() if n.endswith(".index")}
    assert indices == {
        "toy.blocks.0.mlp.linear1.parametrizations.weight.0.index": [3 * 16 + 4],
        "toy.head.parametrizations.weight.0.index": [2],
    }


def test_missing_scores_and_impossible_budgets_are_plan_errors(envs) -> None:
    env = envs("toy")
    with pytest.raises(PlanError, match="SH-PEFT needs importance scores: compute them with"):
        apply_plan(env.fresh(), _plan(count=3))
    partial = dict(list(env.scores.items())[:2])
    with pytest.raises(PlanError, match="importance scores lack"):
        apply_plan(env.fresh(), _plan(count=3), importance=partial)
    with pytest.raises(PlanError, match="budget of 10000000 weights must be between 1 and the"):
        apply_plan(env.fresh(), _plan(count=10_000_000), importance=env.scores)


def test_top_k_keeps_exactly_k_and_breaks_ties_by_order() -> None:
    scores = {"a": torch.tensor([[1.0, 2.0], [2.0, 0.0]]), "b": torch.tensor([2.0, 3.0, 2.0])}
    masks = top_k_masks(scores, 3)
    assert masks["a"].tolist() == [[False, True], [True, False]]
    assert masks["b"].tolist() == [False, True, False]
    assert sum(int(m.sum()) for m in top_k_masks(scores, 5).values()) == 5
    assert not any(m.any() for m in top_k_masks(scores, 0).values())
    assert all(m.all() for m in top_k_masks(scores, 7).values())


def test_top_k_rejects_bad_budgets_and_nan() -> None:
    with pytest.raises(ValueError, match=r"`k` must be an integer in \[0, 2\]"):
        top_k_masks({"a": torch.ones(2)}, 3)
    with pytest.raises(ValueError, match="must not contain NaN"):
        top_k_masks({"a": torch.tensor([1.0, float("nan")])}, 1)
