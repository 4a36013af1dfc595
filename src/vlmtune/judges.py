"""One judge interface: score a record's answers, or prefer one of two, by a reward, an HTTP VLM or a local model.

Labelling pairs (online / iterative DPO) and scoring completions (GRPO) are the same act. A judge
answers two questions about the answers (completions) a policy gave to records:

- ``judge.score(records, completions) -> JudgeScores``: one score per completion, ``records[i]``
  being the record that ``completions[i]`` answers (repeat a record for its k samples), or
  ``None`` where the judge failed, with the number of failures and of replies read from the cache.
- ``judge.prefer(record, a, b) -> +1 | -1 | 0 | None``: ``a`` is better, ``b`` is better, a tie,
  or the judge failed.

The judges:

(a) :class:`RewardJudge`: the weighted sum of reward functions (built-in names or
    ``package.module:function``, resolved by :func:`vlmtune.train.grpo.resolve_reward`), called in
    TRL's shape with the columns GRPO passes (``prompts``, ``images``, ``metadata``, ``counts``). It never
    fails; a function that does not return one finite number per completion raises.
(b) :class:`HttpVlmJudge`: any OpenAI-compatible chat endpoint, through
    :class:`vlmtune.eval.judge.HttpJudge` (timeouts, retries with exponential back-off on transport
    errors, HTTP 429 and 5xx); the record's images are sent as data URLs before the question. The
    API key is read from the environment variable the user names.
(c) :class:`LocalVlmJudge`: a local model loaded like any other
    (:func:`vlmtune.eval.run.load_for_eval`), answering the same prompts greedily.

(b) and (c) ask MT-Bench's prompts about the image (:mod:`vlmtune.judge_prompts`): a rating from 1
to 10, or a verdict A, B or tie. A reply with no readable rating or verdict is a failure: logged,
counted, never a win. Position bias: ``prefer`` asks both orders, (a, b) and (b, a); when the two
verdicts disagree the pair is a tie (MT-Bench's "inconsistent"), counted in
``Preferences.inconsistent``. With ``reference=True`` the prompts also show the record's
``chosen`` answer as the reference answer, as MT-Bench's reference-guided prompts do.

With ``cache_dir``, every readable reply is kept in ``cache_dir/judge_replies.jsonl`` under the
sha256 of the judge's identity (model name and sampling settings) and the messages, each image
replaced by the sha256 of its bytes; the messages hold the question and the answers, so a rerun
on the same inputs sends no request. Failures and unreadable replies are not kept: a rerun asks
again.

As a GRPO reward, :class:`JudgeReward` gives any judge TRL's shape ``fn(completions, **kwargs)
-> list[float]``. A failed score becomes ``failure_score`` (default 0.0: below the lowest rating,
1, so a failed answer never ranks above a judged one) and is counted in ``JudgeReward.failures``.

For example (the key in ``$JUDGE_KEY``; a rerun reads the replies from ``runs/judge``)::

    judge = HttpVlmJudge("http://127.0.0.1:8000/v1", "judge-vlm", key_env="JUDGE_KEY", cache_dir="runs/judge")
    scores = judge.score([record] * 4, answers).scores  # four sampled answers to one record
    verdict = judge.prefer(record, answers[0], answers[1])

Every call of (b) or (c) logs (INFO, ``vlmtune.judges``) how many answers or pairs were judged, how
many replies came from the cache and how many failed; failures are also logged as warnings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from vlmtune.data.records import PreferenceRecord
from vlmtune.errors import VlmtuneError
from vlmtune.eval.judge import HttpJudge, JudgeUnavailable, LocalJudge, api_key_from_env
from vlmtune.judge_prompts import combine_orders, pairwise_messages, parse_rating, parse_verdict, scoring_messages
from vlmtune.jsonl import read_jsonl
from vlmtune.progress import progress_bar
from vlmtune.rewards import completion_text

log = logging.getLogger(__name__)

CACHE_FILE = "judge_replies.jsonl"


# ----------------------------------------------------------------------------------- results


@dataclass
class JudgeScores:
    """A score per completion (``None``: the judge failed) and how many replies came from the cache."""

    scores: list[float | None]
    cached: int = 0

    @property
    def failures(self) -> int:
        return sum(s is None for s in self.scores)

    def filled(self, failure_score: float) -> list[float]:
        """The scores with every failure replaced by ``failure_score``."""
        return [failure_score if s is None else s for s in self.scores]


@dataclass
class Preferences:
    """A verdict per pair (+1 ``a`` better, -1 ``b`` better, 0 tie, ``None`` failed), with counts."""

    verdicts: list[int | None]
    inconsistent: int = 0  # pairs whose two orders disagreed (scored as ties)
    cached: int = 0

    @property
    def failures(self) -> int:
        return sum(v is None for v in self.verdicts)


class Judge(Protocol):
    def score(self, records: Sequence[PreferenceRecord], completions: Sequence[Any]) -> JudgeScores: ...

    def prefer(self, record: PreferenceRecord, a: str, b: str) -> int | None: ...




class ReplyCache:
    """Judge replies on disk, one JSON line ``{"key", "reply"}`` each, keyed by :func:`reply_key`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.replies: dict[str, str] = {}
        if self.path.exists():
            # A line cut short by a crash is skipped with a warning: its question is asked again.
            for _, row in read_jsonl(self.path, required=("key", "reply"), skip_bad=True):
                self.replies[str(row["key"])] = str(row["reply"])

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str) -> None:
        self.replies[key] = reply
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "reply": reply}) + "\n")


def reply_key(identity: dict[str, Any], messages: list[dict[str, Any]]) -> str:
    """sha256 of the judge's identity and the messages, each image part replaced by its bytes' sha256."""
    canonical = [{**m, "content": m["content"] if isinstance(m["content"], str)
                  else [_hashed_part(p) for p in m["content"]]} for m in messages]
    blob = json.dumps([identity, canonical], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _hashed_part(part: dict[str, Any]) -> dict[str, Any]:
    if part.get("type") != "image":
        return part
    try:
        digest = hashlib.sha256(Path(part["image"]).read_bytes()).hexdigest()
    except OSError as e:
        raise VlmtuneError(f"judge: cannot read the image {part['image']}: {e}; check the record's image path") from None
    return {"type": "image", "sha256": digest}


# ----------------------------------------------------------------------------------- prompt judges


class PromptJudge:
    """Scores and pairwise verdicts from a model that answers chat prompts (see the module docstring).

    ``ask(conversations) -> replies`` returns one reply per conversation, ``None`` where no reply
    came. ``identity`` (the model and its sampling settings) is part of every cache key. With
    ``reference``, every prompt shows the record's ``chosen`` answer as the reference answer.
    """

    def __init__(self, ask: Callable[[list], list[str | None]], identity: dict[str, Any],
                 cache_dir: str | Path | None = None, reference: bool = False):
        self.ask = ask
        self.identity = identity
        self.reference = reference
        self.cache = ReplyCache(Path(cache_dir) / CACHE_FILE) if cache_dir else None

    def score(self, records: Sequence[PreferenceRecord], completions: Sequence[Any]) -> JudgeScores:
        _check_aligned(records, completions)
        conversations = [scoring_messages(r, completion_text(c), self.reference)
                         for r, c in zip(records, completions)]
        replies, cached = self._replies(conversations, parse_rating)
        result = JudgeScores([None if r is None else parse_rating(r) for r in replies], cached)
        log.info("judge %s: %d answers scored (%d from the cache), %d failed",
                 self.identity["model"], len(replies), cached, result.failures)
        return result

    def prefer(self, record: PreferenceRecord, a: str, b: str) -> int | None:
        return self.prefer_many([(record, a, b)]).verdicts[0]

    def prefer_many(self, pairs: Sequence[tuple[PreferenceRecord, str, str]]) -> Preferences:
        """A verdict per ``(record, a, b)``, each pair asked in both orders."""
        conversations = []
        for record, a, b in pairs:
            conversations += [pairwise_messages(record, a, b, self.reference),
                              pairwise_messages(record, b, a, self.reference)]
        replies, cached = self._replies(conversations, parse_verdict)
        verdicts = [None if r is None else parse_verdict(r) for r in replies]
        firsts, seconds = verdicts[0::2], verdicts[1::2]
        result = Preferences([combine_orders(f, s) for f, s in zip(firsts, seconds)], cached=cached)
        result.inconsistent = sum(f is not None and s is not None and f != -s for f, s in zip(firsts, seconds))
        log.info("judge %s: %d pairs compared in both orders (%d replies from the cache), %d inconsistent "
                 "(ties), %d failed", self.identity["model"], len(pairs), cached, result.inconsistent,
                 result.failures)
        return result

    def _replies(self, conversations: list, parse: Callable[[str], Any]) -> tuple[list[str | None], int]:
        """Each conversation's reply (cached or asked; ``None`` when none came) and how many were cached."""
        keys = [reply_key(self.identity, m) for m in conversations] if self.cache else []
        replies = [self.cache.get(k) for k in keys] if self.cache else [None] * len(conversations)
        todo = [i for i, reply in enumerate(replies) if reply is None]
        fresh = self.ask([conversations[i] for i in todo]) if todo else []
        for i, reply in zip(todo, fresh):
            replies[i] = reply
            if reply is not None and parse(reply) is None:
                log.warning("judge %s: unreadable reply %r (counted as a failure)", self.identity["model"], reply[:200])
            elif reply is not None and self.cache:
                self.cache.put(keys[i], reply)
        return replies, len(conversations) - len(todo)


class HttpVlmJudge(PromptJudge):
    """A VLM behind an OpenAI-compatible endpoint as the judge (module docstring, (b)).

    ``key_env`` names the environment variable that holds the API key (sent as a Bearer header);
    ``workers`` requests are in flight at once. ``timeout`` is in seconds per request; a request is
    tried ``retries`` more times after ``backoff * 2**i`` seconds before it counts as a failure.
    """

    def __init__(self, url: str, model: str, *, key_env: str | None = None, cache_dir: str | Path | None = None,
                 reference: bool = False, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 workers: int = 4, temperature: float = 0.0, max_tokens: int = 1024):
        if workers < 1:
            raise VlmtuneError(f"judge: workers must be at least 1 (got {workers})")
        self.http = HttpJudge(url, model, api_key=api_key_from_env(key_env), timeout=timeout,
                              temperature=temperature, max_tokens=max_tokens, retries=retries, backoff=backoff)
        self.workers = workers
        identity = {"model": model, "temperature": temperature, "max_tokens": max_tokens}
        super().__init__(self._ask, identity, cache_dir, reference)

    def _ask(self, conversations: list) -> list[str | None]:
        unavailable: list[str] = []

        with self.http.client() as client:
            def one(messages):
                try:
                    return self.http.ask(client, messages)
                except JudgeUnavailable as e:
                    unavailable.append(str(e))
                    return None

            with ThreadPoolExecutor(self.workers) as pool:
                replies = list(progress_bar(pool.map(one, conversations), total=len(conversations),
                                            desc=f"judge {self.http.model}", unit="request"))
        if unavailable:
            log.warning("judge %s: %d of %d requests got no answer (counted as failures); first: %s",
                        self.http.model, len(unavailable), len(conversations), unavailable[0])
        return replies


class LocalVlmJudge(PromptJudge):
    """A local model as the judge (module docstring, (c)), loaded with :func:`vlmtune.eval.run.load_for_eval`.

    Its cache key names the model by its path (and adapter), not its weights: clear ``cache_dir``
    after changing the model at that path.
    """

    def __init__(self, model_path: str | Path, *, adapter: str | Path | None = None, dtype: str = "float32",
                 max_new_tokens: int = 256, batch_size: int = 4, cache_dir: str | Path | None = None,
                 reference: bool = False, trust_remote_code: bool = False):
        from vlmtune.eval.run import load_for_eval

        model, processor = load_for_eval(model_path, adapter=adapter, dtype=dtype,
                                         trust_remote_code=trust_remote_code)
        self.local = LocalJudge(model, processor, max_new_tokens=max_new_tokens, batch_size=batch_size)
        identity = {"model": str(model_path), "adapter": str(adapter) if adapter else None,
                    "dtype": dtype, "max_new_tokens": max_new_tokens}
        super().__init__(self.local, identity, cache_dir, reference)


# ----------------------------------------------------------------------------------- rewards


class RewardJudge:
    """The weighted sum of reward functions as a judge (module docstring, (a)).

    ``rewards``: names (weight 1) or ``(name, weight)`` pairs, as in the ``grpo.rewards`` config.
    """

    def __init__(self, rewards: Sequence[str | tuple[str, float]]):
        # Imported here: vlmtune.train.grpo brings torch and the training stack, which the HTTP judge
        # does not need, and the online-DPO loop in vlmtune.train will import this module.
        from vlmtune.train.grpo import resolve_reward

        if not rewards:
            raise VlmtuneError("a reward judge needs at least one reward: a built-in name or package.module:function")
        self.rewards = []  # (label, weight, function), as vlmtune.train.grpo.score takes them
        for spec in rewards:
            name, weight = (spec, 1.0) if isinstance(spec, str) else spec
            label, function = resolve_reward(name)
            self.rewards.append((label, float(weight), function))

    def score(self, records: Sequence[PreferenceRecord], completions: Sequence[Any]) -> JudgeScores:
        from vlmtune.train.grpo import BUILTIN_REWARDS, record_task, reward_columns, score

        _check_aligned(records, completions)
        if any(label in BUILTIN_REWARDS for label, _, _ in self.rewards):
            for record in records:  # the built-in rewards score by the record's task: name one that has none
                record_task(record)
        total, _ = score(self.rewards, [completion_text(c) for c in completions], reward_columns(records))
        log.debug("reward judge: %d answers scored", len(completions))
        return JudgeScores([float(v) for v in total.tolist()])

    def prefer(self, record: PreferenceRecord, a: str, b: str) -> int | None:
        first, second = self.score([record, record], [a, b]).scores
        return (first > second) - (first < second)


class JudgeReward:
    """A judge as a GRPO reward: ``fn(completions, **kwargs) -> list[float]`` (TRL's shape).

    The records come as ``records=`` or are rebuilt from the ``prompts``, ``images`` and
    ``metadata`` columns (one per completion). A failure scores ``failure_score`` and is counted
    in ``failures`` (``scored`` counts every completion).

    >>> from vlmtune.data.records import user_prompt
    >>> reward = JudgeReward(RewardJudge(["count_exact"]))
    >>> reward(["There are 2 cars, 0 buses.", "There is 1 car, 0 buses."], prompts=[user_prompt("Count.", 0)] * 2,
    ...        metadata=[{"counts": {"car": 2, "bus": 0}}] * 2)
    [1.0, 0.0]
    """

    def __init__(self, judge: Judge, failure_score: float = 0.0):
        if not math.isfinite(failure_score):
            raise VlmtuneError(f"judge reward: failure_score must be a finite number (got {failure_score})")
        self.judge = judge
        self.failure_score = failure_score
        self.scored = 0
        self.failures = 0

    def __call__(self, completions, records=None, prompts=None, images=None, metadata=None, **kwargs) -> list[float]:
        if records is None:
            records = _records_from_columns(len(completions), prompts, images, metadata)
        result = self.judge.score(records, completions)
        self.scored += len(completions)
        self.failures += result.failures
        if result.failures:
            log.warning("judge reward: %d of %d answers not scored, each given %g (%d failures so far)",
                        result.failures, len(completions), self.failure_score, self.failures)
        return result.filled(self.failure_score)


def _records_from_columns(n: int, prompts, images, metadata) -> list[PreferenceRecord]:
    if prompts is None or len(prompts) != n:
        raise VlmtuneError("judge reward: pass records= or a `prompts` column with one prompt per completion")
    images = images if images is not None else [[] for _ in range(n)]
    metadata = metadata if metadata is not None else [{} for _ in range(n)]
    if len(images) != n or len(metadata) != n:
        raise VlmtuneError(f"judge reward: the `images` and `metadata` columns must have one row per completion ({n})")
    return [PreferenceRecord(str(i), list(im), list(p), "", "", dict(m or {}))
            for i, (p, im, m) in enumerate(zip(prompts, images, metadata))]


def _check_aligned(records: Sequence, completions: Sequence) -> None:
    if len(records) != len(completions):
        raise VlmtuneError(
            f"judge: {len(completions)} completions for {len(records)} records; pass one record per "
            "completion (repeat a record for each of its samples)"
        )
