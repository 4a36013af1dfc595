"""GRPO for vision-language models: sample G answers per image, score them by the record's task, push up the better ones.

What one optimizer step does (``Trainer`` calls ``generate``, ``micro_batches``, ``loss_and_metrics``):

1. **Sample** (``generate``, once per ``num_iterations`` optimizer steps): the prompts of the whole
   global batch on this process (``batch_size × grad_accum``) are sampled together by
   ``vlmtune.sampling.sample_groups``: each image encoded once, each prompt prefilled once, the KV
   cache copied G ways, ``group_size`` completions per prompt (temperature, top-p,
   ``max_new_tokens``; vision special tokens suppressed; a completion ends with its stop token,
   kept; one that reaches ``max_new_tokens`` is kept as it is, TRL's default,
   ``completions/clipped_ratio`` counts them). The seed is the loop's (run seed, optimizer step,
   process), so the samples depend neither on how the global batch is split into micro-batches nor
   on a resume. The sampler also returns each token's log-prob: the "old" log-probs.
2. **Score**: each reward function (built-ins ``task_accuracy``, ``task_accuracy_iou2``,
   ``task_format`` and the older names ``count_exact``, ``count_partial``, ``count_format``, see
   ``vlmtune.rewards``; or ``package.module:function``) gets the decoded texts and, one per
   completion, the columns ``prompts``, ``images``, ``metadata`` (where the record's task lives)
   and ``counts`` (``metadata.counts`` or None), TRL's ``fn(completions, **kwargs)``; the reward is
   their weighted sum. Every record needs a task (``metadata.task``, or ``metadata.counts`` for
   records of the count family written before tasks existed).
3. **Advantages**: group-normalised, ``(r − mean_group) / (std_group + 1e-4)`` (GRPO, Shao et al.
   2024, arXiv 2402.03300, Sec. 4.1.2), or ``scale_rewards: none`` for Dr. GRPO's unscaled
   ``r − mean_group`` (Liu et al. 2025, arXiv 2503.20783). A group whose rewards are all equal
   has zero advantages and gives no gradient (``frac_reward_zero_std``).
4. **Update** (``micro_batches`` then ``loss_and_metrics`` per micro-batch): per-token log-probs of
   the completions under the policy (``vlmtune.forward.group``: the image encoded once per group, one
   ``prompt | c1 | ... | cG`` sequence with a block mask), the clipped ratio objective of
   ``vlmtune.losses.policy`` and, when ``beta > 0``, the k3 KL to the reference (the policy with its
   LoRA adapter off, or a frozen copy). ``beta = 0`` skips the reference pass.

The variant, stated plainly: the loop keeps each generation batch (``Generation``) and updates on it
``num_iterations`` (μ) times, one optimizer step each (GRPO's μ, TRL's ``num_iterations``). On the
first update the weights are still those that sampled, so the old log-probs are the current ones
detached: the ratio is exactly 1 and the gradient is the plain policy gradient ``−A · ∇log πθ``
(with μ = 1, the default, that is all, as in TRL). On the later updates the old log-probs are the
sampler's (or, for a ``sampler`` hook that returns token ids only, those of one no-grad pass right
after sampling), so the ratio moves and PPO's clip with ``clip_eps`` / ``clip_eps_high`` acts
(``clip_fraction``, ``clip_ratio/*``). The sampler's log-probs are those of the sampling forward in
eval mode, equal to the update pass's within 1e-5 in fp32; with LoRA dropout the update pass (train
mode) differs by its dropout noise, and under bf16 autocast by its rounding. Log-probs use
the logits divided by the sampling temperature (TRL does the same); top-p's truncation is not
applied to them. The token-level loss is normalised by the token count of the whole global batch
(every micro-batch of the optimizer step, every process; DAPO, TRL): the loss is that batch's token
mean however it is split into micro-batches and processes; ``sequence`` and ``constant``
normalisation count its completions instead.

Run it with ``vlmtune train --algo grpo``: the ``grpo:`` section of the config (``GrpoConfig``
in ``vlmtune.config``) holds its settings; ``Trainer`` builds this step for ``train.algo: grpo``
and evaluates held-out records by the greedy answer's task score (``eval/accuracy``).

For example ``vlmtune train --algo grpo --config FILE grpo.group_size=8 grpo.beta=0.04``. ``train.batch_size``
counts prompts (each gives ``group_size`` completions); ``data.max_length`` is not used (the prompt
is never cut; ``max_new_tokens`` bounds the answer).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from vlmtune.config import GrpoConfig
from vlmtune.errors import VlmtuneError
from vlmtune.forward.group import GroupBatch, build_group_batch, group_logps
from vlmtune.generate import encode_prompts, stop_token_ids, vision_token_ids
from vlmtune.losses.policy import grpo_objective, group_advantages, loss_units
from vlmtune.models.load import eval_mode, reference_forward
from vlmtune.rewards import count_exact_reward, count_format_reward, count_partial_reward
from vlmtune.sampling.sampler import GroupSamples, sample_groups
from vlmtune.tasks.core import task_of
from vlmtune.tasks.rewards import TASK_REWARDS, task_accuracy_reward

BUILTIN_REWARDS: dict[str, Callable[..., list[float]]] = {
    **TASK_REWARDS,
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
        raise VlmtuneError(
            f"unknown reward {name!r}: use one of {', '.join(BUILTIN_REWARDS)} or a path package.module:function"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise VlmtuneError(f"reward {name!r}: cannot import module {module_name!r}: {e}") from e
    function = vars(module).get(attribute)
    if not callable(function):
        raise VlmtuneError(f"reward {name!r}: module {module_name!r} has no function {attribute!r}")
    return attribute, function


def score(
    rewards: list[tuple[str, float, Callable]], texts: list[str], columns: dict[str, list]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of every reward function over ``texts``, and each function's own values."""
    per_function = {}
    for label, _, function in rewards:
        values = function(texts, **columns)
        if len(values) != len(texts) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise VlmtuneError(
                f"reward {label!r} must return one finite number per completion ({len(texts)}), got {values!r:.200}"
            )
        per_function[label] = torch.tensor(values, dtype=torch.float32)
    total = sum(weight * per_function[label] for label, weight, _ in rewards)
    return total, per_function


# ----------------------------------------------------------------------------------- the batches


@dataclass
class Generation:
    """One sampling of a global batch, scored: what the loop keeps and updates on ``num_iterations`` times.

    ``completions``: ``group_size`` token-id lists per record (a record's together), each through
    its stop token. ``old_logps``: ``(N*G, T)`` float32 log-probs of the sampling policy, 0 on
    padding (None when μ = 1 and the sampler gave none: never needed). ``updates``: how many
    optimizer steps have used it.
    """

    records: list
    completions: list[list[int]]
    old_logps: torch.Tensor | None
    rewards: torch.Tensor  # (N*G,) the weighted sum
    advantages: torch.Tensor  # (N*G,)
    texts: list[str]
    metrics: dict[str, float]
    updates: int = 0

    def state_dict(self) -> dict:
        """Everything but the records, as ``torch.load(weights_only=True)`` reads it back."""
        return {"completions": self.completions, "old_logps": self.old_logps, "rewards": self.rewards,
                "advantages": self.advantages, "texts": self.texts, "metrics": self.metrics, "updates": self.updates}

    @classmethod
    def from_state(cls, state: dict, records: list) -> Generation:
        return cls(records, **state)


@dataclass
class GrpoBatch:
    """One micro-batch of a generation, ready for the update.

    ``old_logps`` None: the update is the first on these samples, the current log-probs detached
    are the old ones. ``denominator``: what the summed loss is divided by (None: this micro-batch's
    own count; see ``vlmtune.losses.policy.grpo_objective``).
    """

    group: GroupBatch
    advantages: torch.Tensor  # (N*G,)
    rewards: torch.Tensor  # (N*G,) the weighted sum
    old_logps: torch.Tensor | None = None
    denominator: float | None = None
    texts: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def to(self, device) -> GrpoBatch:
        old = self.old_logps.to(device) if self.old_logps is not None else None
        return GrpoBatch(self.group.to(device), self.advantages.to(device), self.rewards, old, self.denominator,
                         self.texts, self.metrics)

    def __len__(self) -> int:
        return len(self.group)


def sampling_seed(run_seed: int, step: int, process: int, processes: int) -> int:
    """The sampler's seed for a generation made at optimizer ``step``: one per run, step and process."""
    return (run_seed * 1_000_003 + step) * processes + process


# ----------------------------------------------------------------------------------- the step


class GrpoStep:
    """GRPO on records with a task; see the module docstring for the exact variant.

    ``model`` is what the loop trains (possibly wrapped for distributed training); ``unwrapped``
    the same model outside any wrapper (it samples, and its adapter is switched off for the
    reference); ``reference`` a separate frozen model for full fine-tuning with ``beta > 0``.
    ``sampler`` replaces ``vlmtune.sampling.sample_groups``: a callable ``(records, prompts)`` taking
    the records and their left-padded processor batch and returning either a ``GroupSamples`` (its
    log-probs then serve as the old ones) or ``group_size`` token-id lists per record (a record's
    together), each cut after its stop token, the stop token kept; with μ > 1 the old log-probs of
    token ids are then computed by one no-grad pass.
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

    def generate(self, records, seed: int = 0) -> Generation:
        """Sample ``group_size`` completions per record (all records in one batch) and score them."""
        if not records:
            raise VlmtuneError("no records to encode: the batch is empty")
        for record in records:
            record_task(record)
        c, g = self.config, self.config.group_size
        completions, old_logps, stopped = self._sample(records, seed)
        tokenizer = self.processor.tokenizer
        texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in completions]
        columns = reward_columns(records, g)
        total, per_function = score(self.rewards, texts, columns)
        advantages = group_advantages(total, g, scale=c.scale_rewards)
        accuracy = task_accuracy_reward(texts, columns["metadata"])
        masked = sum(t in self.vision_ids for ids in completions for t in ids)
        metrics = sampling_metrics(total, per_function, accuracy, [len(ids) for ids in completions], stopped, g)
        metrics["vision_tokens_masked"] = float(masked)
        generation = Generation(list(records), completions, old_logps, total, advantages, texts, metrics)
        if generation.old_logps is None and c.num_iterations > 1:
            generation.old_logps = self._logps_without_grad(generation)
        return generation

    def _sample(self, records, seed: int) -> tuple[list[list[int]], torch.Tensor | None, list[bool]]:
        """``(completions, their log-probs or None, whether each ended with a stop token)``."""
        c = self.config
        items = [(r.images, r.prompt) for r in records]
        if self.sampler is None:
            samples = sample_groups(self.unwrapped, self.processor, items, c.group_size, c.max_new_tokens,
                                    c.temperature, c.top_p, seed=seed)
        else:
            samples = self.sampler(records, encode_prompts(items, self.processor))
        if isinstance(samples, GroupSamples):
            return samples.completions(), samples.logps, samples.stopped.tolist()
        stop = stop_token_ids(self.unwrapped, self.processor)
        return samples, None, [bool(ids) and ids[-1] in stop for ids in samples]

    @torch.no_grad()
    def _logps_without_grad(self, generation: Generation) -> torch.Tensor:
        """The sampling policy's log-probs of a generation, by one pass in eval mode (hooks without log-probs)."""
        device = next(self.unwrapped.parameters()).device
        (batch,) = self.micro_batches(generation, 1, device=device)
        with eval_mode(self.unwrapped):
            logps, _ = group_logps(self.unwrapped, batch.group, self.config.temperature, self.config.shared_prompt)
        return logps.float().cpu()

    def loss_units(self, generation: Generation) -> float:
        """This generation's count of what the loss is normalised by (``grpo.normalize``): tokens or completions."""
        width = max(1, max(len(ids) for ids in generation.completions))
        mask = torch.zeros((len(generation.completions), width))
        for row, ids in enumerate(generation.completions):
            mask[row, : len(ids)] = torch.tensor([t not in self.vision_ids for t in ids], dtype=mask.dtype)
        return loss_units(mask, self.config.normalize, self.config.max_new_tokens)

    def micro_batches(self, generation: Generation, parts: int, denominator: float | None = None,
                      device="cpu") -> list[GrpoBatch]:
        """The generation split into ``parts`` micro-batches of consecutive records, laid out for the update.

        The old log-probs go with them from the second update on (``generation.updates > 0``).
        """
        n, g = len(generation.records), self.config.group_size
        if n % parts:
            raise VlmtuneError(f"{n} records do not split into {parts} equal micro-batches")
        size = n // parts
        pad = self.processor.tokenizer.pad_token_id
        batches = []
        for first in range(0, n, size):
            records = generation.records[first : first + size]
            rows = slice(first * g, (first + size) * g)
            prompts = encode_prompts([(r.images, r.prompt) for r in records], self.processor)
            group = build_group_batch(prompts, generation.completions[rows], g, [r.image_slots() for r in records],
                                      pad, self.vision_ids)
            old = None
            if generation.updates > 0:
                old = _fit_width(generation.old_logps[rows], group.completion_ids.shape[1])
            batch = GrpoBatch(group, generation.advantages[rows], generation.rewards[rows], old, denominator,
                              generation.texts[rows], generation.metrics)
            batches.append(batch.to(device))
        return batches

    def encode(self, records, device="cpu", seed: int = 0) -> GrpoBatch:
        """Sample and score ``records`` and lay them out as one batch for a first update (ratio 1)."""
        return self.micro_batches(self.generate(records, seed), 1, device=device)[0]

    def loss_and_metrics(self, batch: GrpoBatch, model=None) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        group = batch.group
        logps, entropy = group_logps(model or self.model, group, c.temperature, c.shared_prompt)
        ref_logps = self._reference_logps(group) if c.beta > 0 else None
        # First update on these samples: the weights are the sampling ones, so the ratio is exactly 1.
        old_logps = logps.detach() if batch.old_logps is None else batch.old_logps
        loss, objective = grpo_objective(
            logps,
            old_logps,
            batch.advantages,
            group.completion_mask,
            ref_logps=ref_logps,
            beta=c.beta,
            clip_eps=c.clip_eps,
            clip_eps_high=c.clip_eps_high,
            normalize=c.normalize,
            max_tokens=c.max_new_tokens,
            denominator=batch.denominator,
        )
        mask = group.completion_mask.to(entropy.dtype)
        metrics = {"loss": loss.item(), **batch.metrics, **objective}
        metrics["entropy"] = ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()
        return loss, metrics

    def _reference_logps(self, group: GroupBatch) -> torch.Tensor:
        with reference_forward(self.reference, self.unwrapped) as model:
            logps, _ = group_logps(model, group, self.config.temperature, self.config.shared_prompt)
        return logps


def _fit_width(logps: torch.Tensor, width: int) -> torch.Tensor:
    """``logps`` cut or zero-padded on the right to ``width`` columns."""
    if logps.shape[1] >= width:
        return logps[:, :width]
    return torch.nn.functional.pad(logps, (0, width - logps.shape[1]))


def reward_columns(records, repeat: int = 1) -> dict[str, list]:
    """The keyword columns every reward function gets beside the texts (TRL's ``fn(completions, **kwargs)``),
    each record's values repeated ``repeat`` times (its completions are together)."""
    return {
        "prompts": [r.prompt for r in records for _ in range(repeat)],
        "images": [r.images for r in records for _ in range(repeat)],
        "metadata": [r.metadata for r in records for _ in range(repeat)],
        "counts": [r.metadata.get("counts") for r in records for _ in range(repeat)],
    }


def record_task(record):
    """The task of a record (``vlmtune.tasks.core.task_of``), or a ``VlmtuneError`` naming the record."""
    try:
        return task_of(record.metadata)
    except VlmtuneError as e:
        raise VlmtuneError(
            f"record {record.id}: GRPO scores answers by the record's task, but {e}; build the data with "
            "`vlmtune data tasks` (metadata.task) or `vlmtune data` from detections or synthetic scenes (metadata.counts)"
        ) from e


def sampling_metrics(total, per_function, accuracy, lengths, stopped, group_size: int) -> dict[str, float]:
    """What a generation measured, under TRL GRPOTrainer's names and vlmtune's own (see ``metrics_log``)."""
    grouped = total.reshape(-1, group_size)
    zero_std = ((grouped.max(1).values - grouped.min(1).values) < 1e-6).float().mean().item()
    lengths = torch.tensor(lengths, dtype=torch.float32)
    metrics = {
        "reward": total.mean().item(),
        "reward_std": total.std().item() if len(total) > 1 else 0.0,
        "frac_reward_zero_std": zero_std,
        "frac_zero_std_groups": zero_std,
        "em_rate": sum(accuracy) / len(accuracy),
        "completion_length": lengths.mean().item(),
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": sum(not s for s in stopped) / len(stopped),
    }
    for label, values in per_function.items():
        metrics[f"rewards/{label}/mean"] = values.mean().item()
        metrics[f"rewards/{label}/std"] = values.std().item() if len(values) > 1 else 0.0
    return metrics
