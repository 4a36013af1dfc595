"""The old reward names (now the task rewards) on counting records; strings and message-list completions."""

import doctest

import vlmtune.rewards as rewards
from vlmtune.rewards import completion_text, count_exact_reward, count_format_reward, count_partial_reward

GOLD = {"car": 2, "motorcycle": 3, "bus": 0, "bicycle": 0}
PHRASINGS = [
    ("There are 2 cars, 3 motorcycles, 0 buses, 0 bicycles in the image.", 1.0, 1.0, 1.0),
    ("There are 2 cars, 3 motorcycles, 0 buss, 0 bicycles in the image.", 1.0, 1.0, 1.0),
    ("two cars, three motorbikes, no buses and zero bicycles", 1.0, 1.0, 1.0),
    ("There are 2 cars, 3 motorcycles, 1 bus, 0 bicycles in the image.", 0.0, 0.75, 1.0),
    # count_format is task_format now: the answer block parses (a total, some classes), not "names every class".
    ("There are 5 vehicles in the image.", 0.0, 0.0, 1.0),
    ("2 cars and 3 motorcycles", 0.0, 0.5, 1.0),
    ("I don't know.", 0.0, 0.0, 0.0),
]


def test_doctests_pass():
    assert doctest.testmod(rewards).failed == 0


def test_rewards_on_many_phrasings():
    texts = [p[0] for p in PHRASINGS]
    gold = [GOLD] * len(texts)
    assert count_exact_reward(texts, counts=gold) == [p[1] for p in PHRASINGS]
    assert count_partial_reward(texts, counts=gold) == [p[2] for p in PHRASINGS]
    assert count_format_reward(texts, counts=gold) == [p[3] for p in PHRASINGS]


def test_message_list_completions_read_like_strings():
    plain = [p[0] for p in PHRASINGS]
    as_str = [[{"role": "assistant", "content": t}] for t in plain]
    as_parts = [[{"role": "assistant", "content": [{"type": "text", "text": t}]}] for t in plain]
    gold = [GOLD] * len(plain)
    expected = count_partial_reward(plain, counts=gold)
    assert count_partial_reward(as_str, counts=gold) == expected
    assert count_partial_reward(as_parts, counts=gold) == expected
    assert completion_text([]) == ""


def test_classes_follow_the_gold_counts():
    gold = [{"bus": 1, "truck": 2}]
    assert count_exact_reward(["1 bus and 2 trucks"], counts=gold) == [1.0]
    assert count_format_reward(["There are 1 bus, 2 trucks."], counts=gold) == [1.0]
    assert count_format_reward(["I see a bus or a truck."], counts=gold) == [0.0]


def test_extra_trl_columns_are_accepted():
    out = count_exact_reward(["2 cars"], counts=[{"car": 2}], prompts=["p"], completion_ids=[[1]])
    assert out == [1.0]


def test_old_names_pass_the_rewards_check():
    """count_exact, count_partial and count_format are the task rewards: no adversarial completion pays,
    on count records or any other family's (the check's probes cover every family)."""
    from vlmtune.cli import main
    from vlmtune.tasks.rewards_check import check_reward
    from vlmtune.train.grpo import BUILTIN_REWARDS

    for name in ("count_exact", "count_partial", "count_format"):
        row = check_reward(name, BUILTIN_REWARDS[name])
        assert row.ok, (name, row.paid, row.gold)
    args = ["rewards", "check", "--reward", "count_exact", "--reward", "count_partial", "--reward", "count_format"]
    assert main(args) == 0


def test_old_names_work_on_records_of_other_families():
    meta = {"task": {"family": "compare", "kind": "verdict", "answer": "more", "think": False}}
    assert count_exact_reward(["more", "fewer"], metadata=[meta, meta]) == [1.0, 0.0]
    assert count_partial_reward(["more", "more or fewer"], metadata=[meta, meta]) == [1.0, 0.0]
    assert count_format_reward(["fewer", "I think more or fewer"], metadata=[meta, meta]) == [1.0, 0.0]
