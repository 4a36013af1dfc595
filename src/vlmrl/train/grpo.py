"""GRPO for vision-language models: sample G answers per image, score them, push up the better ones.

What one micro-batch does (``GrpoStep``; ``encode`` then ``loss_and_metrics``, like the other steps):

1. **Sample** (``encode``): the chat-templated prompts are encoded once (left-padded, images
   included) and the policy, in eval mode and without gradients, samples ``group_size``
   completions per prompt with the KV cache (temperature, top-p, ``max_new_tokens``). The vision
   special tokens (``<|image_pad|>``, ``<|vision_start|>``, ...) are suppressed at every step,
   as in ``vlmrl.generate``. A completion is cut after its first stop token (``<|im_end|>`` or
   the model's EOS); its mask covers its tokens up to and including that stop token. Completions
   that reach ``max_new_tokens`` without stopping are kept and scored as they are (TRL's default;
   ``completions/clipped_ratio`` reports how many).
2. **Score**: each reward function (built-ins ``count_exact``, ``count_partial``, ``count_format``
   from ``vlmrl.rewards``, or ``package.module:function``) gets the decoded texts and the gold
   ``counts`` of each record (TRL's ``fn(completions, **kwargs)``); the reward is their weighted
   sum.
3. **Advantages**: group-normalised, ``(r − mean_group) / (std_group + 1e-4)`` (GRPO, Shao et al.
   2024, arXiv 2402.03300, Sec. 4.1.2), or ``scale_rewards: none`` for Dr. GRPO's unscaled
   ``r − mean_group`` (Liu et al. 2025, arXiv 2503.20783). A group whose rewards are all equal
   has zero advantages and gives no gradient (``frac_zero_std_groups``).
4. **Update** (``loss_and_metrics``): per-token log-probs of the completions under the policy
   (``vlmrl.forward.group``: the image encoded once per group, one ``prompt | c1 | ... | cG``
   sequence with a block mask), the clipped ratio objective of ``vlmrl.losses.policy`` with
   token-level normalisation by default (DAPO) and, when ``beta > 0``, the k3 KL to the reference
   (the policy with its LoRA adapter off, or a frozen copy). ``beta = 0`` skips the reference pass.

The variant, stated plainly: **one update per batch of samples** (``num_iterations = 1``), so the
"old" log-probs are the current ones detached and the ratio is exactly 1: the clip never acts and
the gradient is the plain policy gradient ``−A · ∇log πθ`` (as in TRL with
``num_iterations=1``); ``clip_fraction`` is 0 by construction. Log-probs use the logits divided
by the sampling temperature (TRL does the same); top-p's truncation is not applied to them.
With gradient accumulation each micro-batch is normalised by its own token count and the loop
averages the micro-batches.

Run it with ``vlmrl train --algo grpo``: the ``grpo:`` section of the config (``GrpoConfig``
in ``vlmrl.config``) holds its settings; ``Trainer`` builds this step for ``train.algo: grpo``
and evaluates held-out records by greedy exact match (``eval/exact_match``).

For example ``vlmrl train --algo grpo --config FILE grpo.group_size=8 grpo.beta=0.04``. ``train.batch_size``
counts prompts (each gives ``group_size`` completions); ``data.max_length`` is not used (the prompt
is never cut; ``max_new_tokens`` bounds the answer).

Records need ``metadata["counts"]`` (every class, zeros included), as the pair builders write.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from vlmrl.config import GrpoConfig
from vlmrl.errors import VlmrlError
from vlmrl.forward.group import GroupBatch, build_group_batch, group_logps
from vlmrl.generate import encode_prompts, stop_token_ids, through_stop, vision_token_ids
from vlmrl.losses.policy import grpo_objective, group_advantages
from vlmrl.models.load import eval_mode, reference_forward
from vlmrl.rewards import count_exact_reward, count_format_reward, count_partial_reward

BUILTIN_REWARDS: dict[str, Callable[..., list[float]]] = {
    "count_exact": count_exact_reward,
    "count_partial": count_partial_reward,
    "count_format": count_format_reward,
}


# ----------------------------------------------------------------------------------- rewards


def resolve_reward(name: str) -> tuple[str, Callable[..., list[float]]]:
    """``(label, function)`` for a built-in name or a ``package.module:function`` path."""
    if name in BUILTIN_REWARDS:
        return name, BUILTIN_REWARDS[name]
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise VlmrlError(
            f"unknown reward {name!r}: use one of {', '.join(BUILTIN_REWARDS)} or a path package.module:function"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise VlmrlError(f"reward {name!r}: cannot import module {module_name!r}: {e}") from e
    function = vars(module).get(attribute)
    if not callable(function):
        raise VlmrlError(f"reward {name!r}: module {module_name!r} has no function {attribute!r}")
    return attribute, function


def score(
    rewards: list[tuple[str, float, Callable]], texts: list[str], columns: dict[str, list]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of every reward function over ``texts``, and each function's own values."""
    per_function = {}
    for label, _, function in rewards:
        values = function(texts, **columns)
        if len(values) != len(texts) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise VlmrlError(
                f"reward {label!r} must return one finite number per completion ({len(texts)}), got {values!r:.200}"
            )
        per_function[label] = torch.tensor(values, dtype=torch.float32)
    total = sum(weight * per_function[label] for label, weight, _ in rewards)
    return total, per_function


# ----------------------------------------------------------------------------------- the step


@dataclass
class GrpoBatch:
    """Sampled completions ready for the update, with what was measured while sampling."""

    group: GroupBatch
    advantages: torch.Tensor  # (N*G,)
    rewards: torch.Tensor  # (N*G,) the weighted sum
    texts: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def to(self, device) -> GrpoBatch:
        return GrpoBatch(self.group.to(device), self.advantages.to(device), self.rewards, self.texts, self.metrics)

    def __len__(self) -> int:
        return len(self.group)


class GrpoStep:
    """GRPO on records with gold counts; see the module docstring for the exact variant.

    ``model`` is what the loop trains (possibly wrapped for distributed training); ``unwrapped``
    the same model outside any wrapper (it samples, and its adapter is switched off for the
    reference); ``reference`` a separate frozen model for full fine-tuning with ``beta > 0``.
    ``sampler`` replaces transformers' generation: a callable ``(records, prompts) -> token ids``
    taking the records and their left-padded processor batch and returning ``group_size`` lists per
    record (a record's together), each cut after its stop token, the stop token kept (``sample``'s
    layout). No sampler ships with vlmrl yet; the hook is there for a faster one.
    """

    def __init__(self, model, processor, config: GrpoConfig, reference=None, unwrapped=None, sampler=None):
        self.model = model
        self.processor = processor
        self.config = config
        self.reference = reference
        self.unwrapped = unwrapped if unwrapped is not None else model
        self.rewards = []  # (label, weight, function)
        for spec in config.rewards:
            label, function = resolve_reward(spec.name)
            self.rewards.append((label, spec.weight, function))
        self.sampler = sampler
        self.vision_ids = vision_token_ids(self.unwrapped, processor)

    def encode(self, records, device="cpu") -> GrpoBatch:
        """Sample ``group_size`` completions per record, score them, and lay them out for the update."""
        if not records:
            raise VlmrlError("no records to encode: the batch is empty")
        counts = [_gold_counts(r) for r in records]
        prompts = encode_prompts([(r.images, r.prompt) for r in records], self.processor)
        if self.sampler is not None:
            completions = self.sampler(records, prompts)
        else:
            completions = self.sample(prompts)
        g = self.config.group_size
        tokenizer = self.processor.tokenizer
        texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
        columns = {
            "counts": [c for c in counts for _ in range(g)],
            "prompts": [r.prompt for r in records for _ in range(g)],
            "metadata": [r.metadata for r in records for _ in range(g)],
        }
        total, per_function = score(self.rewards, texts, columns)
        advantages = group_advantages(total, g, scale=self.config.scale_rewards)
        group = build_group_batch(
            prompts, completions, g, [r.image_slots() for r in records], tokenizer.pad_token_id, self.vision_ids
        )
        metrics = _sampling_metrics(total, per_function, texts, columns["counts"], group, g)
        stop = stop_token_ids(self.unwrapped, self.processor)
        # A completion without its stop token ran into max_new_tokens; it is kept as it is.
        metrics["completions/clipped_ratio"] = sum(not c or c[-1] not in stop for c in completions) / len(completions)
        return GrpoBatch(group, advantages, total, texts, metrics).to(device)

    @torch.no_grad()
    def sample(self, prompts) -> list[list[int]]:
        """``group_size`` sampled completions per prompt (a prompt's together), cut after the stop token."""
        c = self.config
        model = self.unwrapped
        stop = stop_token_ids(model, self.processor)
        with eval_mode(model):
            generated = model.generate(
                **prompts.to(next(model.parameters()).device),
                do_sample=True,
                temperature=c.temperature,
                top_p=c.top_p,
                top_k=0,
                max_new_tokens=c.max_new_tokens,
                num_return_sequences=c.group_size,
                suppress_tokens=self.vision_ids,
                pad_token_id=self.processor.tokenizer.pad_token_id,
            )
        new = generated[:, prompts["input_ids"].shape[1] :].tolist()
        return [through_stop(row, stop) for row in new]

    def loss_and_metrics(self, batch: GrpoBatch, model=None) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        group = batch.group
        logps, entropy = group_logps(model or self.model, group, c.temperature, c.shared_prompt)
        ref_logps = self._reference_logps(group) if c.beta > 0 else None
        loss, objective = grpo_objective(
            logps,
            logps.detach(),  # num_iterations = 1: the sampling policy is the current one (ratio 1)
            batch.advantages,
            group.completion_mask,
            ref_logps=ref_logps,
            beta=c.beta,
            clip_eps=c.clip_eps,
            clip_eps_high=c.clip_eps_high,
            normalize=c.normalize,
            max_tokens=c.max_new_tokens,
        )
        mask = group.completion_mask.to(entropy.dtype)
        metrics = {"loss": loss.item(), **batch.metrics, **objective}
        metrics["entropy"] = ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()
        return loss, metrics

    def _reference_logps(self, group: GroupBatch) -> torch.Tensor:
        with reference_forward(self.reference, self.unwrapped) as model:
            logps, _ = group_logps(model, group, self.config.temperature, self.config.shared_prompt)
        return logps


def _gold_counts(record) -> dict[str, int]:
    counts = record.metadata.get("counts")
    if not isinstance(counts, dict) or not counts:
        raise VlmrlError(
            f"record {record.id}: GRPO scores answers against metadata.counts (the gold count of every class), "
            "which this record lacks; build the data with `vlmrl data` from detections or synthetic scenes"
        )
    return counts


def _sampling_metrics(total, per_function, texts, counts, group: GroupBatch, group_size: int) -> dict[str, float]:
    grouped = total.reshape(-1, group_size)
    lengths = group.completion_attention.sum(1).float()
    metrics = {
        "reward": total.mean().item(),
        "reward_std": total.std().item() if len(total) > 1 else 0.0,
        "em_rate": sum(count_exact_reward(texts, counts)) / len(texts),
        "completion_length": lengths.mean().item(),
        "frac_zero_std_groups": ((grouped.max(1).values - grouped.min(1).values) < 1e-6).float().mean().item(),
        "vision_tokens_masked": float((group.completion_attention - group.completion_mask).sum()),
    }
    for label, values in per_function.items():
        metrics[f"rewards/{label}/mean"] = values.mean().item()
        metrics[f"rewards/{label}/std"] = values.std().item() if len(values) > 1 else 0.0
    return metrics

