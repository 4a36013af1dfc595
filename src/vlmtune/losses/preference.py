"""Paired preference losses (the DPO family, BCO, MPO), as pure functions of sequence log-probs.

Every loss takes log-probabilities summed over the completion tokens (shape ``(B,)``): of the
chosen and the rejected answer, under the policy being trained and under the frozen reference.
Every loss returns ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``: ``losses`` is
per pair (the caller takes the mean), the rewards are the implicit rewards ``β·(log π − log
π_ref)`` and are detached, for logging only.

Notation used in the docstrings, for one pair (x, y_w chosen, y_l rejected):

    πc = log πθ(y_w|x)     πr = log πθ(y_l|x)     rc = log π_ref(y_w|x)     rr = log π_ref(y_l|x)
    h  = (πc − rc) − (πr − rr)          the DPO margin of log-ratios

``preference_loss(name, ...)`` picks one by name; ``preference_metrics`` gives the TRL-named
metrics (``rewards/chosen``, ``rewards/margins``, ...) that every preference trainer logs.
``RewardShift`` keeps BCO's running reward shift, the one piece of state a caller carries between
batches. Losses on unpaired answers (KTO, unpaired BCO) are in ``vlmtune.losses.unpaired``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmtune.errors import VlmtuneError

Tensor = torch.Tensor
LossOutput = tuple[Tensor, Tensor, Tensor]


def _rewards(
    beta: float, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> tuple[Tensor, Tensor]:
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return chosen_rewards, rejected_rewards


def dpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO, the sigmoid loss (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7).

        loss = −log σ(β·h)

    With ``label_smoothing = ε > 0`` this is conservative DPO (cDPO, Mitchell 2023, "A note on
    DPO with noisy preferences", Eq. 3): the label is flipped with probability ε,

        loss = −(1−ε)·log σ(β·h) − ε·log σ(−β·h)

    which is biased (its minimum is at a finite margin); ``robust`` is the unbiased alternative.
    """
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def dpop(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    dpop_lambda: float = 50.0,
) -> LossOutput:
    """DPO-Positive (Pal et al. 2024, "Smaug", arXiv 2402.13228, Eq. 3).

        loss = −log σ(β·[h − λ·max(0, rc − πc)])

    DPO only asks the chosen answer to gain on the rejected one, so both log-probs may fall and the
    chosen one with them (the failure mode of Sec. 3, worst for pairs a few tokens apart, such as
    counts that differ in one digit). The penalty is zero while the policy keeps the chosen answer
    at least as likely as the reference does, and grows linearly once it drops below; it sits
    inside the sigmoid, multiplied by β like the margin. The paper uses λ = 50 for its models.

    Level of the penalty: Eq. 3 writes it on whole-sequence log-probabilities, log π_ref(y_w|x) /
    πθ(y_w|x), one max per pair; the per-token picture belongs to the paper's analysis (Sec. 3,
    the probability of each next token), not to the loss. We follow Eq. 3: one max on the summed
    log-probs. A per-token max (sum over tokens of max(0, ref_t − π_t)) is stricter, since gains on
    some tokens could not offset losses on others; it would need per-token inputs.
    """
    penalty = torch.clamp(ref_chosen - policy_chosen, min=0.0)
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(beta * (margin - dpop_lambda * penalty))
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def ipo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> LossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", arXiv 2310.12036, Eq. 17).

        loss = (h − 1/(2τ))²        with τ = β

    A squared loss that pulls the margin to a fixed target instead of pushing it to infinity, so
    it does not over-fit deterministic preferences. On summed log-probs the squared margin grows
    with the answer length; TRL therefore averages per token (log-ratios divided by the number of
    completion tokens, a choice it confirmed with the IPO authors). Both work here: pass
    ``chosen_lengths``/``rejected_lengths`` to divide each log-ratio by its length (TRL's form),
    or pass per-token mean log-probs and no lengths. Rewards are ``β·(π − π_ref)`` on the inputs
    as given, as in TRL.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if chosen_lengths is not None or rejected_lengths is not None:
        if chosen_lengths is None or rejected_lengths is None:
            raise VlmtuneError("ipo: give both chosen_lengths and rejected_lengths, or neither")
        chosen_ratio = chosen_ratio / chosen_lengths.clamp(min=1)
        rejected_ratio = rejected_ratio / rejected_lengths.clamp(min=1)
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def hinge(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """Hinge loss of SLiC-HF (Zhao et al. 2023, arXiv 2305.10425, its calibration loss) in DPO's form.

        loss = max(0, 1 − β·h)

    SLiC's calibration loss is max(0, δ − log P(y_w|x) + log P(y_l|x)); dividing by δ and measuring
    log-ratios against the reference, as DPO does (TRL's "hinge"), gives the line above with
    β = 1/δ.
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = torch.relu(1 - beta * margin)
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def robust(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv 2403.00409, the rDPO loss).

        loss = [(1−ε)·(−log σ(β·h)) − ε·(−log σ(−β·h))] / (1 − 2ε)

    ε is the probability that a pair's label was flipped. Unlike cDPO this is an unbiased estimate
    of the clean DPO loss under that noise. Needs 0 ≤ ε < 0.5.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise VlmtuneError(
            f"robust: label_smoothing (the label-noise rate ε) must be in [0, 0.5), got {label_smoothing}"
        )
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    clean = -(1 - label_smoothing) * F.logsigmoid(margin)
    flipped = -label_smoothing * F.logsigmoid(-margin)
    losses = (clean - flipped) / (1 - 2 * label_smoothing)
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def simpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6): reference-free and length-normalised.

        loss = −log σ(β/|y_w|·πc − β/|y_l|·πr − γ)

    The reward is the mean per-token log-prob scaled by β, so no reference model is needed, and
    the target margin γ asks the chosen answer to win by at least γ. The paper's β is large
    (2.0–2.5) because it multiplies a per-token mean. ``label_smoothing`` mixes in the flipped
    label as cDPO does (TRL's CPO trainer does the same). Rewards are ``β·mean log-prob``.
    """
    chosen_rewards = beta * policy_chosen / chosen_lengths.clamp(min=1)
    rejected_rewards = beta * policy_rejected / rejected_lengths.clamp(min=1)
    margin = chosen_rewards - rejected_rewards - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def nll(policy_chosen: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Negative log-likelihood per token of the chosen answer, ``−πc/|y_w|``, shape ``(B,)``.

    RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", arXiv 2404.19733, the
    DPO+NLL loss of Sec. 2) adds it to DPO: total = DPO + α·NLL, with the NLL normalised by the
    answer length per pair.
    TRL's "sft" term differs slightly: it averages over all chosen tokens of the batch at once,
    which equals the mean of this when all chosen answers have the same length.
    """
    return -policy_chosen / chosen_lengths.clamp(min=1)


def bco(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    delta: float = 0.0,
) -> LossOutput:
    """BCO for pairs (Jung et al. 2024, "Binary Classifier Optimization", arXiv 2404.04656).

        loss = −log σ(β·(πc − rc) − δ) − log σ(−(β·(πr − rr) − δ))

    The paper's BCE loss: a binary classifier whose logit is the implicit reward, the chosen
    answer class 1, the rejected one class 0, each on its own (no margin between them). Its
    Theorem 1: the BCE loss bounds the DPO loss from above; the reward shift δ, the mean reward
    kept as a moving average over training (``RewardShift``), tightens that bound. TRL 1.16's
    ``bco_pair`` is this line with δ = 0; its earlier versions, which InternVL's MPO scripts ran,
    kept the running mean as ``RewardShift`` does. Departs from the paper by leaving out its
    underlying-distribution matching (a density-ratio classifier that reweights rejected
    answers). ``delta`` is a number, not a tensor with a gradient: the shift is a baseline, not
    something to optimise.
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


MPO_WEIGHTS = (0.8, 0.2, 1.0)


def mpo(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    chosen_lengths: Tensor,
    *,
    beta: float = 0.1,
    weights: tuple[float, float, float] = MPO_WEIGHTS,
    delta: float = 0.0,
) -> LossOutput:
    """MPO, InternVL's mixed preference optimisation (Wang et al. 2024, arXiv 2411.10442).

        loss = w_p·L_dpo + w_q·L_bco + w_g·L_sft        (the paper's w_p·L_p + w_q·L_q + w_g·L_g)

    preference loss L_dpo = −log σ(β·h) (sigmoid DPO: which answer is better), quality loss
    L_bco = ``bco`` (is each answer good on its own), generation loss L_sft = ``nll`` (the chosen
    answer's mean token NLL: how to write a good one). ``weights = (w_p, w_q, w_g)``; the default
    (0.8, 0.2, 1.0) is what InternVL ships (its MPO scripts: sigmoid weight 0.8, bco_pair weight
    0.2, rpo_alpha 1), and what TRL documents for ``loss_type=["sigmoid", "bco_pair", "sft"]``.
    ``delta`` is BCO's reward shift (see ``bco``). TRL's ``sft`` term is the token mean over the
    whole batch; ours is the per-pair mean (``nll``), equal when all chosen answers have the same
    length, and independent of how a batch is split.
    """
    pairs = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    preference, chosen_rewards, rejected_rewards = dpo(*pairs, beta=beta)
    quality, _, _ = bco(*pairs, beta=beta, delta=delta)
    generation = nll(policy_chosen, chosen_lengths)
    w_p, w_q, w_g = weights
    return w_p * preference + w_q * quality + w_g * generation, chosen_rewards, rejected_rewards


class RewardShift:
    """BCO's reward shift δ: the running mean, over updates, of each batch's mean implicit reward.

    As TRL's ``RunningMoments`` fed one number per batch (the mean of the batch's chosen and
    rejected rewards ``β·(π − π_ref)``), every batch counts once, whatever its size: after batches
    with means m1..mk, δ = (m1 + ... + mk)/k. ``update`` folds the current batch in first and
    returns the new δ, so the first batch is shifted by its own mean, as in TRL. The mean is kept
    per process (not averaged across processes) and lives in memory only.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    def update(self, chosen_rewards: Tensor, rejected_rewards: Tensor) -> float:
        batch_mean = torch.cat([chosen_rewards, rejected_rewards]).detach().mean().item()
        self.count += 1
        self.mean += (batch_mean - self.mean) / self.count
        return self.mean


_WITH_REFERENCE = {"dpo": dpo, "dpop": dpop, "ipo": ipo, "hinge": hinge, "robust": robust, "bco": bco}
LOSS_NAMES = (*_WITH_REFERENCE, "simpo", "sft", "mpo")
REFERENCE_FREE_OK = ("dpo", "ipo", "hinge", "robust", "simpo", "sft")
SHIFTED = ("bco", "mpo")  # the losses that take BCO's reward shift ``delta``
_PARAMS = {
    "dpo": {"label_smoothing"},
    "dpop": {"dpop_lambda"},
    "ipo": set(),
    "hinge": set(),
    "robust": {"label_smoothing"},
    "bco": {"delta"},
    "simpo": {"gamma", "label_smoothing"},
    "sft": set(),
    "mpo": {"weights", "delta"},
}


def preference_loss(
    name: str,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    beta: float = 0.1,
    reference_free: bool = False,
    rpo_alpha: float = 0.0,
    **params: float | tuple[float, float, float],
) -> LossOutput:
    """Compute the loss called ``name`` (one of ``LOSS_NAMES``); returns ``(losses, chosen, rejected)``.

    ``reference_free=True`` sets the reference log-probs to 0 (the policy alone, as in "DPO without
    reference" ablations); DPOP, BCO and MPO refuse it, since their penalty or classifier is
    defined against the reference.
    SimPO never uses the reference, and "sft" only for its logged rewards. IPO divides its
    log-ratios by the lengths when they are given (TRL's per-token form). ``rpo_alpha > 0`` adds
    ``rpo_alpha · nll`` (RPO) to any loss but MPO, whose generation weight is that term already;
    ``"sft"`` is the NLL term alone. ``params`` go to the loss (``label_smoothing``,
    ``dpop_lambda``, ``gamma``, ``delta`` for bco and mpo, ``weights`` for mpo); one the loss does
    not take is a config error.
    """
    if name not in LOSS_NAMES:
        raise VlmtuneError(f"unknown preference loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    unknown = set(params) - _PARAMS[name]
    if unknown:
        allowed = ", ".join(sorted(_PARAMS[name])) or "none"
        bad = ", ".join(sorted(unknown))
        raise VlmtuneError(f"loss {name!r} takes no parameter {bad} (it takes: {allowed})")
    if reference_free and name not in REFERENCE_FREE_OK:
        ok = ", ".join(REFERENCE_FREE_OK)
        raise VlmtuneError(f"loss {name!r} needs the reference model; reference_free works with: {ok}")
    if name == "mpo" and rpo_alpha > 0:
        raise VlmtuneError("loss 'mpo' has its own generation (NLL) weight; set rpo_alpha (loss.sft_weight) to 0")
    needs_lengths = name in ("simpo", "sft", "mpo") or rpo_alpha > 0
    if needs_lengths and (chosen_lengths is None or (name == "simpo" and rejected_lengths is None)):
        raise VlmtuneError(f"loss {name!r} (or rpo_alpha > 0) needs the completion lengths of the answers")
    if reference_free or (name in ("simpo", "sft") and (ref_chosen is None or ref_rejected is None)):
        ref_chosen, ref_rejected = torch.zeros_like(policy_chosen), torch.zeros_like(policy_rejected)
    elif ref_chosen is None or ref_rejected is None:
        raise VlmtuneError(f"loss {name!r} needs reference log-probs; pass them or set reference_free")

    if name == "simpo":
        out = simpo(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths, beta=beta, **params)
    elif name == "sft":
        rewards = _rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        out = (nll(policy_chosen, chosen_lengths), *rewards)
    elif name == "mpo":
        out = mpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths, beta=beta, **params)
    elif name == "ipo":
        lengths = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
        out = ipo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, **lengths)
    else:
        loss_fn = _WITH_REFERENCE[name]
        out = loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, **params)

    losses, chosen_rewards, rejected_rewards = out
    if rpo_alpha > 0 and name != "sft":  # mpo refused above
        losses = losses + rpo_alpha * nll(policy_chosen, chosen_lengths)
    return losses, chosen_rewards, rejected_rewards


def preference_metrics(
    chosen_rewards: Tensor, rejected_rewards: Tensor, policy_chosen: Tensor, policy_rejected: Tensor
) -> dict[str, float]:
    """Batch means under TRL's metric names, so curves read like those of every other trainer."""
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen.detach().mean().item(),
        "logps/rejected": policy_rejected.detach().mean().item(),
    }
