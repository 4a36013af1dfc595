"""Preference losses: hand-worked values, properties, and equality with TRL 1.16 as an oracle.

TRL 1.16 has no `DPOTrainer.dpo_loss` any more: the loss lives inside `DPOTrainer._compute_loss`,
after the model forward. We call that method itself with a stand-in `self` (the handful of
attributes it reads) and a stand-in model that returns given per-token log-probs, with the
reference log-probs passed precomputed. TRL's own loss lines then run unchanged. SimPO and the
reference-free cDPO form are checked against `CPOTrainer.cpo_loss` the same way.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from vlmtune.errors import VlmtuneError
from vlmtune.losses.preference import (
    LOSS_NAMES,
    dpo,
    dpop,
    hinge,
    ipo,
    nll,
    preference_loss,
    preference_metrics,
    robust,
    simpo,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    """−log σ(x) = log(1 + e^(−x)), for the hand-worked values."""
    return math.log1p(math.exp(-x))


# ---------------------------------------------------------------- hand-worked values


def test_dpo_hand_worked():
    """πc=−1, πr=−3, rc=rr=−2, β=0.5: h = (−1+2) − (−3+2) = 2, β·h = 1.

    loss = −log σ(1) = log(1 + e⁻¹) ≈ 0.31326; rewards 0.5·1 = 0.5 and 0.5·(−1) = −0.5.
    Second pair is the mirror image: h = −2, loss = log(1 + e¹) ≈ 1.31326.
    """
    losses, chosen, rejected = dpo(t(-1, -3), t(-3, -1), t(-2, -2), t(-2, -2), beta=0.5)
    torch.testing.assert_close(losses, t(math.log1p(math.exp(-1)), math.log1p(math.exp(1))))
    torch.testing.assert_close(chosen, t(0.5, -0.5))
    torch.testing.assert_close(rejected, t(-0.5, 0.5))


def test_cdpo_hand_worked():
    """Same pair with ε = 0.1: loss = 0.9·log(1+e⁻¹) + 0.1·log(1+e¹)."""
    losses, _, _ = dpo(t(-1), t(-3), t(-2), t(-2), beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(losses, t(0.9 * softplus(1) + 0.1 * softplus(-1)))


def test_dpop_hand_worked():
    """πc=−3 fell 1 below rc=−2; πr=−5, rr=−2; β=0.5, λ=2.

    h = (−3+2) − (−5+2) = 2; penalty = max(0, −2+3) = 1; β·(h − λ·1) = 0 → loss = log 2.
    Rewards are DPO's: 0.5·(−1) = −0.5 and 0.5·(−3) = −1.5.
    """
    losses, chosen, rejected = dpop(t(-3), t(-5), t(-2), t(-2), beta=0.5, dpop_lambda=2.0)
    torch.testing.assert_close(losses, t(math.log(2)))
    torch.testing.assert_close(chosen, t(-0.5))
    torch.testing.assert_close(rejected, t(-1.5))


def test_ipo_hand_worked_sum_and_per_token():
    """h = 2, β = 0.5 so the target 1/(2β) = 1: loss = (2 − 1)² = 1.

    Per token with lengths 2 and 4: 1/2 − (−1)/4 = 0.75, loss = (0.75 − 1)² = 0.0625.
    """
    losses, _, _ = ipo(t(-1), t(-3), t(-2), t(-2), beta=0.5)
    torch.testing.assert_close(losses, t(1.0))
    losses, _, _ = ipo(t(-1), t(-3), t(-2), t(-2), beta=0.5, chosen_lengths=t(2), rejected_lengths=t(4))
    torch.testing.assert_close(losses, t(0.0625))


def test_hinge_hand_worked():
    """β = 0.25; h = 2, −2, 6 → max(0, 1 − βh) = 0.5, 1.5, 0."""
    losses, _, _ = hinge(t(-1, -3, 1), t(-3, -1, -5), t(-2, -2, -2), t(-2, -2, -2), beta=0.25)
    torch.testing.assert_close(losses, t(0.5, 1.5, 0.0))


def test_robust_hand_worked():
    """h = 2, β = 0.5, ε = 0.2: [0.8·log(1+e⁻¹) − 0.2·log(1+e¹)] / 0.6."""
    losses, _, _ = robust(t(-1), t(-3), t(-2), t(-2), beta=0.5, label_smoothing=0.2)
    torch.testing.assert_close(losses, t((0.8 * softplus(1) - 0.2 * softplus(-1)) / 0.6))


def test_simpo_hand_worked():
    """πc=−4 over 2 tokens, πr=−9 over 3, β=2, γ=0.5: 2·(−2) − 2·(−3) − 0.5 = 1.5.

    loss = log(1 + e^−1.5); rewards are β·mean log-prob: −4 and −6.
    """
    losses, chosen, rejected = simpo(t(-4), t(-9), t(2), t(3), beta=2.0, gamma=0.5)
    torch.testing.assert_close(losses, t(softplus(1.5)))
    torch.testing.assert_close(chosen, t(-4.0))
    torch.testing.assert_close(rejected, t(-6.0))


def test_rpo_adds_alpha_times_nll():
    """πc = −6 over 3 tokens: NLL = 6/3 = 2.

    With rc = −8, rr = −7: h = (−6+8) − (−9+7) = 4, β = 0.5 so β·h = 2 and DPO = log(1+e⁻²).
    RPO with α = 0.5: log(1+e⁻²) + 0.5·2.
    """
    torch.testing.assert_close(nll(t(-6), t(3)), t(2.0))
    losses, _, _ = preference_loss(
        "dpo", t(-6), t(-9), t(-8), t(-7), chosen_lengths=t(3), rejected_lengths=t(5), beta=0.5, rpo_alpha=0.5
    )
    torch.testing.assert_close(losses, t(softplus(2) + 1.0))


def test_metrics_have_trl_names_and_means():
    """Rewards (0.5, −0.5) vs (−0.5, 0.5): accuracy 1/2, margins (1, −1) → mean 0."""
    m = preference_metrics(t(0.5, -0.5), t(-0.5, 0.5), t(-1, -3), t(-3, -1))
    assert m == {
        "rewards/chosen": 0.0,
        "rewards/rejected": 0.0,
        "rewards/accuracies": 0.5,
        "rewards/margins": 0.0,
        "logps/chosen": -2.0,
        "logps/rejected": -2.0,
    }


# ---------------------------------------------------------------- properties


def _call(name, pc, pr, rc, rr, beta):
    lengths = {"chosen_lengths": t(4, 4), "rejected_lengths": t(4, 4)}
    return preference_loss(name, pc, pr, rc, rr, beta=beta, **lengths)


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n != "sft"])
def test_preferred_higher_gives_lower_loss(name):
    # Small β keeps hinge inside its active region and IPO below its target margin.
    beta = 0.05
    ref = t(-10, -10)
    low, _, _ = _call(name, t(-11, -11), t(-10, -10), ref, ref, beta)  # policy prefers rejected
    high, _, _ = _call(name, t(-9, -9), t(-10, -10), ref, ref, beta)  # policy prefers chosen
    assert (high < low).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_rewards_are_detached_and_loss_has_gradient(name):
    pc = t(-5, -6).requires_grad_()
    pr = t(-7, -4).requires_grad_()
    losses, chosen, rejected = _call(name, pc, pr, t(-5.5, -5), t(-6, -6), 0.1)
    assert not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    assert pc.grad is not None and pc.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "robust", "sft"])
def test_reference_free_equals_zero_reference(name):
    pc, pr = t(-5, -6), t(-7, -4)
    lengths = {"chosen_lengths": t(3, 3), "rejected_lengths": t(2, 4)}
    free = preference_loss(name, pc, pr, None, None, reference_free=True, **lengths)
    zero = preference_loss(name, pc, pr, t(0, 0), t(0, 0), **lengths)
    for a, b in zip(free, zero):
        torch.testing.assert_close(a, b)
    # and the reference is really ignored: a non-zero one given with reference_free changes nothing
    ignored = preference_loss(name, pc, pr, t(-1, -1), t(-9, -9), reference_free=True, **lengths)
    torch.testing.assert_close(ignored[0], free[0])


def test_simpo_ignores_reference():
    a = preference_loss("simpo", t(-5), t(-7), t(-1), t(-9), chosen_lengths=t(2), rejected_lengths=t(3))
    b = preference_loss("simpo", t(-5), t(-7), None, None, chosen_lengths=t(2), rejected_lengths=t(3))
    torch.testing.assert_close(a[0], b[0])


def test_dpop_penalty_zero_when_chosen_not_below_reference():
    # πc ≥ rc in every pair: DPOP is exactly DPO
    pc, pr, rc, rr = t(-2, -3, -1), t(-4, -2, -6), t(-2, -4, -3), t(-3, -3, -3)
    torch.testing.assert_close(dpop(pc, pr, rc, rr, beta=0.1)[0], dpo(pc, pr, rc, rr, beta=0.1)[0])


def test_dpop_penalty_positive_when_chosen_below_reference():
    pc, pr, rc, rr = t(-3, -5.5), t(-8, -9), t(-2, -5), t(-3, -3)
    assert (dpop(pc, pr, rc, rr, beta=0.1)[0] > dpo(pc, pr, rc, rr, beta=0.1)[0]).all()


def test_dpop_pushes_chosen_up_harder_than_dpo_when_it_fell():
    """The failure mode of Smaug Sec. 3: margin fine, chosen below the reference."""
    grads = {}
    for name, fn in (("dpo", dpo), ("dpop", dpop)):
        pc = t(-3.0).requires_grad_()
        fn(pc, t(-8.0), t(-2.0), t(-3.0), beta=0.1)[0].sum().backward()
        grads[name] = pc.grad.item()
    assert grads["dpop"] < grads["dpo"] < 0


def test_dpop_refuses_reference_free():
    with pytest.raises(VlmtuneError, match="needs the reference"):
        preference_loss("dpop", t(-1), t(-2), None, None, reference_free=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "dpx"}, "unknown preference loss"),
        ({"name": "dpo", "gamma": 1.0}, "takes no parameter gamma"),
        ({"name": "robust", "label_smoothing": 0.5}, r"\[0, 0.5\)"),
        ({"name": "simpo"}, "needs the completion lengths"),
        ({"name": "dpo", "rpo_alpha": 1.0}, "needs the completion lengths"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, message):
    with pytest.raises(VlmtuneError, match=message):
        preference_loss(policy_chosen=t(-1), policy_rejected=t(-2), ref_chosen=t(-1), ref_rejected=t(-2), **kwargs)


def test_missing_reference_is_an_error():
    with pytest.raises(VlmtuneError, match="needs reference log-probs"):
        preference_loss("dpo", t(-1), t(-2), None, None)


# ---------------------------------------------------------------- TRL 1.16 as an oracle


class _LogpsModel:
    """Stands in for the policy inside `DPOTrainer._compute_loss`: returns fixed per-token log-probs."""

    training = True

    def __init__(self, per_token_logps: torch.Tensor):
        self.per_token_logps = per_token_logps

    def __call__(self, **kwargs):
        zeros = torch.zeros_like(self.per_token_logps)
        return SimpleNamespace(log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _trl_dpo_loss(loss_types, loss_weights, beta, label_smoothing, per_token, mask, ref_chosen, ref_rejected):
    """TRL's `_compute_loss` on one batch [chosen; rejected]; returns (mean loss, TRL metrics)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    model = _LogpsModel(per_token * mask)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    fake_self = SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=loss_weights, beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    prompt_col = torch.zeros(mask.shape[0], 1, dtype=torch.long)  # one prompt token before the completion
    completion_mask = torch.cat([prompt_col, mask.long()], dim=1)
    inputs = {
        "input_ids": torch.ones_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(fake_self, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in fake_self._metrics["train"].items()}


def _random_batch(seed: int, batch: int = 6, max_len: int = 7):
    gen = torch.Generator().manual_seed(seed)
    per_token = -torch.rand(2 * batch, max_len, generator=gen, dtype=torch.float64) * 3
    lengths = torch.randint(1, max_len + 1, (2 * batch,), generator=gen)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).double()
    ref = (per_token * mask).sum(1) + torch.randn(2 * batch, generator=gen, dtype=torch.float64) * 2
    return per_token, mask, lengths.double(), ref


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
@pytest.mark.parametrize(
    ("ours", "trl_types", "params"),
    [
        ("dpo", ["sigmoid"], {}),
        ("hinge", ["hinge"], {}),
        ("ipo", ["ipo"], {}),
        ("robust", ["robust"], {"label_smoothing": 0.2}),
    ],
)
def test_equal_to_trl_dpo_trainer(ours, trl_types, params, beta):
    per_token, mask, lengths, ref = _random_batch(seed=int(beta * 100))
    logps = (per_token * mask).sum(1)
    batch = len(logps) // 2
    for i in range(batch):  # one pair at a time: TRL only returns the batch mean
        rows = [i, batch + i]
        trl_loss, trl_metrics = _trl_dpo_loss(
            trl_types, [1.0], beta, params.get("label_smoothing", 0.0), per_token[rows], mask[rows], ref[i : i + 1],
            ref[batch + i : batch + i + 1],
        )  # fmt: skip
        losses, chosen, rejected = preference_loss(
            ours, logps[i : i + 1], logps[batch + i : batch + i + 1], ref[i : i + 1], ref[batch + i : batch + i + 1],
            chosen_lengths=lengths[i : i + 1], rejected_lengths=lengths[batch + i : batch + i + 1], beta=beta, **params,
        )  # fmt: skip
        torch.testing.assert_close(losses[0], trl_loss, atol=1e-6, rtol=1e-6)
        ours_metrics = preference_metrics(chosen, rejected, logps[i : i + 1], logps[batch + i : batch + i + 1])
        for key, value in ours_metrics.items():
            assert value == pytest.approx(trl_metrics[key], abs=1e-6), key


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_rpo_equal_to_trl_sigmoid_plus_sft(beta):
    """TRL's RPO is loss_type=["sigmoid", "sft"] with weights [1, α]; one pair per call, so its
    batch-wide token mean of the NLL equals our per-pair mean."""
    alpha = 0.7
    per_token, mask, lengths, ref = _random_batch(seed=3)
    logps = (per_token * mask).sum(1)
    batch = len(logps) // 2
    for i in range(batch):
        rows = [i, batch + i]
        trl_loss, _ = _trl_dpo_loss(
            ["sigmoid", "sft"], [1.0, alpha], beta, 0.0, per_token[rows], mask[rows], ref[i : i + 1],
            ref[batch + i : batch + i + 1],
        )  # fmt: skip
        losses, _, _ = preference_loss(
            "dpo", logps[i : i + 1], logps[batch + i : batch + i + 1], ref[i : i + 1], ref[batch + i : batch + i + 1],
            chosen_lengths=lengths[i : i + 1], beta=beta, rpo_alpha=alpha,
        )  # fmt: skip
        torch.testing.assert_close(losses[0], trl_loss, atol=1e-6, rtol=1e-6)


def _trl_cpo_loss(loss_type, beta, label_smoothing, gamma, chosen, rejected):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    fake_self = SimpleNamespace(
        alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )  # fmt: skip
    return CPOTrainer.cpo_loss(fake_self, chosen, rejected)


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_equal_to_trl_cpo(beta, label_smoothing):
    """CPO's SimPO takes per-token mean log-probs (its `average_log_prob=True`)."""
    gen = torch.Generator().manual_seed(7)
    pc, pr = -torch.rand(8, generator=gen, dtype=torch.float64) * 20, -torch.rand(8, generator=gen, dtype=torch.float64) * 20
    lc = torch.randint(1, 12, (8,), generator=gen).double()
    lr = torch.randint(1, 12, (8,), generator=gen).double()
    expected = _trl_cpo_loss("simpo", beta, label_smoothing, 0.8, pc / lc, pr / lr)
    got = simpo(pc, pr, lc, lr, beta=beta, gamma=0.8, label_smoothing=label_smoothing)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_reference_free_cdpo_equal_to_trl_cpo_sigmoid(beta):
    """TRL 1.16's DPO sigmoid has no label smoothing; CPO's sigmoid is cDPO without a reference."""
    gen = torch.Generator().manual_seed(11)
    pc, pr = -torch.rand(8, generator=gen, dtype=torch.float64) * 20, -torch.rand(8, generator=gen, dtype=torch.float64) * 20
    expected = _trl_cpo_loss("sigmoid", beta, 0.15, 0.0, pc, pr)
    got = preference_loss("dpo", pc, pr, None, None, reference_free=True, beta=beta, label_smoothing=0.15)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
