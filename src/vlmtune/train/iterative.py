"""Iterative DPO (``--algo iterative_dpo``): rounds of labelling the policy's own samples, then offline DPO on them.

As in RLAIF-V (Yu et al. 2024, arXiv 2405.17220) and iterative RPO (Pang et al. 2024, arXiv
2404.19733), each of ``online.rounds`` rounds r = 0, 1, ... does, in ``RUN/rounds/r<r>/``:

1. **Label** (``pairs.jsonl``, ``labels.json``): the policy at the start of the round samples
   ``online.group_size`` answers for every prompt of ``data.train`` (the prompt pool), in batches
   of ``train.batch_size``, with ``vlmtune.train.online.GroupSampler`` (the sampler and judge of
   online DPO; torch seeded with ``train.seed + r``), and ``form_pairs`` builds pairs from the
   judge's rewards (``online.pairs``, ``online.margin``). The pairs are written as ``vlmtune``
   records (chosen and rejected: the sampled texts; ``metadata`` keeps the prompt's and adds
   ``round``, ``chosen_reward``, ``rejected_reward``). A pair the round's loader would refuse (an
   empty sampled answer, the same pair twice) is dropped before writing and counted in
   ``labels.json`` (``dropped_unloadable``, ``dropped_problems`` by the loader's problem kind), as
   ties are (``dropped_ties``). With ``online.round_labels: {r: FILE}`` the
   round's pairs are that file's records instead (for example the votes ``vlmtune study export``
   wrote): no sampling, no judge.
2. **Train** (``train/``): ``online.steps_per_round`` steps of the offline preference step
   (``loss:``, DPOP by default) on the round's pairs, through the ordinary loop (its checkpoints,
   metrics and ``final/``). The policy continues from round to round: with ``online.reference:
   initial`` the previous round's adapter is loaded into the new round's adapter on the initial
   model, whose adapter-off self stays the reference; with ``previous`` the previous round's
   policy is merged (``merged/``) and becomes both the base of a new zero-initialised adapter and
   the reference.
3. **Evaluate** (``eval/``): with ``data.eval``, ``vlmtune.eval.run.evaluate`` on the round's final
   policy (greedy answers, exact match with CIs, ``metrics.json`` and ``samples.jsonl``).

``round.json`` marks a finished round. ``--resume`` skips finished rounds and continues inside the
current one: its pair file is read back (not sampled again) and its training resumes from its
latest checkpoint. The run's final model is the last round's ``train/final``; ``RUN/config.yaml``
holds the whole run's config, each ``rounds/r<r>/train/config.yaml`` its round's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import torch

from vlmtune.config import Config, config_yaml, validate_config
from vlmtune.data.records import PreferenceRecord
from vlmtune.errors import VlmtuneError
from vlmtune.train.online import GroupSampler, build_judge, form_pairs

log = logging.getLogger(__name__)


def train_rounds(config: Config, resume: bool = False, trust_remote_code: bool = False) -> Path:
    """Run (or, with ``resume`` or ``train.resume=auto``, finish) every round; return the last round's final model."""
    out = Path(config.train.output_dir)
    if (out / "rounds").is_dir() and not (resume or config.train.resume == "auto"):
        raise VlmtuneError(f"{out} already holds rounds ({out / 'rounds'}); pass --resume to continue that run, "
                         "or choose another train.output_dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_yaml(config))
    for r in range(config.online.rounds):
        folder = round_dir(out, r)
        if (folder / "round.json").is_file():
            log.info("round %d is finished (%s): skipped", r, folder / "round.json")
            continue
        run_round(config, r, trust_remote_code)
    return round_dir(out, config.online.rounds - 1) / "train" / "final"


def round_dir(out: Path, r: int) -> Path:
    return out / "rounds" / f"r{r}"


def run_round(config: Config, r: int, trust_remote_code: bool) -> None:
    """Label, train and evaluate round ``r`` (module docstring), each part skipped when already on disk."""
    from vlmtune.train.loop import Trainer

    out = Path(config.train.output_dir)
    folder = round_dir(out, r)
    folder.mkdir(parents=True, exist_ok=True)
    base = round_base(config, r, trust_remote_code)
    pairs = folder / "pairs.jsonl"
    if not pairs.is_file():
        label_round(config, r, folder, trust_remote_code)
    trainer = Trainer(round_config(config, r, base, pairs), resume=True, trust_remote_code=trust_remote_code)
    if trainer.resume_from is None and r > 0 and config.online.reference == "initial":
        continue_adapter(trainer, round_dir(out, r - 1) / "train" / "final")
    final = trainer.train()
    summary = {"round": r, "base": str(base), "pairs": str(pairs), "final": str(final)}
    if config.data.eval:
        summary["eval"] = evaluate_round(config, trainer, folder / "eval")
    (folder / "round.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("round %d finished: %s", r, folder)


def round_base(config: Config, r: int, trust_remote_code: bool) -> str:
    """The model the round's adapter sits on: the initial model, or (``reference: previous``) the last policy merged."""
    if r == 0 or config.online.reference == "initial":
        return config.model.name_or_path
    from vlmtune.train.export import export_run

    previous = round_dir(Path(config.train.output_dir), r - 1)
    merged = previous / "merged"
    if not merged.is_dir():
        partial = previous / "merged.partial"
        shutil.rmtree(partial, ignore_errors=True)  # a merge cut short by a crash is done again
        export_run(previous / "train", partial, merge=True, trust_remote_code=trust_remote_code)
        os.replace(partial, merged)
    return str(merged)


def round_config(config: Config, r: int, base: str, pairs: Path) -> Config:
    """The offline DPO run of round ``r``: the round's base and pairs, ``steps_per_round`` steps, no eval."""
    raw = config.model_dump(mode="json")
    raw["model"]["name_or_path"] = base
    raw["data"].update(train=str(pairs), eval=None, format="vlmtune")
    raw["train"].update(algo="dpo", max_steps=config.online.steps_per_round, early_stopping_patience=None,
                        output_dir=str(round_dir(Path(config.train.output_dir), r) / "train"))
    raw["online"]["round_labels"] = {}
    return validate_config(raw, source=f"round {r}")


# ----------------------------------------------------------------------------------- labelling


def label_round(config: Config, r: int, folder: Path, trust_remote_code: bool) -> None:
    """Write round ``r``'s ``labels.json`` (what labelling measured), then its ``pairs.jsonl`` (atomically)."""
    from vlmtune.data.load import load_records
    from vlmtune.data.writers import write_records

    given = config.online.round_labels.get(r)
    partial, path = folder / "pairs.partial.jsonl", folder / "pairs.jsonl"
    if given is not None:
        records = load_records(given, None, skip_bad=config.data.skip_bad)
        if not records:
            raise VlmtuneError(f"online.round_labels[{r}]: {given} holds no pairs")
        stats = {"source": str(given), "pairs": len(records)}
        write_records(records, partial, "vlmtune")
    else:
        records, stats = judged_pairs(config, r, trust_remote_code)
        if records:
            write_records(records, partial, "vlmtune")
            stats.update(keep_loadable(partial, r))
        if not stats["pairs"]:
            raise VlmtuneError(f"round {r}: no pair to train on ({stats['dropped_ties']} prompts' answers tied, "
                             f"{stats.get('dropped_unloadable', 0)} pairs the loader would refuse); raise "
                             "online.group_size or online.temperature, or lower online.margin")
    (folder / "labels.json").write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(partial, path)  # the pair file exists only whole: a crash before this labels the round again
    log.info("round %d: %d pairs written to %s", r, stats["pairs"], path)


def keep_loadable(partial: Path, r: int) -> dict:
    """Drop from ``partial`` the pairs the round's loader would refuse; their counts, by the loader's problem kind.

    A sampled answer can be empty (the policy's first token was a stop token) or two of a prompt's
    samples the same text (``online.pairs: all`` then forms the same pair twice); the loader
    (``vlmtune.data.load.load_records``) refuses such records, so its own checks decide here.
    The images are the prompt pool's, already checked when the pool was read."""
    from vlmtune.data.check import DEFAULT_MAX_CHARS, scan
    from vlmtune.data.writers import write_records

    report, clean, _ = scan(partial, "vlmtune", DEFAULT_MAX_CHARS, check_images=False, workers=1, keep=True)
    problems = dict(Counter(problem.kind for problem in report.problems))
    if report.bad_records:
        write_records(clean, partial, "vlmtune")
        log.warning("round %d: %d of %d pairs dropped, the loader would refuse them (%s)", r, report.bad_records,
                    report.records_read, ", ".join(f"{kind}: {n}" for kind, n in sorted(problems.items())))
    return {"pairs": len(clean), "dropped_unloadable": report.bad_records, "dropped_problems": problems}


def judged_pairs(config: Config, r: int, trust_remote_code: bool) -> tuple[list[PreferenceRecord], dict]:
    """Sample the prompt pool with the round's starting policy, judge, and form pairs."""
    from vlmtune.data.load import load_records

    prompts = load_records(config.data.train, config.data.format, skip_bad=config.data.skip_bad)
    model, processor = starting_policy(config, r, trust_remote_code)
    sampler = GroupSampler(model, processor, config.online, build_judge(config.online, trust_remote_code))
    torch.manual_seed(config.train.seed + r)
    pairs, ties, failures, rewards = [], 0, 0, []
    size = config.train.batch_size
    for start in range(0, len(prompts), size):
        drawn = sampler.draw(prompts[start : start + size])
        failures += int(drawn.metrics["judge/failures"])
        k = config.online.group_size
        for i, record in enumerate(drawn.records):
            rewards += [v for v in drawn.rewards[i] if v is not None]
            formed, dropped = form_pairs(drawn.rewards[i], config.online.pairs, config.online.margin)
            ties += dropped
            texts = drawn.texts[i * k : (i + 1) * k]
            pairs += [pair_record(record, r, (c, j), (texts[c], texts[j]), (drawn.rewards[i][c], drawn.rewards[i][j]))
                      for c, j in formed]
    stats = {"source": "judge", "prompts": len(prompts), "samples": len(prompts) * config.online.group_size,
             "pairs": len(pairs), "dropped_ties": ties, "judge_failures": failures,
             "mean_reward": sum(rewards) / len(rewards) if rewards else None}
    return pairs, stats


def pair_record(record: PreferenceRecord, r: int, samples: tuple[int, int], texts: tuple[str, str],
                rewards: tuple[float, float]) -> PreferenceRecord:
    """Two sampled answers to ``record``'s prompt as a pair (id ``RECORD-r<round>-<chosen>-<rejected>``,
    the samples' numbers), their rewards in the metadata."""
    metadata = {**record.metadata, "round": r, "chosen_reward": rewards[0], "rejected_reward": rewards[1]}
    return PreferenceRecord(f"{record.id}-r{r}-{samples[0]}-{samples[1]}", list(record.images), record.prompt,
                            texts[0], texts[1], metadata)


def starting_policy(config: Config, r: int, trust_remote_code: bool):
    """``(model, processor)`` of the policy at the start of round ``r``: the initial model, or the last round's."""
    from vlmtune.eval.run import load_for_eval

    m = config.model
    settings = {"dtype": m.dtype, "min_pixels": m.min_pixels, "max_pixels": m.max_pixels,
                "trust_remote_code": trust_remote_code}
    if r == 0:
        return load_for_eval(m.name_or_path, **settings)
    previous = round_dir(Path(config.train.output_dir), r - 1)
    base = round_base(config, r - 1, trust_remote_code)
    return load_for_eval(base, adapter=previous / "train" / "final", **settings)


# ----------------------------------------------------------------------------------- train, evaluate


def continue_adapter(trainer, final: Path) -> None:
    """Load the previous round's adapter weights into the new round's (fresh) adapter, in place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = final / "adapter_model.safetensors"
    if not weights.is_file():
        raise VlmtuneError(f"{final} holds no adapter_model.safetensors to continue from; "
                         "online.reference=initial continues a LoRA adapter (lora.enabled=true)")
    model = trainer.accelerator.unwrap_model(trainer.model)
    result = set_peft_model_state_dict(model, load_file(weights))
    if result.unexpected_keys:
        raise VlmtuneError(f"{weights} does not fit this round's adapter (e.g. {result.unexpected_keys[0]}); "
                         "keep the lora settings of the run")
    log.info("continuing the adapter of %s", final)


def evaluate_round(config: Config, trainer, out: Path) -> dict:
    """Greedy held-out evaluation of the round's final policy (``vlmtune.eval.run.evaluate``); its headline numbers."""
    from vlmtune.data.load import load_records
    from vlmtune.eval.run import evaluate

    records = load_records(config.data.eval, config.data.format, skip_bad=config.data.skip_bad)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    metrics = evaluate(model, trainer.processor, records, out, batch_size=max(8, config.train.batch_size),
                       max_new_tokens=config.online.max_new_tokens, max_length=config.data.max_length,
                       seed=config.train.seed)
    headline = {name: value.get("value") for name, value in metrics.items() if isinstance(value, dict)}
    return {name: value if isinstance(value, (int, float)) and math.isfinite(value) else None
            for name, value in headline.items()}

