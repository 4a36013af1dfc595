"""Online DPO and rejection-sampling fine-tuning: train on the policy's own fresh samples, judged.

Both steps start the same way (``GroupSampler.draw``), once per micro-batch:

1. **Sample**: ``online.group_size`` (k) answers per prompt from the current policy with
   ``vlmtune.sampling.sample_groups`` (images encoded once, prompts prefilled once, the cache copied
   k ways; ``online.temperature`` and ``online.top_p``; vision special tokens suppressed; an
   answer ends after its stop token, which it keeps). The sampler's seed is drawn from torch's
   global generator, whose state every checkpoint saves, so a resumed run draws the same answers.
2. **Judge** (``online.judge``): the weighted sum of ``online.rewards`` (default: the record's task
   reward, ``vlmtune.tasks.rewards``, accuracy plus format) through ``vlmtune.judges.RewardJudge``; or
   an HTTP or local VLM judge rating each answer (``judge_mode: score``), or comparing every two
   answers of a prompt in both orders (``judge_mode: pairwise``; a disagreement between the
   orders is a tie, counted in ``judge/inconsistent``), an answer's reward then being its wins minus
   its losses (Copeland). An answer the judge failed on has no reward: it is in no pair and never
   kept (``judge/failures``).

Then:

- ``OnlineDpoStep`` (``--algo online_dpo``; Guo et al. 2024, "Direct language model alignment
  from online AI feedback", arXiv 2402.04792) forms pairs per prompt (``form_pairs``: best against
  worst, or every two answers, ``online.pairs``; a reward difference of at most ``online.margin``
  is a tie, dropped and counted) and takes a step of the configured DPO-family loss
  (``loss.name``, DPOP by default for this algorithm; ``vlmtune.losses.preference`` through
  ``vlmtune.train.steps.pair_loss``). The k answers of a prompt are scored in one
  ``prompt | a1 | ... | ak`` row (``vlmtune.forward.group``), their per-token log-probs summed per
  answer, under the policy and under the reference (the adapter off, or the frozen copy): a pair
  costs no second prompt pass. Only prompts with at least one pair are run; a micro-batch without
  any pair runs its first prompt's group and contributes a zero loss (no gradient), with every
  pair metric 0 and ``pairs/formed`` 0.
- ``RftStep`` (``--algo rft``; rejection-sampling fine-tuning, RAFT / ReST-style, the control
  that sees exactly what the reward sees) keeps each prompt's best answer that ended with its stop
  token (a cut-off answer is never kept) when its reward is at least ``online.rft_threshold``
  (always, when None) and takes an SFT step on the kept answers: the per-sequence mean token
  NLL averaged over answers, as ``SftStep``, under the distribution the answers were sampled
  from (logits divided by ``online.temperature``, as GRPO scores). Under the model's own
  distribution, SFT on answers drawn at a temperature T > 1 pulls the model towards its own
  flattened copy, step after step, whatever the judge keeps: its entropy grows until answers no
  longer stop (issue 13: the stop share fell from 0.9 to under 0.1 in 50 steps at T = 1.2).
  Scored at T, SFT on unselected samples moves nothing on average (E_q[grad log q] = 0): the
  selection alone teaches. A micro-batch with nothing kept contributes a zero loss, as above.

Log-probs of the online DPO update use the model's own distribution (logits not divided by the
sampling temperature, as TRL's online DPO does). Metrics carry TRL's online-DPO names where they
exist (``objective/scores``, ``objective/scores_margin``, ``objective/kl``, ``objective/entropy``,
``val/contain_eos_token``, ``beta``, ``rewards/*``, ``logps/*``) plus ``pairs/formed``,
``pairs/dropped_ties``, ``pairs/chosen_reward`` and ``pairs/rejected_reward`` (the judge's
rewards of the chosen and rejected answers), per micro-batch and averaged by the loop.

For example::

    vlmtune train --algo online_dpo --config configs/demo-cpu.yaml online.group_size=8 loss.name=dpop
    vlmtune train --algo rft --config configs/demo-cpu.yaml online.rft_threshold=1.0
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmtune.config import LossConfig, OnlineConfig
from vlmtune.errors import VlmtuneError
from vlmtune.forward.group import GroupBatch, build_group_batch, group_logps
from vlmtune.forward.plain import PairLogps
from vlmtune.generate import encode_prompts, vision_token_ids
from vlmtune.judges import HttpVlmJudge, LocalVlmJudge, RewardJudge
from vlmtune.losses.preference import SHIFTED, RewardShift, nll
from vlmtune.models.load import reference_forward
from vlmtune.sampling.sampler import sample_groups
from vlmtune.train.steps import bco_delta, loss_needs_reference, pair_loss

# ----------------------------------------------------------------------------------- pairs


def form_pairs(rewards: list[float | None], mode: str = "best_worst", margin: float = 0.0):
    """Preference pairs among one prompt's answers: ``([(chosen, rejected), ...], ties dropped)``.

    ``rewards[j]`` is answer j's reward, ``None`` where the judge failed (such an answer is in no
    pair). Two answers whose rewards differ by at most ``margin`` are a tie. ``best_worst``: one
    pair, the first best answer against the first worst, or one tie; ``all``: every two answers,
    the better one chosen, each tie counted.

    >>> form_pairs([0.0, 1.0, 0.5, 1.0])
    ([(1, 0)], 0)
    >>> form_pairs([1.0, 0.0, 0.9, None], "all", margin=0.2)
    ([(0, 1), (2, 1)], 1)
    """
    scored = [j for j, r in enumerate(rewards) if r is not None]
    if len(scored) < 2:
        return [], 0
    if mode == "best_worst":
        best = max(scored, key=lambda j: rewards[j])  # max and min keep the first of equals
        worst = min(scored, key=lambda j: rewards[j])
        return ([], 1) if rewards[best] - rewards[worst] <= margin else ([(best, worst)], 0)
    if mode != "all":
        raise VlmtuneError(f"unknown pairing {mode!r}: use best_worst or all")
    pairs, ties = [], 0
    for position, a in enumerate(scored):
        for b in scored[position + 1 :]:
            difference = rewards[a] - rewards[b]
            if abs(difference) <= margin:
                ties += 1
            else:
                pairs.append((a, b) if difference > 0 else (b, a))
    return pairs, ties


def copeland(verdicts: dict[tuple[int, int], int | None], k: int) -> list[float | None]:
    """Each of k answers' wins minus losses over the pairwise ``verdicts`` (+1: the first better).

    An answer every one of whose comparisons failed (``None``) has no reward.

    >>> copeland({(0, 1): 1, (0, 2): 0, (1, 2): None}, 3)
    [1.0, -1.0, 0.0]
    """
    wins = [0.0] * k
    judged = [False] * k
    for (a, b), verdict in verdicts.items():
        if verdict is None:
            continue
        wins[a] += verdict
        wins[b] -= verdict
        judged[a] = judged[b] = True
    return [w if seen else None for w, seen in zip(wins, judged)]


# ----------------------------------------------------------------------------------- sampling + judging


def build_judge(config: OnlineConfig, trust_remote_code: bool = False):
    """The judge ``online.judge`` names (see ``vlmtune.judges``)."""
    if config.judge == "reward":
        return RewardJudge([(spec.name, spec.weight) for spec in config.rewards])
    if config.judge == "http":
        return HttpVlmJudge(config.judge_url, config.judge_model, key_env=config.judge_key_env,
                            cache_dir=config.judge_cache)
    return LocalVlmJudge(config.judge_model, cache_dir=config.judge_cache, trust_remote_code=trust_remote_code)


@dataclass
class Drawn:
    """k judged answers per record (a record's together): token ids, texts, rewards, what was measured."""

    records: list
    prompts: object  # the sampler's processor batch of every record
    completions: list[list[int]]
    texts: list[str]
    stopped: list[bool]  # per answer: it ended with its stop token (False: cut off at max_new_tokens)
    rewards: list[list[float | None]]  # per record, k each
    metrics: dict[str, float]


class GroupSampler:
    """Samples k answers per record from ``model`` and has ``judge`` reward them (module docstring, 1-2)."""

    def __init__(self, model, processor, config: OnlineConfig, judge):
        self.model = model
        self.processor = processor
        self.config = config
        self.judge = judge

    def draw(self, records) -> Drawn:
        """k answers per record from the current policy, judged; seeded from torch's global generator."""
        if not records:
            raise VlmtuneError("no records to encode: the batch is empty")
        c, k = self.config, self.config.group_size
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # torch's global state is in every checkpoint
        samples = sample_groups(self.model, self.processor, [(r.images, r.prompt) for r in records], k,
                                c.max_new_tokens, temperature=c.temperature, top_p=c.top_p, seed=seed)
        rewards, metrics = self._judge(records, samples.texts)
        scored = [r for group in rewards for r in group if r is not None]
        metrics.update({
            "objective/scores": sum(scored) / len(scored) if scored else 0.0,
            "val/contain_eos_token": samples.stopped.float().mean().item(),
            "completions/mean_length": samples.mask.sum(1).float().mean().item(),
        })
        return Drawn(list(records), samples.prompts, samples.completions(), samples.texts,
                     samples.stopped.tolist(), rewards, metrics)

    def _judge(self, records, texts: list[str]) -> tuple[list[list[float | None]], dict[str, float]]:
        """Each record's k rewards (None: the judge failed), and ``judge/failures`` (answers, or pairwise: pairs)."""
        k = self.config.group_size
        if self.config.judge_mode == "pairwise":
            return self._judge_pairwise(records, texts)
        result = self.judge.score([r for r in records for _ in range(k)], texts)
        scores = result.scores
        return [scores[i * k : (i + 1) * k] for i in range(len(records))], {"judge/failures": float(result.failures)}

    def _judge_pairwise(self, records, texts: list[str]) -> tuple[list[list[float | None]], dict[str, float]]:
        """Every two answers of a record compared in both orders; rewards by ``copeland``.

        ``judge/inconsistent`` counts the pairs whose two orders disagreed (ties, position bias)."""
        k = self.config.group_size
        index = [(i, a, b) for i in range(len(records)) for a in range(k) for b in range(a + 1, k)]
        asked = [(records[i], texts[i * k + a], texts[i * k + b]) for i, a, b in index]
        preferences = self.judge.prefer_many(asked)
        per_record = [{} for _ in records]
        for (i, a, b), verdict in zip(index, preferences.verdicts):
            per_record[i][(a, b)] = verdict
        metrics = {"judge/failures": float(preferences.failures), "judge/inconsistent": float(preferences.inconsistent)}
        return [copeland(v, k) for v in per_record], metrics


def group_batch_of(drawn: Drawn, rows: list[int], completions: list[list[int]], group_size: int,
                   processor, vision_ids) -> GroupBatch:
    """The group batch of the records at ``rows`` with ``completions`` (``group_size`` per record).

    The sampler's prompt batch is reused when every record is kept; otherwise the kept prompts
    are encoded again (the processor batch holds every image's patches in one tensor)."""
    records = [drawn.records[i] for i in rows]
    if rows == list(range(len(drawn.records))):
        prompts = drawn.prompts
    else:
        prompts = encode_prompts([(r.images, r.prompt) for r in records], processor)
    return build_group_batch(prompts, completions, group_size, [r.image_slots() for r in records],
                             processor.tokenizer.pad_token_id, vision_ids)


def summed_logps(model, group: GroupBatch, shared_prompt: bool, temperature: float = 1.0):
    """Each answer's log-prob summed over its tokens, ``(rows,)``, and its token count.

    The logits are divided by ``temperature`` first (1: the model's own distribution)."""
    logps, _ = group_logps(model, group, temperature, shared_prompt)
    return logps.sum(1), group.completion_mask.sum(1)


# ----------------------------------------------------------------------------------- online DPO


@dataclass
class OnlinePairs:
    """One micro-batch of online DPO: the groups that gave pairs, and which rows are chosen and rejected."""

    group: GroupBatch
    chosen: torch.Tensor  # (P,) row indices into the group's answers
    rejected: torch.Tensor
    chosen_reward: torch.Tensor  # (P,) the judge's rewards
    rejected_reward: torch.Tensor
    sources: list[int]  # the group's prompts: their positions among the micro-batch's records
    metrics: dict[str, float] = field(default_factory=dict)

    def to(self, device) -> OnlinePairs:
        return OnlinePairs(self.group.to(device), self.chosen.to(device), self.rejected.to(device),
                           self.chosen_reward, self.rejected_reward, self.sources, self.metrics)

    def __len__(self) -> int:
        return len(self.chosen)


class OnlineDpoStep:
    """Online DPO: pairs from the policy's own judged samples, a DPO-family step (module docstring).

    ``model`` is what the loop trains; ``unwrapped`` the same model outside any distributed wrapper
    (it samples, and its adapter is switched off for the reference); ``reference`` a frozen copy
    for full fine-tuning, or None.
    """

    def __init__(self, model, processor, config: OnlineConfig, loss: LossConfig, judge, reference=None,
                 unwrapped=None):
        self.model = model
        self.processor = processor
        self.config = config
        self.loss = loss
        self.reference = reference
        self.unwrapped = unwrapped if unwrapped is not None else model
        self.sampler = GroupSampler(self.unwrapped, processor, config, judge)
        self.vision_ids = vision_token_ids(self.unwrapped, processor)
        self.needs_reference = loss_needs_reference(loss)
        running = loss.name in SHIFTED and loss.bco_reward_shift == "running"
        self.reward_shift = RewardShift() if running else None

    def encode(self, records, device="cpu") -> OnlinePairs:
        drawn = self.sampler.draw(records)
        k = self.config.group_size
        per_record = [form_pairs(r, self.config.pairs, self.config.margin) for r in drawn.rewards]
        rows = [i for i, (pairs, _) in enumerate(per_record) if pairs] or [0]
        chosen, rejected, chosen_reward, rejected_reward = [], [], [], []
        for position, i in enumerate(rows):
            for c, r in per_record[i][0]:
                chosen.append(position * k + c)
                rejected.append(position * k + r)
                chosen_reward.append(drawn.rewards[i][c])
                rejected_reward.append(drawn.rewards[i][r])
        completions = [drawn.completions[i * k + j] for i in rows for j in range(k)]
        group = group_batch_of(drawn, rows, completions, k, self.processor, self.vision_ids)
        metrics = {**drawn.metrics, "pairs/formed": float(len(chosen)),
                   "pairs/dropped_ties": float(sum(ties for _, ties in per_record))}
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype)  # noqa: E731
        return OnlinePairs(group, as_tensor(chosen, torch.long), as_tensor(rejected, torch.long),
                           as_tensor(chosen_reward, torch.float32), as_tensor(rejected_reward, torch.float32),
                           rows, metrics).to(device)

    def loss_and_metrics(self, batch: OnlinePairs, model=None) -> tuple[torch.Tensor, dict[str, float]]:
        model = model or self.model
        logps, tokens = summed_logps(model, batch.group, self.config.shared_prompt)
        ref_logps = self._reference_logps(batch.group) if self.needs_reference else None
        if len(batch) == 0:
            return logps.sum() * 0.0, {**self._empty_metrics(ref_logps is not None), **batch.metrics}
        policy = PairLogps(logps[batch.chosen], logps[batch.rejected], tokens[batch.chosen], tokens[batch.rejected])
        ref_chosen = ref_logps[batch.chosen] if ref_logps is not None else None
        ref_rejected = ref_logps[batch.rejected] if ref_logps is not None else None
        delta = bco_delta(self.reward_shift, self.loss.beta, policy, ref_chosen, ref_rejected, model.training)
        loss, metrics = pair_loss(self.loss, policy, ref_chosen, ref_rejected, delta)
        metrics.update(batch.metrics)
        metrics["beta"] = self.loss.beta
        metrics["objective/entropy"] = -logps.detach().mean().item()
        if ref_logps is not None:
            metrics["objective/kl"] = (logps.detach() - ref_logps).mean().item()
        metrics["objective/scores_margin"] = (batch.chosen_reward - batch.rejected_reward).mean().item()
        metrics["pairs/chosen_reward"] = batch.chosen_reward.mean().item()
        metrics["pairs/rejected_reward"] = batch.rejected_reward.mean().item()
        return loss, metrics

    def _empty_metrics(self, with_kl: bool) -> dict[str, float]:
        """Every metric name a micro-batch with pairs logs, at 0: rows and processes keep the same names."""
        names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "objective/entropy", "objective/scores_margin",
                 "pairs/chosen_reward", "pairs/rejected_reward"]
        names += ["objective/kl"] * with_kl + ["delta"] * (self.loss.name in SHIFTED)
        return {**dict.fromkeys(names, 0.0), "beta": self.loss.beta}

    def _reference_logps(self, group: GroupBatch) -> torch.Tensor:
        with torch.no_grad(), reference_forward(self.reference, self.unwrapped) as model:
            return summed_logps(model, group, self.config.shared_prompt)[0]


# ----------------------------------------------------------------------------------- RFT


@dataclass
class KeptAnswers:
    """One micro-batch of RFT: each kept prompt with its best answer (a group of one)."""

    group: GroupBatch
    kept: int  # how many prompts kept an answer (0: the group holds the first prompt, at zero weight)
    metrics: dict[str, float] = field(default_factory=dict)

    def to(self, device) -> KeptAnswers:
        return KeptAnswers(self.group.to(device), self.kept, self.metrics)

    def __len__(self) -> int:
        return self.kept


def best_answer(rewards: list[float | None], threshold: float | None,
                stopped: list[bool] | None = None) -> int | None:
    """The first best-rewarded complete answer, or None when none is, or the best is below ``threshold``.

    An answer is complete when it was scored and, where ``stopped`` is given, ended with its stop
    token. A cut-off answer is never kept, whatever its reward: trained on, it would teach the
    model to run on without stopping.

    >>> best_answer([0.1, 1.0, None, 1.0], threshold=1.0), best_answer([0.1, 0.2], threshold=0.5)
    (1, None)
    >>> best_answer([0.1, 1.0, 0.5], None, stopped=[True, False, True])
    2
    """
    stopped = stopped if stopped is not None else [True] * len(rewards)
    scored = [j for j, r in enumerate(rewards) if r is not None and stopped[j]]
    if not scored:
        return None
    best = max(scored, key=lambda j: rewards[j])
    return best if threshold is None or rewards[best] >= threshold else None


class RftStep:
    """Rejection-sampling fine-tuning: SFT on each prompt's best judged sample (module docstring)."""

    def __init__(self, model, processor, config: OnlineConfig, judge, unwrapped=None):
        self.model = model
        self.processor = processor
        self.config = config
        self.unwrapped = unwrapped if unwrapped is not None else model
        self.sampler = GroupSampler(self.unwrapped, processor, config, judge)
        self.vision_ids = vision_token_ids(self.unwrapped, processor)

    def encode(self, records, device="cpu") -> KeptAnswers:
        return self.keep(self.sampler.draw(records), device)

    def keep(self, drawn: Drawn, device="cpu") -> KeptAnswers:
        """Each record's best complete answer (``best_answer``) as a group of one, on ``device``."""
        records, k = drawn.records, self.config.group_size
        best = [best_answer(r, self.config.rft_threshold, drawn.stopped[i * k : (i + 1) * k])
                for i, r in enumerate(drawn.rewards)]
        rows = [i for i, j in enumerate(best) if j is not None]
        kept_rewards = [drawn.rewards[i][best[i]] for i in rows]
        if not rows:  # nothing kept: the first prompt's first answer, at zero weight
            best, rows = [0], [0]
        completions = [drawn.completions[i * k + best[i]] for i in rows]
        group = group_batch_of(drawn, rows, completions, 1, self.processor, self.vision_ids)
        metrics = {**drawn.metrics, "rft/kept": len(kept_rewards) / len(records),
                   "rft/kept_reward": sum(kept_rewards) / len(kept_rewards) if kept_rewards else 0.0}
        return KeptAnswers(group, len(kept_rewards), metrics).to(device)

    def loss_and_metrics(self, batch: KeptAnswers, model=None) -> tuple[torch.Tensor, dict[str, float]]:
        # Scored under the distribution the answers were drawn from (module docstring, RFT).
        logps, tokens = summed_logps(model or self.model, batch.group, self.config.shared_prompt,
                                     self.config.temperature)
        if batch.kept == 0:
            return logps.sum() * 0.0, {"loss": 0.0, "logps/chosen": 0.0, **batch.metrics}
        loss = nll(logps, tokens).mean()
        return loss, {"loss": loss.item(), "logps/chosen": logps.detach().mean().item(), **batch.metrics}
