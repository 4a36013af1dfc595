"""Online DPO and RFT (``vlmtune.train.online``): pair formation by hand, the step's loss against a plain
per-answer computation, CLI runs, and exact resume."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
from local_server import serve_in_thread
import torch
from fastapi import FastAPI, Request  # at module level: FastAPI resolves the handler's annotations here
from safetensors.torch import load_file

from vlmtune.cli import main
from vlmtune.config import OnlineConfig, validate_config
from vlmtune.errors import VlmtuneError
from vlmtune.generate import encode_prompts
from vlmtune.judges import PromptJudge, RewardJudge
from vlmtune.losses.preference import preference_loss
from vlmtune.train.loop import Trainer
from vlmtune.train.online import GroupSampler, OnlineDpoStep, RftStep, best_answer, copeland, form_pairs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def length_reward(completions, **kwargs) -> list[float]:
    """A reward an untrained model's samples already vary in, so pairs form from the first step."""
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------- pairs by hand


def test_best_worst_pairs_the_first_best_with_the_first_worst():
    assert form_pairs([0.0, 1.0, 0.5, 1.0, 0.0]) == ([(1, 0)], 0)


def test_best_worst_of_equal_rewards_is_one_tie_dropped():
    assert form_pairs([0.5, 0.5, 0.5]) == ([], 1)
    assert form_pairs([0.5, 0.6, 0.55], margin=0.1) == ([], 1)  # 0.1 apart: not more than the margin
    assert form_pairs([0.5, 0.7], margin=0.1) == ([(1, 0)], 0)


def test_all_pairs_every_two_answers_above_the_margin_and_counts_the_ties():
    # 0 vs 1: 1.0 apart -> (0, 1); 0 vs 2: 0.1 -> tie; 1 vs 2: 0.9 -> (2, 1); 3 failed: in no pair
    assert form_pairs([1.0, 0.0, 0.9, None], "all", margin=0.2) == ([(0, 1), (2, 1)], 1)
    # four answers, two rewards: the 2 equal pairs are ties, the 4 mixed pairs are pairs
    pairs, ties = form_pairs([1.0, 0.0, 1.0, 0.0], "all")
    assert sorted(pairs) == [(0, 1), (0, 3), (2, 1), (2, 3)] and ties == 2


def test_answers_the_judge_failed_on_are_never_paired_or_kept():
    assert form_pairs([None, 1.0]) == ([], 0)
    assert form_pairs([None, None, 0.0, 1.0]) == ([(3, 2)], 0)
    assert best_answer([None, None], None) is None
    assert best_answer([0.2, None, 0.9], None) == 2
    assert best_answer([0.2, 0.9], threshold=1.0) is None


def test_a_cut_off_answer_is_never_kept_whatever_its_reward():
    # Issue 13: kept cut-off answers taught the policy not to stop; the stop share fell to 0.1.
    assert best_answer([0.1, 2.0, 1.0], None, stopped=[True, False, True]) == 2
    assert best_answer([0.1, 2.0], None, stopped=[False, False]) is None
    assert best_answer([0.1, 2.0, 1.0], threshold=1.5, stopped=[True, False, True]) is None


def test_unknown_pairing_is_refused():
    with pytest.raises(VlmtuneError, match="best_worst or all"):
        form_pairs([0.0, 1.0], "some")


def test_copeland_counts_wins_minus_losses_ties_and_failures_give_nothing():
    # 0 beats 1, 2 beats 0, 1 vs 2 a tie: 0 -> 1 - 1 = 0, 1 -> -1, 2 -> +1; 3 only failed: no reward
    verdicts = {(0, 1): 1, (0, 2): -1, (1, 2): 0, (0, 3): None, (1, 3): None, (2, 3): None}
    assert copeland(verdicts, 4) == [0.0, -1.0, 1.0, None]


# ----------------------------------------------------------------------------------- the step


def _raw(model_dir, data, out, algo="online_dpo", max_steps=3, **online) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"train": str(data), "max_length": 128},
        "loss": {"dpop_lambda": 5.0},
        "train": {"algo": algo, "output_dir": str(out), "lr": 1e-2, "max_steps": max_steps, "batch_size": 2,
                  "schedule": "constant", "save_every": 2, "progress": False},
        "online": {"group_size": 3, "max_new_tokens": 6, "rewards": ["test_online:length_reward"], **online},
    }


def _plain_logp(model, processor, record, completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p(completion | prompt) from one ordinary forward of ``prompt | completion`` (no grouping),
    the logits divided by ``temperature``."""
    prompt = encode_prompts([(record.images, record.prompt)], processor)
    n = len(completion)
    ids = torch.cat([prompt["input_ids"], torch.tensor([completion])], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": prompt["pixel_values"], "image_grid_thw": prompt["image_grid_thw"]}
    if "mm_token_type_ids" in prompt:
        inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros((1, n), dtype=torch.long)], 1)
    logits = model(**inputs, use_cache=False).logits[0, -n - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None]).sum()


@pytest.mark.parametrize("loss_name, shared_prompt", [("dpop", True), ("dpo", False), ("mpo", True)])
def test_online_loss_equals_preference_loss_on_plain_per_answer_forwards(
    tiny_model_dir, synth_pairs_file, tmp_path, loss_name, shared_prompt
):
    raw = _raw(tiny_model_dir, synth_pairs_file, tmp_path / "run", pairs="all", shared_prompt=shared_prompt,
               temperature=0.7)  # sampled at 0.7, scored under the model's own distribution
    raw["loss"]["name"] = loss_name
    trainer = Trainer(validate_config(raw))
    step = trainer.step_fn
    assert isinstance(step, OnlineDpoStep) and step.loss.name == loss_name
    model = trainer.model
    with torch.no_grad():  # move the adapter off zero, so policy and reference differ
        generator = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    records = trainer.train_records[:2]
    torch.manual_seed(3)
    batch = step.encode(records)
    assert len(batch) > 0
    model.eval()  # no dropout either way; the step's loss with gradients, compared without
    loss, metrics = step.loss_and_metrics(batch)

    # Independently: which record and answer each chosen / rejected row is, one plain forward each.
    k = step.config.group_size
    completions = batch.group.completion_ids
    lengths = batch.group.completion_mask.sum(1)

    def logps(model_, rows_):
        answers = [(records[batch.sources[r // k]], completions[r, : lengths[r]].tolist()) for r in rows_.tolist()]
        return torch.stack([_plain_logp(model_, trainer.processor, record, ids) for record, ids in answers])

    with torch.no_grad():
        pc, pr = logps(model, batch.chosen), logps(model, batch.rejected)
        with model.disable_adapter():
            rc, rr = logps(model, batch.chosen), logps(model, batch.rejected)
    assert not torch.allclose(pc, rc)  # the adapter matters: the reference is really the adapter off
    params = {"dpop": {"dpop_lambda": 5.0}, "dpo": {"label_smoothing": 0.0},
              "mpo": {"weights": (0.8, 0.2, 1.0), "delta": 0.0}}[loss_name]
    expected, chosen_rewards, rejected_rewards = preference_loss(
        loss_name, pc, pr, rc, rr, chosen_lengths=lengths[batch.chosen], rejected_lengths=lengths[batch.rejected],
        beta=0.1, **params)
    torch.testing.assert_close(loss.detach(), expected.mean(), rtol=1e-4, atol=1e-5)
    assert math.isclose(metrics["rewards/margins"], (chosen_rewards - rejected_rewards).mean().item(),
                        rel_tol=1e-3, abs_tol=1e-5)
    assert math.isclose(metrics["logps/chosen"], pc.mean().item(), rel_tol=1e-4)
    assert metrics["pairs/formed"] == len(batch)
    assert metrics["pairs/chosen_reward"] > metrics["pairs/rejected_reward"]


def test_online_dpo_defaults_to_dpop_and_an_explicit_loss_wins(tiny_model_dir, synth_pairs_file, tmp_path):
    raw = _raw(tiny_model_dir, synth_pairs_file, tmp_path / "run")
    del raw["loss"]
    assert validate_config(raw).loss.name == "dpop"
    raw["loss"] = {"name": "ipo"}
    assert validate_config(raw).loss.name == "ipo"
    raw["train"]["algo"] = "dpo"
    del raw["loss"]
    assert validate_config(raw).loss.name == "dpo"


def test_judge_settings_are_checked(tiny_model_dir, synth_pairs_file, tmp_path):
    for online, message in [({"judge": "http"}, "judge_url and online.judge_model"),
                            ({"judge": "local"}, "needs online.judge_model"),
                            ({"judge_mode": "pairwise"}, "pairwise needs an http or local judge")]:
        with pytest.raises(VlmtuneError, match=message):
            validate_config(_raw(tiny_model_dir, synth_pairs_file, tmp_path, **online))


def test_rft_keeps_the_best_answer_above_the_threshold(tiny_model_dir, synth_pairs_file, tmp_path):
    trainer = Trainer(validate_config(_raw(tiny_model_dir, synth_pairs_file, tmp_path / "r", algo="rft")))
    step = trainer.step_fn
    assert isinstance(step, RftStep)
    records = trainer.train_records[:2]
    torch.manual_seed(5)
    drawn = replace(step.sampler.draw(records), stopped=[True] * 6)  # as if every answer had stopped
    batch = step.keep(drawn)
    assert batch.kept == 2 and batch.group.group_size == 1
    for i in range(2):  # each kept answer is its prompt's longest (the length reward's best)
        best = max(range(3), key=lambda j: drawn.rewards[i][j])
        expected = drawn.completions[i * 3 + best]
        assert batch.group.completion_ids[i, : len(expected)].tolist() == expected
    step.config.rft_threshold = 1e9  # no answer is that long: nothing kept, a zero loss
    empty = step.keep(drawn)
    loss, metrics = step.loss_and_metrics(empty)
    assert empty.kept == 0 and loss.item() == 0.0 and metrics["rft/kept"] == 0.0
    loss.backward()  # still a graph the loop can step through


def test_rft_scores_its_answers_at_the_sampling_temperature(tiny_model_dir, synth_pairs_file, tmp_path):
    # Issue 13: scored at T = 1, SFT on answers drawn at T = 1.2 flattened the policy until it no longer stopped.
    raw = _raw(tiny_model_dir, synth_pairs_file, tmp_path / "r", algo="rft", temperature=1.5)
    trainer = Trainer(validate_config(raw))
    step, records = trainer.step_fn, trainer.train_records[:2]
    torch.manual_seed(5)
    drawn = replace(step.sampler.draw(records), stopped=[True] * 6)
    batch = step.keep(drawn)
    loss, metrics = step.loss_and_metrics(batch)
    expected = []
    for i, record in enumerate(records):
        completion = batch.group.completion_ids[i][batch.group.completion_mask[i].bool()].tolist()
        logp = _plain_logp(trainer.model, trainer.processor, record, completion, temperature=1.5)
        expected.append(-logp / len(completion))
    assert batch.kept == 2
    assert math.isclose(loss.item(), torch.stack(expected).mean().item(), rel_tol=1e-4)


def test_rft_trains_only_on_answers_that_ended_with_their_stop_token(tiny_model_dir, synth_pairs_file, tmp_path):
    trainer = Trainer(validate_config(_raw(tiny_model_dir, synth_pairs_file, tmp_path / "r", algo="rft")))
    step, records = trainer.step_fn, trainer.train_records[:2]
    torch.manual_seed(5)
    drawn = step.sampler.draw(records)
    assert not any(drawn.stopped)  # the random tiny model does not stop within 6 tokens
    torch.manual_seed(5)
    assert step.encode(records).kept == 0  # every answer cut off: none kept, however long
    longest = max(range(3), key=lambda j: drawn.rewards[0][j])
    stopped = [j != longest for j in range(3)] + [False] * 3  # record 0's best cut off, record 1's all
    batch = step.keep(replace(drawn, stopped=stopped))
    runner_up = best_answer(drawn.rewards[0], None, stopped[:3])
    expected = drawn.completions[runner_up]
    assert batch.kept == 1 and batch.metrics["rft/kept"] == 0.5 and runner_up != longest
    assert batch.group.completion_ids[0, : len(expected)].tolist() == expected


def test_online_dpo_without_pairs_contributes_a_zero_loss(tiny_model_dir, synth_pairs_file, tmp_path):
    trainer = Trainer(validate_config(_raw(tiny_model_dir, synth_pairs_file, tmp_path / "r", margin=1e9)))
    batch = trainer.step_fn.encode(trainer.train_records[:2])
    loss, metrics = trainer.step_fn.loss_and_metrics(batch)
    assert len(batch) == 0 and loss.item() == 0.0
    assert metrics["pairs/formed"] == 0 and metrics["pairs/dropped_ties"] == 2
    assert "rewards/margins" in metrics and "objective/kl" in metrics  # the names of a step with pairs
    loss.backward()


# ----------------------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("algo", ["online_dpo", "rft"])
def test_three_steps_from_the_cli_train_the_adapter_and_log_the_metrics(
    tiny_model_dir, synth_pairs_file, tmp_path, capsys, algo
):
    run = tmp_path / algo
    args = ["train", "--algo", algo, "--config", str(CONFIGS / "demo-cpu.yaml"),
            f"model.name_or_path={tiny_model_dir}", f"data.train={synth_pairs_file}",
            f"data.eval={synth_pairs_file}", f"train.output_dir={run}", "train.max_steps=3",
            "train.batch_size=2", "train.grad_accum=1", "train.eval_every=3", "train.save_every=3",
            "train.progress=false", "train.lr=1e-2", "online.group_size=3",
            # RFT keeps only answers that stopped: long enough for the random tiny model to stop at times
            f"online.max_new_tokens={6 if algo == 'online_dpo' else 64}", "online.rewards=[test_online:length_reward]"]
    assert main(args) == 0
    assert "final model" in capsys.readouterr().out
    train = [r for r in rows(run) if "loss" in r and "eval/loss" not in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    names = ["loss", "grad_norm", "objective/scores", "val/contain_eos_token", "judge/failures",
             "completions/mean_length"]
    names += (["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected", "objective/kl", "objective/scores_margin", "objective/entropy", "beta",
               "pairs/formed", "pairs/dropped_ties", "pairs/chosen_reward"]
              if algo == "online_dpo" else ["logps/chosen", "rft/kept", "rft/kept_reward"])
    for row in train:
        for name in names:
            assert name in row and math.isfinite(row[name]), (row["step"], name)
    assert any(r["grad_norm"] > 0 for r in train)
    assert algo == "online_dpo" or any(r["rft/kept"] > 0 for r in train)
    evals = [r for r in rows(run) if "eval/exact_match" in r]
    assert len(evals) == 1
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    lora_b = [v for name, v in adapter.items() if "lora_B" in name]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # LoRA's B starts at zero: it moved
    card = (run / "final" / "README.md").read_text()
    assert ("online DPO" in card) if algo == "online_dpo" else ("rejection-sampling fine-tuning" in card)


@pytest.mark.parametrize("algo", ["online_dpo", "rft"])
def test_resume_continues_the_identical_curve(tiny_model_dir, synth_pairs_file, tmp_path, algo):
    """Sampling is part of the curve: the resumed run must draw the same answers."""
    # RFT keeps only answers that stopped: long enough for the random tiny model to stop at times
    online = {} if algo == "online_dpo" else {"max_new_tokens": 64, "group_size": 6}
    Trainer(validate_config(_raw(tiny_model_dir, synth_pairs_file, tmp_path / "whole", algo, 4, **online))).train()
    Trainer(validate_config(_raw(tiny_model_dir, synth_pairs_file, tmp_path / "parts", algo, 2, **online))).train()
    Trainer(validate_config(_raw(tiny_model_dir, synth_pairs_file, tmp_path / "parts", algo, 4, **online)),
            resume=True).train()
    whole = [r for r in rows(tmp_path / "whole") if "loss" in r]
    parts = [r for r in rows(tmp_path / "parts") if "loss" in r]
    assert [r["step"] for r in parts] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0 for r in whole)  # real updates, so a wrong resume would show
    for a, b in zip(whole, parts):
        for name in ("loss", "objective/scores", "completions/mean_length", "logps/chosen", "grad_norm"):
            assert math.isclose(a[name], b[name], rel_tol=1e-6, abs_tol=1e-6), (a["step"], name, a[name], b[name])



# ----------------------------------------------------------------------------------- a pairwise judge


def _answers_in(conversation) -> tuple[str, str]:
    text = conversation[-1]["content"][-1]["text"]
    a = re.search(r"Assistant A's Answer\]\n(.*)\n\[The End of Assistant A", text, re.S).group(1)
    b = re.search(r"Assistant B's Answer\]\n(.*)\n\[The End of Assistant B", text, re.S).group(1)
    return a, b


def _longer_wins(conversations) -> list[str]:
    """A judge model that prefers the longer answer, whichever side it is shown on."""
    replies = []
    for conversation in conversations:
        a, b = _answers_in(conversation)
        replies.append("[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]")
    return replies


def test_a_pairwise_judge_ranks_by_wins_and_a_position_biased_one_forms_no_pair(
    tiny_model_dir, synth_pairs_file, tmp_path
):
    trainer = Trainer(validate_config(_raw(tiny_model_dir, synth_pairs_file, tmp_path / "r")))
    model, processor, records = trainer.step_fn.unwrapped, trainer.processor, trainer.train_records[:2]
    by_reward = GroupSampler(model, processor, trainer.config.online, RewardJudge(["test_online:length_reward"]))
    pairwise = OnlineConfig(group_size=3, max_new_tokens=6, judge="http", judge_url="http://127.0.0.1:9",
                            judge_model="m", judge_mode="pairwise")
    longer = GroupSampler(model, processor, pairwise, PromptJudge(_longer_wins, {"model": "longer"}))
    biased = GroupSampler(model, processor, pairwise, PromptJudge(lambda cs: ["[[A]]"] * len(cs), {"model": "a"}))
    drawn = {}
    for name, sampler in (("reward", by_reward), ("longer", longer), ("biased", biased)):
        torch.manual_seed(11)
        drawn[name] = sampler.draw(records)
    assert drawn["longer"].texts == drawn["reward"].texts  # the same samples, judged three ways
    for i in range(2):
        lengths = [len(t) for t in drawn["reward"].texts[i * 3 : (i + 1) * 3]]
        expected = [float(sum((x > y) - (x < y) for y in lengths)) for x in lengths]  # wins minus losses
        assert drawn["longer"].rewards[i] == expected
        assert form_pairs(drawn["longer"].rewards[i]) == form_pairs(drawn["reward"].rewards[i])
    # "[[A]]" whatever the order: the two orders disagree on every pair, so every pair is a tie.
    assert drawn["biased"].metrics["judge/inconsistent"] == 6 and drawn["biased"].metrics["judge/failures"] == 0
    assert all(form_pairs(r) == ([], 1) for r in drawn["biased"].rewards)


# ----------------------------------------------------------------------------------- an HTTP judge


@pytest.fixture(scope="module")
def length_judge_server():
    """A real OpenAI-compatible judge on 127.0.0.1 that rates an answer by its length (1 to 10)."""
    app = FastAPI()
    seen: list[str] = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        text = " ".join(p["text"] for p in (await request.json())["messages"][-1]["content"] if p["type"] == "text")
        answer = text.split("[The Start of Assistant's Answer]\n", 1)[1].split("\n[The End of Assistant's Answer]")[0]
        seen.append(answer)
        rating = min(10, 1 + len(answer))
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"Rating: [[{rating}]]"}}]}

    with serve_in_thread(app) as base:
        yield base + "/v1", seen


def test_online_dpo_with_an_http_judge_trains_on_its_ratings(
    tiny_model_dir, synth_pairs_file, tmp_path, length_judge_server
):
    url, seen = length_judge_server
    seen.clear()
    raw = _raw(tiny_model_dir, synth_pairs_file, tmp_path / "run", max_steps=2, judge="http", judge_url=url,
               judge_model="length-judge", judge_cache=str(tmp_path / "judge"))
    trainer = Trainer(validate_config(raw))
    trainer.train()
    train_rows = [r for r in rows(tmp_path / "run") if "loss" in r]
    assert len(seen) == 2 * 2 * 3  # steps x prompts x answers, each rated once
    assert all(r["judge/failures"] == 0 for r in train_rows)
    assert sum(r["pairs/formed"] for r in train_rows) > 0 and all(math.isfinite(r["loss"]) for r in train_rows)
    for r in train_rows:  # chosen answers are the longer ones: their ratings are higher
        assert r["pairs/formed"] == 0 or r["pairs/chosen_reward"] > r["pairs/rejected_reward"]
    assert len((tmp_path / "judge" / "judge_replies.jsonl").read_text().splitlines()) == len(set(seen))
