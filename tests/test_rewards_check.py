"""Task rewards against adversarial completions, and `vlmtune rewards check` itself."""

import pytest

from vlmtune.cli import main
from vlmtune.tasks.rewards import TASK_REWARDS, task_accuracy_reward, task_format_reward
from vlmtune.tasks.rewards_check import CASES, check_reward, probes


@pytest.mark.parametrize("name", list(TASK_REWARDS))
def test_builtin_task_rewards_pay_nothing_adversarial_and_pay_gold(name):
    row = check_reward(name, TASK_REWARDS[name])
    assert row.paid == {case: 0.0 for case in CASES}
    assert row.gold > 0 and row.ok


def test_probes_cover_every_family_plain_and_thinking():
    names = [p.name for p in probes()]
    for family in ("count", "compare", "arithmetic", "spatial", "attribute", "grounding", "list", "multihop"):
        assert family in names and f"{family} (think)" in names
    assert "count (legacy record)" in names


def test_a_substring_reward_is_caught(tmp_path, monkeypatch, capsys):
    """A reward that looks for the gold answer anywhere in the completion pays on most cases."""
    (tmp_path / "naive_reward.py").write_text(
        "from vlmtune.tasks.answers import render\n"
        "def contains(completions, metadata, **kwargs):\n"
        "    out = []\n"
        "    for c, m in zip(completions, metadata):\n"
        "        t = m.get('task') or {'kind': 'counts', 'answer': m['counts'],\n"
        "                              'extra': {'classes': list(m['counts'])}}\n"
        "        out.append(1.0 if render(t['kind'], t['answer'], t.get('extra') or {}) in c else 0.0)\n"
        "    return out\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["rewards", "check", "--reward", "naive_reward:contains", "--reward", "task_accuracy"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "pass" in out


def test_a_reward_that_never_pays_fails(tmp_path, monkeypatch):
    (tmp_path / "zero_reward.py").write_text("def zero(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["rewards", "check", "--reward", "zero_reward:zero"]) == 1


def test_builtin_check_exits_zero(capsys):
    assert main(["rewards", "check"]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_unknown_reward_name(capsys):
    assert main(["rewards", "check", "--reward", "nope"]) == 2
    assert "unknown reward 'nope'" in capsys.readouterr().err


def test_format_reward_is_small_and_apart_from_accuracy():
    meta = {"task": {"family": "arithmetic", "kind": "integer", "answer": 4, "think": True}}
    completions = ["<think>2 + 2</think><answer>4</answer>", "<think>2 + 3</think><answer>5</answer>",
                   "<think>2 + 2</think><answer>four or five</answer>", "4"]
    assert task_format_reward(completions, [meta] * 4) == [0.1, 0.1, 0.0, 0.0]
    assert task_accuracy_reward(completions, [meta] * 4) == [1.0, 0.0, 0.0, 0.0]
