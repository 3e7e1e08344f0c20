"""SH-PEFT hybrid importance checked against the paper's formulas computed by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from autopeft.importance import compute_importance, site_importance

sys.path.insert(0, str(Path(__file__).parent / "peft"))
from _peft_toy import l1_loss, make_toy  # noqa: E402


@pytest.fixture(scope="module")
def toy():
    model = make_toy()
    x = torch.rand(2, 1, 8, 8, 8)
    return model, compute_importance(model, [(x, x * 1.1)], l1_loss)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def _setup():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(2)]
    grads = []
    for batch in batches:
        model.zero_grad()
        _loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return model, batches, grads


def test_l2_is_squared_gradients_plus_rescaled_squared_weights() -> None:
    model, batches, grads = _setup()
    scores = compute_importance(model, batches, _loss, variant="l2", lam=0.5)
    task = {n: grads[0][n] ** 2 + grads[1][n] ** 2 for n in grads[0]}
    agnostic = {n: p.detach() ** 2 for n, p in model.named_parameters()}
    balance = sum(t.sum() for t in task.values()) / sum(a.sum() for a in agnostic.values())
    for name in task:
        torch.testing.assert_close(scores[name], task[name] + 0.5 * balance * agnostic[name])


def test_l1_is_accumulated_gradient_plus_rescaled_magnitude() -> None:
    model, batches, grads = _setup()
    scores = compute_importance(model, batches, _loss, variant="l1", lam=1.0)
    task = {n: (grads[0][n] + grads[1][n]).abs() for n in grads[0]}
    agnostic = {n: p.detach().abs() for n, p in model.named_parameters()}
    balance = sum(t.sum() for t in task.values()) / sum(a.sum() for a in agnostic.values())
    for name in task:
        torch.testing.assert_close(scores[name], task[name] + balance * agnostic[name])


def test_scoring_changes_no_weight_flag_or_gradient() -> None:
    model, batches, _ = _setup()
    model.bias.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compute_importance(model, batches, _loss)
    assert not model.bias.requires_grad and model.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_backbones_are_scored_on_the_network_only(toy) -> None:
    model, scores = toy
    assert set(scores) == {n for n, _ in model.named_parameters() if n.startswith("toy.")}
    assert all(score.shape == dict(model.named_parameters())[n].shape for n, score in scores.items())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"variant": "l3"}, "`variant` must be one of"), ({"lam": -1.0}, "`lam` must be a non-negative number")],
)
def test_bad_arguments(kwargs, message) -> None:
    model, batches, _ = _setup()
    with pytest.raises(ValueError, match=message):
        compute_importance(model, batches, _loss, **kwargs)
    with pytest.raises(ValueError, match="`batches` must yield at least one batch"):
        compute_importance(model, [], _loss)


def test_site_importance_mean_and_sum(toy) -> None:
    model, toy_scores = toy
    scores = {n: torch.full_like(s, 2.0) for n, s in toy_scores.items()}
    scores["toy.head.weight"] = torch.full_like(scores["toy.head.weight"], 10.0)
    head_weight, head_bias = model.toy.head.weight.numel(), model.toy.head.bias.numel()
    mean = site_importance(model, scores)
    assert list(mean) == [s.name for s in model.sites()]
    assert mean["enc.vit.0"] == pytest.approx(2.0)
    assert mean["dec.cnn.1"] == pytest.approx((10.0 * head_weight + 2.0 * head_bias) / (head_weight + head_bias))
    total = site_importance(model, scores, reduce="sum")
    assert total["dec.cnn.1"] == pytest.approx(10.0 * head_weight + 2.0 * head_bias)
    with pytest.raises(ValueError, match="`reduce` must be one of"):
        site_importance(model, scores, reduce="max")
