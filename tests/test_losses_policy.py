"""GRPO advantages and objective: hand-worked values, clipping, and TRL 1.16 as an oracle.

The oracle is `GRPOTrainer._compute_loss` itself, called with a stand-in `self` whose
`_get_per_token_logps_and_entropies` returns the log-probs we give it: TRL's loss lines run
unchanged on our tensors, no model needed. The advantage lines of TRL sit in the middle of
`_generate_and_score_completions` (rewards, generation, logging), so for those the test
re-states TRL's few lines with its own `nanstd` as a plain reference.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from vlmtune.errors import VlmtuneError
from vlmtune.losses.policy import group_advantages, grpo_objective, k3_kl, loss_units

D = torch.float64


def test_group_advantages_hand_worked():
    """Group (1, 2, 3, 4): mean 2.5, Bessel std √((2.25+0.25+0.25+2.25)/3) = √(5/3) ≈ 1.29099.

    Â = (−1.5, −0.5, 0.5, 1.5) / (√(5/3) + 1e−4). Group (0, 1): mean 0.5, std √0.5, Â = ±0.5/(√0.5+1e−4).
    """
    rewards = torch.tensor([1.0, 2, 3, 4], dtype=D)
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=D) / (math.sqrt(5 / 3) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4), expected)
    two = group_advantages(torch.tensor([[0.0, 1.0]], dtype=D), 2)
    torch.testing.assert_close(two, torch.tensor([[-0.5, 0.5]], dtype=D) / (math.sqrt(0.5) + 1e-4))


def test_group_advantages_none_only_centres():
    """Dr. GRPO: (1, 2, 3, 4) → (−1.5, −0.5, 0.5, 1.5); (0, 0, 6, 2) → (−2, −2, 4, 0)."""
    rewards = torch.tensor([1.0, 2, 3, 4, 0, 0, 6, 2], dtype=D)
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5, -2, -2, 4, 0], dtype=D)
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none"), expected)


def test_group_advantages_equal_to_trl_lines():
    """TRL 1.16 grpo_trainer.py, scale_rewards="group": (r − mean) / (nanstd + 1e-4) per group."""
    from trl.trainer.utils import nanstd

    torch.manual_seed(0)
    rewards = torch.rand(5 * 4, dtype=D)
    mean = rewards.view(-1, 4).mean(dim=1).repeat_interleave(4)
    std = nanstd(rewards.view(-1, 4), dim=1).repeat_interleave(4)
    torch.testing.assert_close(group_advantages(rewards, 4), (rewards - mean) / (std + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none"), rewards - mean)


def test_group_advantages_bad_group_size():
    with pytest.raises(VlmtuneError, match="multiple of the number of generations"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(VlmtuneError, match="'std' or 'none'"):
        group_advantages(torch.zeros(4), 4, scale="batch")


def test_equal_rewards_give_zero_advantage_and_zero_gradient():
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.7, 1.0, 0.0, 1.0, 0.0], dtype=D)
    adv = group_advantages(rewards, 4)
    assert torch.equal(adv[:4], torch.zeros(4, dtype=D))
    logps = torch.randn(8, 5, dtype=D, generator=torch.Generator().manual_seed(1)).requires_grad_()
    loss, _ = grpo_objective(logps, logps.detach(), adv, torch.ones(8, 5, dtype=D))
    loss.backward()
    assert torch.equal(logps.grad[:4], torch.zeros(4, 5, dtype=D))
    assert logps.grad[4:].abs().sum() > 0


def _hand_batch():
    """Two completions, two tokens each; the second token of completion 2 is padding.

    ratios: completion 1 (A = +1): 1.5, 0.5; completion 2 (A = −1): 1.5, (0.5, masked). ε = 0.2.
    per-token loss −min(r·A, clip(r)·A):
      c1 t1: −min(1.5, 1.2) = −1.2 (clipped)   c1 t2: −min(0.5, 0.8) = −0.5
      c2 t1: −min(−1.5, −1.2) = 1.5
    """
    old = torch.full((2, 2), -1.0, dtype=D)
    logps = old + torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.5), math.log(0.5)]], dtype=D)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=D)
    return logps.requires_grad_(), old, torch.tensor([1.0, -1.0], dtype=D), mask


@pytest.mark.parametrize(
    ("normalize", "expected"),
    [
        ("token", (-1.2 - 0.5 + 1.5) / 3),  # all tokens / 3 tokens
        ("sequence", ((-1.2 - 0.5) / 2 + 1.5 / 1) / 2),  # per completion, then mean
        ("constant", (-1.2 - 0.5 + 1.5) / (2 * 4)),  # / (B · max_tokens = 4)
    ],
)
def test_grpo_objective_hand_worked(normalize, expected):
    logps, old, adv, mask = _hand_batch()
    loss, metrics = grpo_objective(logps, old, adv, mask, normalize=normalize, max_tokens=4)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=D))
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)  # only c1 t1: r > 1+ε with A > 0
    assert metrics["clip_ratio/high"] == pytest.approx(1 / 3) and metrics["clip_ratio/low"] == 0.0
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.5) / 3)


def test_k3_kl_hand_worked_and_added_with_beta():
    """ref − logp = log 2: k3 = 2 − log 2 − 1 ≈ 0.30685; ref = logp: 0. With ratio 1, A = 0 the loss is β·mean(kl)."""
    logps = torch.tensor([[-1.0, -2.0]], dtype=D)
    ref = logps + torch.tensor([[math.log(2), 0.0]], dtype=D)
    kl = k3_kl(logps, ref)
    torch.testing.assert_close(kl, torch.tensor([[1 - math.log(2), 0.0]], dtype=D))
    loss, metrics = grpo_objective(logps, logps, torch.zeros(1, dtype=D), torch.ones(1, 2, dtype=D), ref, beta=0.5)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (1 - math.log(2)) / 2, dtype=D))
    assert metrics["kl"] == pytest.approx((1 - math.log(2)) / 2)
    with pytest.raises(VlmtuneError, match="reference log-probs"):
        grpo_objective(logps, logps, torch.zeros(1, dtype=D), torch.ones(1, 2, dtype=D), beta=0.1)


@pytest.mark.parametrize(
    ("ratio", "advantage", "has_gradient"),
    [
        (1.5, 1.0, False),  # beyond 1+ε, pushed further up: clipped
        (0.5, -1.0, False),  # beyond 1−ε, pushed further down: clipped
        (1.5, -1.0, True),  # beyond 1+ε but the advantage pulls it back: not clipped
        (0.5, 1.0, True),
        (1.1, 1.0, True),  # inside the trust region
    ],
)
def test_clip_removes_gradient_only_past_the_bound(ratio, advantage, has_gradient):
    old = torch.tensor([[-2.0]], dtype=D)
    logps = (old + math.log(ratio)).requires_grad_()
    loss, _ = grpo_objective(logps, old, torch.tensor([advantage], dtype=D), torch.ones(1, 1, dtype=D))
    loss.backward()
    assert (logps.grad.abs().item() > 0) == has_gradient


def test_clip_eps_high_widens_upper_bound():
    old = torch.tensor([[-2.0]], dtype=D)
    logps = (old + math.log(1.25)).requires_grad_()
    grpo_objective(logps, old, torch.ones(1, dtype=D), torch.ones(1, 1, dtype=D), clip_eps_high=0.28)[0].backward()
    assert logps.grad.item() < 0  # 1.25 < 1.28: still pushed up (would be clipped at ε = 0.2)


# ---------------------------------------------------------------- TRL 1.16 as an oracle


def _trl_grpo_loss(loss_type, logps, old, adv, mask, ref, beta, eps_low, eps_high, max_len):
    from trl.trainer.grpo_trainer import GRPOTrainer

    accelerator = SimpleNamespace(
        gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x, num_processes=1
    )
    fake_self = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, accelerator=accelerator, max_completion_length=max_len,
        _metrics={"train": defaultdict(list)},
    )  # fmt: skip
    batch = logps.shape[0]
    inputs = {
        "prompt_ids": torch.ones(batch, 1, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 1, dtype=torch.long),
        "completion_ids": torch.ones_like(mask, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(fake_self, None, inputs)
    return loss, {k: v[-1] for k, v in fake_self._metrics["train"].items()}


@pytest.mark.parametrize(
    ("trl_type", "normalize"), [("grpo", "sequence"), ("bnpo", "token"), ("dapo", "token"), ("dr_grpo", "constant")]
)
@pytest.mark.parametrize(("beta", "eps_high"), [(0.0, 0.2), (0.04, 0.2), (0.1, 0.28)])
def test_equal_to_trl_grpo_trainer(trl_type, normalize, beta, eps_high):
    gen = torch.Generator().manual_seed(int(beta * 100) + len(trl_type))
    batch, length = 6, 8
    logps = -torch.rand(batch, length, dtype=D, generator=gen) * 3
    old = logps + 0.3 * torch.randn(batch, length, dtype=D, generator=gen)  # ratios spread across the clip
    ref = logps + 0.5 * torch.randn(batch, length, dtype=D, generator=gen)
    adv = torch.randn(batch, dtype=D, generator=gen)
    mask = (torch.arange(length)[None] < torch.randint(1, length + 1, (batch, 1), generator=gen)).to(D)

    ours_logps = logps.clone().requires_grad_()
    loss, metrics = grpo_objective(
        ours_logps, old, adv, mask, ref_logps=ref, beta=beta, clip_eps=0.2, clip_eps_high=eps_high,
        normalize=normalize, max_tokens=length,
    )  # fmt: skip
    loss.backward()
    trl_logps = logps.clone().requires_grad_()
    trl_loss, trl_metrics = _trl_grpo_loss(trl_type, trl_logps, old, adv, mask, ref, beta, 0.2, eps_high, length)
    trl_loss.backward()

    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours_logps.grad, trl_logps.grad, atol=1e-6, rtol=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(trl_metrics["clip_ratio/region_mean"], abs=1e-9)
    assert metrics["clip_fraction"] > 0  # the random ratios really cross the bounds
    if beta > 0:
        assert metrics["kl"] == pytest.approx(trl_metrics["kl"], abs=1e-9)


def test_loss_units_hand_worked():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert loss_units(mask, "token") == 4.0
    assert loss_units(mask, "sequence") == 2.0
    assert loss_units(mask, "constant", max_tokens=5) == 10.0
    assert loss_units(mask, "constant") == 6.0  # default length: T
    with pytest.raises(VlmtuneError, match="normalize must be"):
        loss_units(mask, "tokens")


@pytest.mark.parametrize("normalize", ["token", "sequence", "constant"])
def test_micro_batches_with_the_global_denominator_add_up_to_the_whole_batch(normalize):
    """Split a batch of 3 completions (4 + 1 + 2 tokens) into micro-batches of 2 and 1: each divided by
    the whole batch's units over 2 (the number of micro-batches), their mean loss and summed gradient
    are those of the whole batch. Token case by hand: ratio 1, loss -sum(A per token) / 7 = -(4·1 + 1·(-2) + 2·1)/7."""
    logps = torch.tensor([[-1.0, -2.0, -0.5, -1.5], [-0.7, 0.0, 0.0, 0.0], [-0.2, -0.9, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    advantages = torch.tensor([1.0, -2.0, 1.0])
    whole, _ = grpo_objective(logps, logps.detach(), advantages, mask, normalize=normalize, max_tokens=4)
    (whole_grad,) = torch.autograd.grad(whole, logps)
    units = loss_units(mask, normalize, max_tokens=4)
    parts = [slice(0, 2), slice(2, 3)]
    losses = [grpo_objective(logps[p], logps[p].detach(), advantages[p], mask[p], normalize=normalize, max_tokens=4,
                             denominator=units / len(parts))[0] for p in parts]
    mean = sum(losses) / len(parts)
    (split_grad,) = torch.autograd.grad(mean, logps)
    torch.testing.assert_close(mean, whole)
    torch.testing.assert_close(split_grad, whole_grad)
    if normalize == "token":
        assert whole.item() == pytest.approx(-(4 * 1.0 + 1 * -2.0 + 2 * 1.0) / 7)
    own = [grpo_objective(logps[p], logps[p].detach(), advantages[p], mask[p], normalize=normalize,
                          max_tokens=4)[0] for p in parts]
    if normalize == "token":  # each micro-batch by its own count: not the whole batch's loss
        assert not torch.isclose(sum(own) / 2, whole)
