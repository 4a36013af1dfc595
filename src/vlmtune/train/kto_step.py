"""KTO's micro-batch (``--algo kto``): records with one answer each, desirable or undesirable.

KTO (Ethayarajh et al. 2024, arXiv 2402.01306; the loss is ``vlmtune.losses.unpaired.kto``) scores
each answer's implicit reward ``β·(log π(y|x) − log π_ref(y|x))`` against a reference point z0, an
estimate of KL(π‖π_ref) taken on mismatched pairs: record i's prompt (and images) with the answer
of record ``kl_pairing(B)[i]`` = i − 1 of the same micro-batch, as TRL's KTOTrainer pairs them.
A micro-batch is therefore two batches of rows, ``answers`` (prompt i | answer i) and
``mismatched`` (prompt i | answer i − 1), and a step runs four forward passes: the policy on
``answers`` with gradients, the policy on ``mismatched`` without (z0 is detached, so no gradient
would reach it), and the reference (the adapter switched off, or the frozen copy of full
fine-tuning) on both.

Metrics carry TRL's KTO names: ``loss``, ``kl`` (z0), ``rewards/chosen`` / ``logps/chosen`` (means
over the desirable answers), ``rewards/rejected`` / ``logps/rejected`` (over the undesirable ones)
and ``rewards/margins``. A micro-batch without desirable (or undesirable) answers has no mean for
that side: it is NaN there (TRL logs nothing), which TensorBoard leaves out; the loss is always
defined. A batch of one record would pair its prompt with its own answer, so the config asks for
``train.batch_size`` of at least 2; a held-out batch of one (the last one) does pair it with itself.

Departs from TRL in one place: z0 is the mean over this process's micro-batch, where TRL also
averages it over processes. So, unlike the pair losses (``steps``), KTO's curve depends on how a
global batch is split into micro-batches and processes, as z0 is estimated on each part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmtune.batch import EncodedRecordCache, RecordEncoding, collate_sft
from vlmtune.config import LossConfig
from vlmtune.data.records import PreferenceRecord
from vlmtune.errors import VlmtuneError
from vlmtune.forward.plain import sequence_logps
from vlmtune.losses.unpaired import kl_pairing, kl_reference_point, kto
from vlmtune.models.load import reference_forward


@dataclass
class KtoBatch:
    """Model inputs of ``answers`` (prompt i | answer i) and ``mismatched`` (prompt i | answer
    ``kl_pairing(B)[i]``), and ``desirable`` (B,) bool, each record's label."""

    answers: dict
    mismatched: dict
    desirable: torch.Tensor

    def to(self, device) -> KtoBatch:
        return KtoBatch({k: v.to(device) for k, v in self.answers.items()},
                        {k: v.to(device) for k, v in self.mismatched.items()}, self.desirable.to(device))


def encode_unpaired(records: list[PreferenceRecord], processor, max_length: int,
                    cache: EncodedRecordCache) -> KtoBatch:
    """The KTO batch of unpaired records; a pair here is a bug upstream (``load_records(kto=True)`` splits them)."""
    paired = [r.id for r in records if not r.is_unpaired]
    if paired:
        raise VlmtuneError(f"records {', '.join(paired)} are pairs; KTO takes unpaired records "
                         "(load them with load_records(..., kto=True), which splits pairs)")
    encodings = [cache.get(r, processor, max_length) for r in records]
    answers = [e.chosen if r.label else e.rejected for r, e in zip(records, encodings)]
    other = kl_pairing(len(records))

    def rows(answer_of: list[list[int]]) -> dict:
        # collate_sft labels the "chosen" side of each encoding: here, the answer given to prompt i.
        return collate_sft([RecordEncoding(e.prompt, a, []) for e, a in zip(encodings, answer_of)],
                           processor, max_length)

    return KtoBatch(rows(answers), rows([answers[j] for j in other]),
                    torch.tensor([bool(r.label) for r in records]))


class KtoStep:
    """KTO on unpaired records; ``reference`` is a frozen model (full fine-tuning) or None: ``unwrapped``
    (the policy outside any distributed wrapper) with its adapter switched off."""

    def __init__(self, model, processor, max_length: int, loss: LossConfig, reference=None, unwrapped=None):
        self.model = model
        self.processor = processor
        self.max_length = max_length
        self.loss = loss
        self.reference = reference
        self.unwrapped = unwrapped if unwrapped is not None else model
        self.encode_cache = EncodedRecordCache()

    def encode(self, records, device="cpu") -> KtoBatch:
        return encode_unpaired(records, self.processor, self.max_length, self.encode_cache).to(device)

    def loss_and_metrics(self, batch: KtoBatch, model=None) -> tuple[torch.Tensor, dict[str, float]]:
        model = model or self.model
        policy, _ = sequence_logps(model, batch.answers)
        with torch.no_grad():
            policy_mismatched, _ = sequence_logps(model, batch.mismatched)
        with reference_forward(self.reference, self.unwrapped) as reference:
            ref, _ = sequence_logps(reference, batch.answers)
            ref_mismatched, _ = sequence_logps(reference, batch.mismatched)
        z0 = kl_reference_point(policy_mismatched, ref_mismatched)
        losses, chosen_rewards, rejected_rewards = kto(
            policy, ref, batch.desirable, z0, beta=self.loss.beta,
            desirable_weight=self.loss.kto_desirable_weight, undesirable_weight=self.loss.kto_undesirable_weight,
        )
        loss = losses.mean()
        return loss, kto_metrics(loss, z0, chosen_rewards, rejected_rewards, policy.detach(), batch.desirable)


def kto_metrics(loss, z0, chosen_rewards, rejected_rewards, policy_logps, desirable) -> dict[str, float]:
    """TRL's KTO metrics of one micro-batch; a side with no answers is NaN (see the module docstring)."""
    def mean(values: torch.Tensor) -> float:
        return values.float().mean().item() if values.numel() else float("nan")

    metrics = {
        "loss": loss.item(),
        "kl": z0.item(),
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "logps/chosen": mean(policy_logps[desirable]),
        "logps/rejected": mean(policy_logps[~desirable]),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics
