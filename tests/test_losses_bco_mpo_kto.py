"""BCO, MPO and KTO: hand-worked values, properties, TRL 1.16 as an oracle, and training runs.

TRL 1.16 has BCO only as DPO's ``loss_type="bco_pair"`` (with no reward shift: δ = 0), MPO as
``loss_type=["sigmoid", "bco_pair", "sft"]`` with ``loss_weights``, and KTO inside
``KTOTrainer._compute_loss``; each is called on given log-probs with a stand-in ``self`` and model,
as ``test_losses_preference`` does for DPO. Its BCOTrainer (the unpaired form) and its running
reward shift are gone from TRL 1.16, so those are checked by hand.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from vlmtune.cli import main
from vlmtune.config import LossConfig, validate_config
from vlmtune.errors import VlmtuneError
from vlmtune.losses.preference import RewardShift, bco, dpo, mpo, nll, preference_loss, preference_metrics
from vlmtune.losses.unpaired import bco_unpaired, kl_pairing, kl_reference_point, kto

from test_losses_preference import _LogpsModel, _random_batch, _trl_dpo_loss, softplus, t

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---------------------------------------------------------------- hand-worked values


def test_bco_hand_worked_without_and_with_shift():
    """πc=−1, rc=−2, πr=−3, rr=−2, β=0.5: chosen reward 0.5, rejected reward −0.5.

    δ = 0:   −log σ(0.5) − log σ(0.5) = 2·log(1 + e^−0.5) ≈ 0.94815.
    δ = 0.5: −log σ(0.5 − 0.5) − log σ(−(−0.5 − 0.5)) = log 2 + log(1 + e^−1) ≈ 1.00641.
    """
    losses, chosen, rejected = bco(t(-1), t(-3), t(-2), t(-2), beta=0.5)
    torch.testing.assert_close(losses, t(2 * softplus(0.5)))
    torch.testing.assert_close(chosen, t(0.5))
    torch.testing.assert_close(rejected, t(-0.5))
    losses, _, _ = bco(t(-1), t(-3), t(-2), t(-2), beta=0.5, delta=0.5)
    torch.testing.assert_close(losses, t(math.log(2) + softplus(1.0)))
    assert losses.item() == pytest.approx(1.00641, abs=1e-5)


def test_reward_shift_is_the_mean_of_batch_means():
    """Batches with rewards {1, 3 | −1, 1}, {0 | −2}, {2, 2 | 2, 2}: batch means 1, −1, 2.

    δ after each update: 1, (1 − 1)/2 = 0, (1 − 1 + 2)/3 = 2/3; each batch counts once, whatever
    its size (TRL's RunningMoments fed one number per batch).
    """
    shift = RewardShift()
    assert shift.update(t(1, 3), t(-1, 1)) == pytest.approx(1.0)
    assert shift.update(t(0), t(-2)) == pytest.approx(0.0)
    assert shift.update(t(2, 2), t(2, 2)) == pytest.approx(2 / 3)
    assert shift.mean == pytest.approx(2 / 3) and shift.count == 3


def test_mpo_hand_worked():
    """πc=−6 over 3 tokens, πr=−9, rc=−8, rr=−7, β=0.5: rewards 1 and −1, h = 4, β·h = 2.

    DPO = log(1+e^−2); BCO (δ = 0) = 2·log(1+e^−1); NLL = 6/3 = 2.
    MPO = 0.8·log(1+e^−2) + 0.2·2·log(1+e^−1) + 1·2 ≈ 0.10154 + 0.12530 + 2 = 2.22685.
    With weights (1, 0, 0) it is DPO alone; (0, 1, 0) BCO alone; (0, 0, 1) the NLL alone.
    """
    args = (t(-6), t(-9), t(-8), t(-7), t(3))
    losses, chosen, rejected = mpo(*args, beta=0.5)
    expected = 0.8 * softplus(2) + 0.2 * 2 * softplus(1) + 2.0
    torch.testing.assert_close(losses, t(expected))
    assert expected == pytest.approx(2.22685, abs=1e-5)
    torch.testing.assert_close(chosen, t(1.0))
    torch.testing.assert_close(rejected, t(-1.0))
    torch.testing.assert_close(mpo(*args, beta=0.5, weights=(1, 0, 0))[0], dpo(*args[:4], beta=0.5)[0])
    torch.testing.assert_close(mpo(*args, beta=0.5, weights=(0, 1, 0), delta=0.3)[0],
                               bco(*args[:4], beta=0.5, delta=0.3)[0])
    torch.testing.assert_close(mpo(*args, beta=0.5, weights=(0, 0, 1))[0], nll(t(-6), t(3)))


def test_kto_hand_worked():
    """π = (−1, −3), π_ref = (−2, −2), desirable (yes, no), β = 0.5, z0 = 1 so β·z0 = 0.5.

    Rewards 0.5 and −0.5. Desirable: λ_D·(1 − σ(0.5 − 0.5)) = 2·0.5 = 1.
    Undesirable: λ_U·(1 − σ(0.5 − (−0.5))) = 1 − σ(1) = σ(−1) ≈ 0.26894.
    """
    losses, chosen, rejected = kto(
        t(-1, -3), t(-2, -2), torch.tensor([True, False]), t(1.0)[0], beta=0.5, desirable_weight=2.0
    )
    torch.testing.assert_close(losses, t(1.0, 1 / (1 + math.e)))
    torch.testing.assert_close(chosen, t(0.5))
    torch.testing.assert_close(rejected, t(-0.5))


def test_kl_reference_point_hand_worked():
    """Mismatched-pair log-ratios (1, 0, −1) → mean 0; (−1, −1) → −1, clamped to 0; (2, 1) → 1.5."""
    assert kl_reference_point(t(-1, -2, -3), t(-2, -2, -2)).item() == 0.0
    assert kl_reference_point(t(-3, -3), t(-2, -2)).item() == 0.0
    assert kl_reference_point(t(0, -1), t(-2, -2)).item() == 1.5


def test_kl_pairing_shifts_answers_by_one_as_trl():
    """TRL: KL_completion_ids = [completions[-1]] + completions[:-1], so prompt i gets answer i − 1."""
    completions = ["a0", "a1", "a2", "a3"]
    trl = [completions[-1]] + completions[:-1]
    assert [completions[j] for j in kl_pairing(4)] == trl
    assert kl_pairing(4) == [3, 0, 1, 2] and kl_pairing(1) == [0]


def test_bco_unpaired_hand_worked_and_half_the_paired_mean():
    """Same answers as the paired case, split: desirable r = 0.5, undesirable r = −0.5, δ = 0.5.

    Desirable: −log σ(0) = log 2; undesirable: −log σ(1) = log(1 + e^−1).
    """
    losses, chosen, rejected = bco_unpaired(t(-1, -3), t(-2, -2), torch.tensor([True, False]), beta=0.5, delta=0.5)
    torch.testing.assert_close(losses, t(math.log(2), softplus(1.0)))
    torch.testing.assert_close(chosen, t(0.5))
    torch.testing.assert_close(rejected, t(-0.5))
    pc, pr, rc, rr = t(-1, -4, -2), t(-3, -2, -6), t(-2, -3, -2), t(-2, -2, -5)
    paired = bco(pc, pr, rc, rr, beta=0.3, delta=0.1)[0]
    desirable = torch.tensor([True] * 3 + [False] * 3)
    unpaired = bco_unpaired(torch.cat([pc, pr]), torch.cat([rc, rr]), desirable, beta=0.3, delta=0.1)[0]
    torch.testing.assert_close(unpaired.mean(), paired.mean() / 2)


# ---------------------------------------------------------------- properties


def test_kto_moves_each_answer_the_right_way():
    """A desirable answer the policy likes more has lower loss; an undesirable one, higher."""
    ref, kl = t(-5, -5), t(0.2)[0]
    for desirable, sign in ((torch.tensor([True, True]), -1), (torch.tensor([False, False]), 1)):
        low, _, _ = kto(t(-6, -6), ref, desirable, kl)
        high, _, _ = kto(t(-4, -4), ref, desirable, kl)
        assert (torch.sign(high - low) == sign).all()


def test_kto_and_bco_unpaired_rewards_detached_and_no_gradient_through_z0():
    policy = t(-5, -6, -2).requires_grad_()
    kl_policy = t(-3, -4, -1).requires_grad_()
    desirable = torch.tensor([True, False, True])
    z0 = kl_reference_point(kl_policy, t(-4, -4, -4))
    assert not z0.requires_grad
    for losses, chosen, rejected in (kto(policy, t(-5, -5, -5), desirable, z0),
                                     bco_unpaired(policy, t(-5, -5, -5), desirable, delta=0.1)):
        assert not chosen.requires_grad and not rejected.requires_grad
        assert chosen.shape == (2,) and rejected.shape == (1,)
        policy.grad = None
        losses.sum().backward()
        assert policy.grad is not None and (policy.grad != 0).all()


def test_kto_takes_a_batch_with_only_one_kind():
    losses, chosen, rejected = kto(t(-1, -2), t(-1, -1), torch.tensor([True, True]), 0.0)
    assert losses.shape == (2,) and chosen.shape == (2,) and rejected.shape == (0,)


def test_bco_shift_moves_the_boundary():
    """With δ equal to both rewards, each answer sits on the boundary: loss = 2·log 2."""
    losses, _, _ = bco(t(-1), t(-1), t(-2), t(-2), beta=0.5, delta=0.5)
    torch.testing.assert_close(losses, t(2 * math.log(2)))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kto(t(-1, -2), t(-1, -1), torch.tensor([1, 0]), 0.0), "desirable must be a bool tensor"),
        (lambda: bco_unpaired(t(-1, -2), t(-1, -1), torch.tensor([True])), "shaped like the log-probs"),
        (lambda: preference_loss("mpo", t(-1), t(-2), t(-1), t(-2), chosen_lengths=t(1), rpo_alpha=1.0),
         "own generation"),
        (lambda: preference_loss("mpo", t(-1), t(-2), t(-1), t(-2)), "needs the completion lengths"),
        (lambda: preference_loss("bco", t(-1), t(-2), None, None, reference_free=True), "needs the reference"),
        (lambda: preference_loss("bco", t(-1), t(-2), t(-1), t(-2), gamma=1.0), "takes no parameter gamma"),
    ],
)
def test_bad_calls_raise_clear_errors(call, message):
    with pytest.raises(VlmtuneError, match=message):
        call()


def test_step_moves_the_running_shift_on_training_batches_only():
    """β = 0.5. Training batch: rewards 0.5·(0+2) = 1 and 0.5·(−2+2) = 0, mean 0.5 → δ = 0.5.
    An eval batch (rewards 3 and 3) uses δ = 0.5 and leaves it. Next training batch: rewards 1.5
    and 1.5, mean 1.5 → δ = (0.5 + 1.5)/2 = 1. Without ``running`` δ stays 0."""
    from vlmtune.train.steps import PreferenceStep

    def pair(chosen, rejected):
        return SimpleNamespace(chosen=t(chosen), rejected=t(rejected))

    train, evaluate = SimpleNamespace(training=True), SimpleNamespace(training=False)
    step = PreferenceStep(None, None, 128, LossConfig(name="bco", beta=0.5, bco_reward_shift="running"))
    assert step._bco_delta(pair(0, -2), t(-2), t(-2), train) == pytest.approx(0.5)
    assert step._bco_delta(pair(4, 4), t(-2), t(-2), evaluate) == pytest.approx(0.5)
    assert step._bco_delta(pair(1, 1), t(-2), t(-2), train) == pytest.approx(1.0)
    plain = PreferenceStep(None, None, 128, LossConfig(name="mpo", beta=0.5))
    assert plain.reward_shift is None and plain._bco_delta(pair(0, -2), t(-2), t(-2), train) == 0.0


# ---------------------------------------------------------------- config


def _config(**loss):
    return validate_config({"model": {"name_or_path": "m"}, "data": {"train": "d.jsonl"}, "loss": loss})


def test_config_names_and_mpo_weights():
    config = _config(name="mpo", mpo_weights={"quality": 0.5})
    assert config.loss.loss_params() == {"weights": (0.8, 0.5, 1.0)}
    assert _config(name="bco").loss.loss_params() == {}
    assert _config(name="bco").loss.bco_reward_shift == "none"
    assert LossConfig.model_fields["mpo_weights"].description


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        ({"name": "mpo", "sft_weight": 0.5}, "sft_weight cannot be used with mpo"),
        ({"name": "bco", "reference_free": True}, "reference_free cannot be used with bco"),
        ({"name": "mpo", "mpo_weights": {"quality": -1}}, r"loss\.mpo_weights\.quality"),
        ({"name": "mpo", "mpo_weights": {"qualty": 1}}, r"did you mean loss\.mpo_weights\.quality"),
        ({"name": "bco", "bco_reward_shift": "ema"}, r"loss\.bco_reward_shift"),
        ({"name": "kto"}, r"loss\.name: .*single answer .*: use `train --algo kto`"),
    ],
)
def test_config_refuses_bad_settings(loss, message):
    with pytest.raises(VlmtuneError, match=message):
        _config(**loss)


# ---------------------------------------------------------------- TRL 1.16 as an oracle


@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
@pytest.mark.parametrize(
    ("trl_types", "trl_weights", "ours", "params"),
    [
        (["bco_pair"], [1.0], "bco", {}),
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], "mpo", {}),
        (["sigmoid", "bco_pair", "sft"], [0.3, 1.5, 0.4], "mpo", {"weights": (0.3, 1.5, 0.4)}),
    ],
)
def test_equal_to_trl_dpo_trainer(trl_types, trl_weights, ours, params, beta):
    """One pair per call: TRL's batch-wide token mean of the NLL equals our per-pair mean there."""
    per_token, mask, lengths, ref = _random_batch(seed=int(beta * 100) + 5)
    logps = (per_token * mask).sum(1)
    batch = len(logps) // 2
    for i in range(batch):
        c, r = slice(i, i + 1), slice(batch + i, batch + i + 1)
        trl_loss, trl_metrics = _trl_dpo_loss(
            trl_types, trl_weights, beta, 0.0, per_token[[i, batch + i]], mask[[i, batch + i]], ref[c], ref[r]
        )
        losses, chosen, rejected = preference_loss(
            ours, logps[c], logps[r], ref[c], ref[r], chosen_lengths=lengths[c], rejected_lengths=lengths[r],
            beta=beta, **params,
        )  # fmt: skip
        torch.testing.assert_close(losses[0], trl_loss, atol=1e-6, rtol=1e-6)
        for key, value in preference_metrics(chosen, rejected, logps[c], logps[r]).items():
            assert value == pytest.approx(trl_metrics[key], abs=1e-6), key


def _trl_kto_loss(beta, desirable_weight, undesirable_weight, per_token, mask, labels, kl_per_token, kl_mask,
                  ref_logps, ref_kl_logps):  # fmt: skip
    """TRL's `KTOTrainer._compute_loss` on one batch with precomputed reference log-probs.

    The stand-in model returns the answers' per-token log-probs, or the mismatched pairs' ones when
    it is given the KL sequences (marked by their token id 2)."""
    from trl import KTOTrainer

    answers, mismatched = _LogpsModel(per_token * mask), _LogpsModel(kl_per_token * kl_mask)

    class Model:
        training = True

        def __call__(self, **kwargs):
            return (mismatched if kwargs["input_ids"][0, 0].item() == 2 else answers)(**kwargs)

    model = Model()
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    fake_self = SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, precompute_ref_logps=True, calculate_KL=True,
        loss_type="kto", beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    fake_self._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(fake_self, m, b)
    prompt = torch.zeros(mask.shape[0], 1, dtype=torch.long)
    completion_mask = torch.cat([prompt, mask.long()], dim=1)
    kl_completion_mask = torch.cat([prompt, kl_mask.long()], dim=1)
    inputs = {
        "input_ids": torch.ones_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "KL_input_ids": torch.full_like(kl_completion_mask, 2),
        "KL_attention_mask": torch.ones_like(kl_completion_mask),
        "KL_completion_mask": kl_completion_mask,
        "label": labels,
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    loss = KTOTrainer._compute_loss(fake_self, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in fake_self._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
@pytest.mark.parametrize("labels", [[True, False, True, True, False, False], [True, True, False, True, True, True]])
@pytest.mark.parametrize("kl_shift", [-3.0, 8.0], ids=["z0>0", "z0-clamped"])
def test_kto_equal_to_trl(beta, weights, labels, kl_shift):
    per_token, mask, _, ref = _random_batch(seed=int(beta * 10) + sum(labels), batch=3)
    kl_per_token, kl_mask, _, ref_kl = _random_batch(seed=int(beta * 10) + 99, batch=3)
    # the reference of the mismatched pairs moved down (mean log-ratio > 0) or up (< 0: z0 clamped to 0)
    ref_kl = ref_kl + kl_shift
    desirable = torch.tensor(labels)
    trl_loss, trl_metrics = _trl_kto_loss(beta, *weights, per_token, mask, desirable, kl_per_token, kl_mask, ref,
                                          ref_kl)  # fmt: skip
    logps, kl_logps = (per_token * mask).sum(1), (kl_per_token * kl_mask).sum(1)
    z0 = kl_reference_point(kl_logps, ref_kl)
    losses, chosen, rejected = kto(logps, ref, desirable, z0, beta=beta, desirable_weight=weights[0],
                                   undesirable_weight=weights[1])  # fmt: skip
    torch.testing.assert_close(losses.mean(), trl_loss, atol=1e-6, rtol=1e-6)
    assert z0.item() == pytest.approx(trl_metrics["kl"], abs=1e-6)
    assert (z0.item() == 0.0) == (kl_shift > 0)
    assert chosen.mean().item() == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-6)
    assert rejected.mean().item() == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-6)


# ---------------------------------------------------------------- training through the CLI


def _cli_run(run: Path, model_dir, pairs, *overrides) -> list[dict]:
    args = [f"model.name_or_path={model_dir}", f"data.train={pairs}", "data.eval=null", f"train.output_dir={run}",
            "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1", "train.eval_every=null",
            "train.save_every=null", "train.progress=false", "train.warmup_ratio=0", "train.schedule=constant",
            "lora.rank=4", "lora.alpha=8", *overrides]  # fmt: skip
    assert main(["train", "--algo", "dpo", "--config", str(CONFIGS / "demo-cpu.yaml"), *args]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.mark.parametrize(
    "loss",
    [["loss.name=mpo", "loss.bco_reward_shift=running"], ["loss.name=bco"]],
    ids=["mpo-running", "bco"],
)
def test_cli_trains_plain_and_fast_alike(loss, tiny_model_dir, synth_pairs_file, tmp_path):
    """Two steps through `vlmtune train`: finite losses, every LoRA B matrix (zero at init) trained,
    and the plain and the fast pair forward give the same curve."""
    curves = {}
    for fast in ("true", "false"):
        run = tmp_path / f"fast-{fast}"
        rows = _cli_run(run, tiny_model_dir, synth_pairs_file, f"train.fast_path={fast}", *loss)
        assert [r["step"] for r in rows] == [1, 2]
        assert all(math.isfinite(r["loss"]) and "delta" in r for r in rows)
        adapter = load_file(run / "final" / "adapter_model.safetensors")
        lora_b = [v for k, v in adapter.items() if "lora_B" in k]
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
        curves[fast] = rows
    for plain, fast in zip(curves["false"], curves["true"]):
        for key in plain.keys() - {"pairs_per_s"}:
            assert fast[key] == pytest.approx(plain[key], abs=1e-5, rel=1e-4), key
    if "loss.bco_reward_shift=running" in loss:
        # step 1: policy = reference (LoRA B is zero), rewards and δ are 0; step 2 moves the mean
        assert curves["true"][0]["delta"] == 0.0 and curves["true"][1]["delta"] != 0.0
    else:
        assert all(r["delta"] == 0.0 for r in curves["true"])
