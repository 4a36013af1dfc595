"""What one micro-batch of each algorithm computes: ``encode(records)`` and ``loss_and_metrics(batch)``.

The loop knows nothing about losses: it asks a step object to turn records into tensors and
tensors into a scalar loss plus a dict of metrics (plain floats, batch means). A new algorithm
(GRPO) is a new step object with the same two methods.

Normalisation, so that the loss does not depend on how a global batch is split across processes
or accumulation steps: every loss is a mean over pairs (or sequences) of a per-pair quantity.
SFT uses the per-sequence mean token NLL, averaged over sequences (the ``sft`` term of
``vlmtune.losses.preference``), not the mean over all tokens of the batch, which would weight a
sequence by its length differently in a batch of 8 than in 8 batches of 1.
"""

from __future__ import annotations


import torch

from vlmtune.batch import EncodedRecordCache, encode_pairs, encode_sft
from vlmtune.config import Config, LossConfig
from vlmtune.forward.plain import plain_pair_logps, sequence_logps
from vlmtune.losses.preference import SHIFTED, RewardShift, nll, preference_loss, preference_metrics
from vlmtune.models.load import reference_forward


class SftStep:
    """Supervised fine-tuning on the chosen answers."""

    def __init__(self, model, processor, max_length: int, encode_cache: EncodedRecordCache | None = None):
        self.model = model
        self.processor = processor
        self.max_length = max_length
        # Each record's processor output is kept, so a record seen again is not decoded again.
        self.encode_cache = encode_cache if encode_cache is not None else EncodedRecordCache()

    def encode(self, records, device="cpu") -> dict:
        inputs = encode_sft(records, self.processor, self.max_length, self.encode_cache)
        return {k: v.to(device) for k, v in inputs.items()}

    def loss_and_metrics(self, batch: dict, model=None) -> tuple[torch.Tensor, dict[str, float]]:
        logps, n_tokens = sequence_logps(model or self.model, batch)
        losses = nll(logps, n_tokens)
        loss = losses.mean()
        return loss, {"loss": loss.item(), "logps/chosen": logps.detach().mean().item()}


class PreferenceStep:
    """A DPO-family loss on pairs: policy and reference log-probs, the loss, TRL's metrics.

    ``reference`` is a separate frozen model (full fine-tuning) or None: the policy with its LoRA
    adapter switched off (``unwrapped`` is the policy outside any distributed wrapper, whose
    adapter can be switched off).
    """

    def __init__(self, model, processor, max_length: int, loss: LossConfig, reference=None, unwrapped=None):
        self.model = model
        self.processor = processor
        self.max_length = max_length
        self.loss = loss
        self.reference = reference
        self.unwrapped = unwrapped if unwrapped is not None else model
        self.needs_reference = loss_needs_reference(loss)
        running = loss.name in SHIFTED and loss.bco_reward_shift == "running"
        self.reward_shift = RewardShift() if running else None

    def encode(self, records, device="cpu"):
        return encode_pairs(records, self.processor, self.max_length).to(device)

    def loss_and_metrics(self, batch, model=None) -> tuple[torch.Tensor, dict[str, float]]:
        policy = plain_pair_logps(model or self.model, batch)
        ref_chosen = ref_rejected = None
        if self.needs_reference:
            ref = self._reference_logps(batch)
            ref_chosen, ref_rejected = ref.chosen, ref.rejected
        delta = self._bco_delta(policy, ref_chosen, ref_rejected, model or self.model)
        return pair_loss(self.loss, policy, ref_chosen, ref_rejected, delta)

    def _bco_delta(self, policy, ref_chosen, ref_rejected, model) -> float:
        return bco_delta(self.reward_shift, self.loss.beta, policy, ref_chosen, ref_rejected, model.training)

    def _reference_logps(self, batch):
        with reference_forward(self.reference, self.unwrapped) as model:
            return plain_pair_logps(model, batch)


def bco_delta(shift: RewardShift | None, beta: float, policy, ref_chosen, ref_rejected, training: bool) -> float:
    """BCO's reward shift for this batch: 0 without a running ``shift``, else its running mean, which
    only training batches move (``policy``: the batch's ``PairLogps``)."""
    if shift is None:
        return 0.0
    if not training:
        return shift.mean
    return shift.update(beta * (policy.chosen - ref_chosen), beta * (policy.rejected - ref_rejected))


def loss_needs_reference(loss: LossConfig) -> bool:
    """Whether a preference loss compares with a reference model: all but SimPO and reference-free ones."""
    return not loss.reference_free and loss.name != "simpo"


def needs_reference(config: Config) -> bool:
    """Whether a run of ``config`` needs a reference model: DPO or online DPO with a loss that compares
    with one (``loss_needs_reference``), KTO, or GRPO with a KL penalty (``grpo.beta > 0``); never SFT or RFT."""
    if config.train.algo == "kto":
        return True
    if config.train.algo in ("dpo", "online_dpo"):
        return loss_needs_reference(config.loss)
    if config.train.algo == "grpo":
        return config.grpo.beta > 0
    return False


def pair_loss(
    loss: LossConfig, policy, ref_chosen, ref_rejected, delta: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured preference loss of a batch of pair log-probs: its mean and TRL's metrics.

    ``delta`` is BCO's reward shift, used (and logged as ``delta``) by bco and mpo only."""
    params = loss.loss_params()
    if loss.name in SHIFTED:
        params["delta"] = delta
    losses, chosen_rewards, rejected_rewards = preference_loss(
        loss.name,
        policy.chosen,
        policy.rejected,
        ref_chosen,
        ref_rejected,
        chosen_lengths=policy.chosen_tokens,
        rejected_lengths=policy.rejected_tokens,
        beta=loss.beta,
        reference_free=loss.reference_free,
        rpo_alpha=loss.sft_weight,
        **params,
    )
    mean = losses.mean()
    metrics = {"loss": mean.item()}
    if loss.name in SHIFTED:
        metrics["delta"] = delta
    metrics.update(preference_metrics(chosen_rewards, rejected_rewards, policy.chosen, policy.rejected))
    return mean, metrics
