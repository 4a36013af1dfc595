"""Iterative DPO (``vlmtune.train.iterative``): rounds write their files, resume inside a round, labels from a file."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from vlmtune.cli import main
from vlmtune.config import validate_config
from vlmtune.data.load import load_records
from vlmtune.data.writers import write_records
from vlmtune.errors import VlmtuneError
from vlmtune.train.loop import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def length_reward(completions, **kwargs) -> list[float]:
    """A reward an untrained model's samples already vary in, so every round has pairs."""
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]


def _raw(model_dir, data, out, **online) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"train": str(data), "eval": str(data), "max_length": 128},
        "loss": {"dpop_lambda": 5.0},
        "train": {"algo": "iterative_dpo", "output_dir": str(out), "lr": 1e-2, "batch_size": 4,
                  "schedule": "constant", "save_every": 1, "progress": False},
        "online": {"group_size": 2, "max_new_tokens": 5, "rounds": 2, "steps_per_round": 2,
                   "rewards": ["test_iterative:length_reward"], **online},
    }


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def prompt_pool(synth_pairs_file, tmp_path_factory) -> Path:
    """Eight records of the synthetic set: a small prompt pool (and held-out set) for quick rounds."""
    path = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    write_records(load_records(synth_pairs_file)[:8], path, "vlmtune")
    return path


def test_two_rounds_write_each_rounds_files_and_resume_inside_round_two(tiny_model_dir, prompt_pool, tmp_path):
    whole = tmp_path / "whole"
    final = train(validate_config(_raw(tiny_model_dir, prompt_pool, whole)))
    assert final == whole / "rounds" / "r1" / "train" / "final"
    for r in (0, 1):
        folder = whole / "rounds" / f"r{r}"
        pairs = load_records(folder / "pairs.jsonl")
        labels = json.loads((folder / "labels.json").read_text())
        assert labels["source"] == "judge" and labels["pairs"] == len(pairs) > 0
        assert labels["samples"] == 16 and labels["pairs"] + labels["dropped_ties"] == 8  # best_worst: one each
        assert all(p.metadata["round"] == r and p.metadata["chosen_reward"] > p.metadata["rejected_reward"]
                   for p in pairs)
        assert all(len(p.chosen) > len(p.rejected) for p in pairs)  # the length reward decided
        train_rows = [row for row in _rows(folder / "train" / "metrics.jsonl") if "loss" in row]
        assert [row["step"] for row in train_rows] == [1, 2] and all(math.isfinite(row["loss"]) for row in train_rows)
        assert (folder / "eval" / "metrics.json").is_file()
        summary = json.loads((folder / "round.json").read_text())
        assert summary["round"] == r and "exact_match" in summary["eval"]
    # Round 1 continued round 0's adapter: it starts where round 0 ended, not at zero.
    first = load_file(whole / "rounds" / "r0" / "train" / "final" / "adapter_model.safetensors")
    second = load_file(whole / "rounds" / "r1" / "train" / "final" / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for v in first.values())
    assert any(not (first[k] == second[k]).all() for k in first)
    # At step 1 a fresh adapter is the reference (implicit rewards exactly 0); round 1's continued one is not.
    step_one = [_rows(whole / "rounds" / f"r{r}" / "train" / "metrics.jsonl")[0] for r in (0, 1)]
    assert step_one[0]["rewards/chosen"] == 0.0 and step_one[1]["rewards/chosen"] != 0.0

    # A crash in round 1 after its step-1 checkpoint: the rest of round 1 is gone.
    parts = tmp_path / "parts"
    shutil.copytree(whole, parts)
    r1 = parts / "rounds" / "r1"
    (r1 / "round.json").unlink()
    shutil.rmtree(r1 / "eval")
    shutil.rmtree(r1 / "train" / "final")
    shutil.rmtree(r1 / "train" / "checkpoints" / "step-000002")
    config = validate_config(_raw(tiny_model_dir, prompt_pool, parts))
    with pytest.raises(VlmtuneError, match="pass --resume"):
        train(config)
    pairs_before = (r1 / "pairs.jsonl").read_text()
    round0_before = (parts / "rounds" / "r0" / "round.json").stat().st_mtime_ns
    train(config, resume=True)
    assert (r1 / "pairs.jsonl").read_text() == pairs_before  # read back, not sampled again
    assert (parts / "rounds" / "r0" / "round.json").stat().st_mtime_ns == round0_before  # round 0 skipped
    a = [row for row in _rows(whole / "rounds" / "r1" / "train" / "metrics.jsonl") if "loss" in row]
    b = [row for row in _rows(r1 / "train" / "metrics.jsonl") if "loss" in row]
    assert [row["step"] for row in b] == [1, 2]
    for x, y in zip(a, b):
        for name in ("loss", "rewards/margins", "grad_norm"):
            assert math.isclose(x[name], y[name], rel_tol=1e-6, abs_tol=1e-7), (x["step"], name)
    resumed = load_file(r1 / "train" / "final" / "adapter_model.safetensors")
    assert all((resumed[k] - second[k]).abs().max() < 1e-6 for k in second)


@pytest.fixture(scope="module")
def stop_or_letter_model(tiny_model_dir, prompt_pool, tmp_path_factory) -> Path:
    """The tiny model with two output rows (tied: also their embeddings) set along the pool's last prompt
    states, so an answer's first token is one letter absent from the prompts (about 6 in 7) or
    ``<|endoftext|>``, a stop token (about 1 in 7): about half the prompts get an empty answer among 4."""
    import torch

    from vlmtune.eval.run import load_for_eval
    from vlmtune.generate import stop_token_ids
    from vlmtune.sampling.sampler import encode_prompts

    model, processor = load_for_eval(str(tiny_model_dir))
    tokenizer = processor.tokenizer
    stop = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert stop in stop_token_ids(model, processor)
    batch = encode_prompts([(r.images, r.prompt) for r in load_records(prompt_pool)], processor)
    used = set(batch["input_ids"].flatten().tolist())
    letter = next(i for i in range(len(tokenizer)) if i not in used and tokenizer.decode([i]).strip().isalpha())
    with torch.no_grad():
        last = model(**batch, output_hidden_states=True).hidden_states[-1][:, -1]  # after the final norm
        direction = last.mean(0) / last.mean(0).norm()
        rows = model.get_output_embeddings().weight
        rows[letter] = 2.0 * direction  # logit 2 x (direction . state), about 15: far above the others
        rows[stop] = (2.0 - math.log(6) / (last @ direction).mean()) * direction  # ln 6 below the letter's
        first = model(**batch).logits[:, -1].softmax(-1)
    assert ((first[:, stop] > 0.1) & (first[:, stop] < 0.2) & (first[:, letter] > 0.8)).all()
    out = tmp_path_factory.mktemp("stop-or-letter")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_a_round_drops_and_counts_the_pairs_with_an_empty_answer(stop_or_letter_model, prompt_pool, tmp_path):
    """Regression: round 0 wrote pairs whose rejected answer was empty, which its own loader then refused."""
    raw = _raw(stop_or_letter_model, prompt_pool, tmp_path / "run", rounds=1, steps_per_round=1, group_size=4, temperature=1.0)
    raw["data"]["eval"] = None
    raw["train"]["batch_size"] = 1  # most pairs go: one left must still fill a batch
    train(validate_config(raw))  # data.skip_bad is off: a refused record would stop the run
    folder = tmp_path / "run" / "rounds" / "r0"
    labels = json.loads((folder / "labels.json").read_text())
    pairs = load_records(folder / "pairs.jsonl")
    assert labels["dropped_problems"]["empty-answer"] >= labels["dropped_unloadable"] > 0
    assert labels["pairs"] == len(pairs) > 0
    assert labels["pairs"] + labels["dropped_unloadable"] + labels["dropped_ties"] == 8  # best_worst: one a prompt
    assert all(p.chosen.strip() and p.rejected.strip() for p in pairs)
    assert not (folder / "pairs.partial.jsonl").exists()


def test_round_labels_from_a_file_replace_the_judge_and_previous_reference_merges(
    tiny_model_dir, prompt_pool, tmp_path
):
    votes = tmp_path / "votes.jsonl"
    write_records(load_records(prompt_pool)[:4], votes, "vlmtune")  # as `vlmtune study export` writes pairs
    run = tmp_path / "run"
    train(validate_config(_raw(tiny_model_dir, prompt_pool, run, reference="previous", round_labels={1: str(votes)})))
    labels = json.loads((run / "rounds" / "r1" / "labels.json").read_text())
    assert labels == {"source": str(votes), "pairs": 4}
    assert [p.chosen for p in load_records(run / "rounds" / "r1" / "pairs.jsonl")] == \
        [p.chosen for p in load_records(votes)]
    # reference: previous: round 1 trains a new adapter on round 0's merged policy
    assert (run / "rounds" / "r0" / "merged" / "model.safetensors").is_file()
    config = yaml.safe_load((run / "rounds" / "r1" / "train" / "config.yaml").read_text())
    assert config["model"]["name_or_path"] == str(run / "rounds" / "r0" / "merged")
    assert _rows(run / "rounds" / "r1" / "train" / "metrics.jsonl")[0]["rewards/chosen"] == 0.0  # a new adapter


def test_round_labels_outside_the_rounds_are_refused(tiny_model_dir, prompt_pool, tmp_path):
    with pytest.raises(VlmtuneError, match="outside 0..1"):
        validate_config(_raw(tiny_model_dir, prompt_pool, tmp_path, round_labels={2: "x.jsonl"}))


def test_iterative_from_the_cli(tiny_model_dir, prompt_pool, tmp_path, capsys):
    run = tmp_path / "cli"
    args = ["train", "--algo", "iterative_dpo", "--config", str(CONFIGS / "demo-cpu.yaml"),
            f"model.name_or_path={tiny_model_dir}", f"data.train={prompt_pool}", "data.eval=null",
            f"train.output_dir={run}", "train.batch_size=4", "train.grad_accum=1", "train.progress=false",
            "online.rounds=1", "online.steps_per_round=3", "online.group_size=2", "online.max_new_tokens=4",
            "online.rewards=[test_iterative:length_reward]", "train.lr=1e-2"]
    assert main(args) == 0
    final = run / "rounds" / "r0" / "train" / "final"
    assert str(final) in capsys.readouterr().out
    assert (run / "config.yaml").is_file() and not (run / "rounds" / "r0" / "eval").exists()  # no data.eval
    train_rows = [row for row in _rows(run / "rounds" / "r0" / "train" / "metrics.jsonl") if "loss" in row]
    assert [row["step"] for row in train_rows] == [1, 2, 3]
    for name in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
        assert all(math.isfinite(row[name]) for row in train_rows), name
    adapter = load_file(final / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for name, v in adapter.items() if "lora_B" in name)


def test_full_finetuning_needs_the_previous_reference(tiny_model_dir, prompt_pool, tmp_path):
    raw = _raw(tiny_model_dir, prompt_pool, tmp_path)
    raw["lora"] = {"enabled": False}
    with pytest.raises(VlmtuneError, match="online.reference=previous for full fine-tuning"):
        validate_config(raw)
    raw["online"]["reference"] = "previous"
    assert validate_config(raw).online.reference == "previous"
