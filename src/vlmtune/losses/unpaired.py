"""Losses on unpaired answers (KTO, unpaired BCO), as pure functions of sequence log-probabilities.

A record here has one answer and a label: desirable (thumbs up) or undesirable (thumbs down), not
a chosen and a rejected answer to the same prompt. Every loss takes, for a batch of B records,

    policy_logps, ref_logps   (B,)  the answer's log-probability summed over its tokens,
                                     under the policy and under the frozen reference
    desirable                 (B,)  bool, True where the answer is desirable

and returns ``(losses, chosen_rewards, rejected_rewards)``: ``losses`` is ``(B,)`` in the input
order (the caller takes the mean, as TRL's KTO trainer does over its concatenated losses), the
rewards are the implicit rewards ``β·(log π − log π_ref)`` of the desirable answers
(``(n_desirable,)``) and of the undesirable ones (``(n_undesirable,)``), detached, so
``vlmtune.losses.preference.preference_metrics`` logs them under TRL's names.

KTO's reference point is estimated from mismatched pairs of the batch, each prompt with another
record's answer: ``kl_pairing`` says which answer goes with which prompt (TRL's choice),
``kl_reference_point`` turns their log-probs into z0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmtune.errors import VlmtuneError

Tensor = torch.Tensor
LossOutput = tuple[Tensor, Tensor, Tensor]


def kl_pairing(batch_size: int) -> list[int]:
    """For each record i of a batch, the record whose answer is paired with i's prompt: i − 1, cyclically.

    TRL's KTO trainer builds its mismatched (prompt, answer) pairs this way (the answers shifted by
    one within the batch); the KTO paper only asks that the answer is another record's.
    With one record the "mismatched" pair is the record itself and z0 is its own reward, which is
    why TRL refuses a batch of 1.
    """
    return [(i - 1) % batch_size for i in range(batch_size)]


def kl_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0 = max(0, mean(log π(y'|x) − log π_ref(y'|x))) over mismatched pairs.

    The paper's estimate of KL(πθ‖π_ref) (Ethayarajh et al. 2024, arXiv 2402.01306; biased, it
    says, but convenient). It is detached: the paper does not back-propagate through z0, so it acts as
    a baseline that the policy cannot lower to gain reward. The clamp at 0 holds because a KL is
    never negative. TRL averages it over all processes; this is the mean over the given pairs.
    Returns a 0-dim tensor.
    """
    return (policy_kl_logps - ref_kl_logps).detach().mean().clamp(min=0)


def _checked_rewards(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, beta: float) -> Tensor:
    if desirable.dtype != torch.bool or desirable.shape != policy_logps.shape:
        raise VlmtuneError(
            f"desirable must be a bool tensor shaped like the log-probs {tuple(policy_logps.shape)}, "
            f"got {desirable.dtype} {tuple(desirable.shape)}"
        )
    return beta * (policy_logps - ref_logps)


def kto(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization", arXiv 2402.01306, the KTO loss; TRL cites it as Eq. 7).

        r = β·(π − π_ref)           z = β·z0           (z0 = ``kl``, see ``kl_reference_point``)
        desirable:    loss = λ_D·(1 − σ(r − z))
        undesirable:  loss = λ_U·(1 − σ(z − r))

    This is the paper's λ_y − v(x, y) with the value v = λ_D·σ(r − z) or λ_U·σ(z − r): a desirable
    answer gains by rising above the reference point, an undesirable one by falling below it, and
    the sigmoid saturates, so answers already far on the right side stop pulling (the
    prospect-theoretic loss aversion is in the ratio λ_D/λ_U). The paper suggests
    λ_D·n_D / (λ_U·n_U) in [1, 4/3] when the counts n_D, n_U differ. Same as TRL 1.16's
    ``loss_type="kto"``.
    """
    rewards = _checked_rewards(policy_logps, ref_logps, desirable, beta)
    shift = beta * kl
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(rewards.dtype)
    value = torch.where(desirable, torch.sigmoid(rewards - shift), torch.sigmoid(shift - rewards))
    losses = weights * (1 - value)
    rewards = rewards.detach()
    return losses, rewards[desirable], rewards[~desirable]


def bco_unpaired(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    *,
    beta: float = 0.1,
    delta: float = 0.0,
) -> LossOutput:
    """BCO on unpaired answers (Jung et al. 2024, arXiv 2404.04656: the binary-feedback setting).

        r = β·(π − π_ref)
        desirable:    loss = −log σ(r − δ)
        undesirable:  loss = −log σ(−(r − δ))

    The binary cross-entropy of a classifier whose logit is the implicit reward, shifted by the
    running mean reward δ (``vlmtune.losses.preference.RewardShift``). On a batch of B pairs split
    into 2B answers, the mean of this loss is half the mean of ``preference.bco``. Departs from the
    paper (and from TRL's former BCOTrainer) by leaving out underlying-distribution matching, the
    density-ratio classifier that reweights undesirable answers whose prompts differ from the
    desirable ones'.
    """
    rewards = _checked_rewards(policy_logps, ref_logps, desirable, beta)
    shifted = rewards - delta
    losses = -F.logsigmoid(torch.where(desirable, shifted, -shifted))
    rewards = rewards.detach()
    return losses, rewards[desirable], rewards[~desirable]
