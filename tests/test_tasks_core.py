"""The task core: strict answer blocks, IoU, edit distance, answer kinds, which task a record has."""

import pytest

from vlmtune.errors import VlmtuneError
from vlmtune.tasks import answers
from vlmtune.tasks.core import answer_block, edit_distance, format_ok, iou, task_meta, task_of
from vlmtune.tasks.count import CountFamily
from vlmtune.tasks.spatial import SpatialFamily


@pytest.mark.parametrize("text, think, expected", [
    ("3", False, "3"),
    ("  3 \n", False, "3"),
    ("3", True, None),  # a thinking record needs the answer block
    ("<answer>3</answer>", False, "3"),
    ("<answer>3</answer>", True, "3"),
    ("<think>1 + 2</think>\n<answer> 3 </answer>", True, "3"),
    ("<think>3</think>", True, None),
    ("<think>3</think>", False, None),
    ("<answer>3</answer><answer>4</answer>", True, None),
    ("<think>a</think><think>b</think><answer>3</answer>", True, None),
    ("So: <answer>3</answer>", True, None),  # text outside the blocks
    ("<answer>3</answer> and more", True, None),
    ("<answer>3", True, None),
    ("<think><answer>3</answer></think><answer>4</answer>", True, None),
])
def test_answer_block_is_strict(text, think, expected):
    assert answer_block(text, think) == expected


def test_format_needs_reasoning_when_thinking():
    assert format_ok("<think>2 and 1</think><answer>3</answer>", True)
    assert not format_ok("<think> </think><answer>3</answer>", True)
    assert not format_ok("<answer></answer>", False)
    assert format_ok("3", False)


def test_iou_and_edit_distance_hand_worked():
    # Two 2x2 squares sharing a 1x2 strip: 2 / (4 + 4 - 2).
    assert iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(1 / 3)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert iou((0, 0, 4, 4), (0, 0, 4, 4)) == 1.0
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3


@pytest.mark.parametrize("kind, text, expected", [
    ("integer", "3", 3), ("integer", "three", 3), ("integer", "none", 0), ("integer", "no", None),
    ("integer", "3.", 3), ("integer", "3 or 4", None),
    ("integer", "3, 4", None), ("integer", "There are 3.", None), ("integer", "", None),
    ("verdict", "More", "more"), ("verdict", "more or fewer", None), ("verdict", "same.", "same"),
    ("box", "[1, 2, 30, 40]", [1, 2, 30, 40]), ("box", "(1,2),(30,40)", [1, 2, 30, 40]),
    ("box", "[30, 2, 1, 40]", None), ("box", "[1, 2, 30, 40], [5, 5, 9, 9]", None), ("box", "[1, 2, 30]", None),
    ("boxes", "[]", []), ("boxes", "[[1, 2, 3, 4], [5, 6, 7, 8]]", [[1, 2, 3, 4], [5, 6, 7, 8]]),
    ("boxes", "[[1, 2, 3, 4] [5, 6, 7, 8]]", None), ("boxes", "[[1, 2, 3, 4],]", None),
    ("compound", "2 buses, 3 cars: fewer", [[2, "buses"], [3, "cars"], "fewer"]),
    ("compound", "2 buses, 3 cars: fewer or same", None),
])
def test_parsers_read_one_whole_answer(kind, text, expected):
    parsed = answers.parse(kind, text, {})
    assert (parsed if parsed is None else [float(v) for v in parsed] if kind == "box" else parsed) == (
        expected if expected is None or kind != "box" else [float(v) for v in expected])


def test_counts_kind_rejects_contradictions_but_reads_free_text():
    extra = {"classes": ["car", "bus"]}
    gold = {"car": 2, "bus": 0}
    assert answers.score("counts", answers.parse("counts", "2 cars and no buses", extra), gold, extra) == 1.0
    assert answers.parse("counts", "2 cars, 3 cars, 0 buses", extra) is None
    assert answers.parse("counts", "2 or 3 cars, 0 buses", extra) is None


def test_compound_pays_only_with_counts_and_verdict_right():
    gold = [[2, "bus"], [3, "car"], "fewer"]
    score = lambda text: answers.score("compound", answers.parse("compound", text, {}), gold, {})  # noqa: E731
    assert score("2 buses, 3 cars: fewer") == 1.0
    assert score("2 buses, 4 cars: fewer") == 0.0
    assert score("2 buses, 3 cars: more") == 0.0
    assert score("2 cars, 3 buses: fewer") == 0.0


def test_list_reward_hand_worked():
    gold = [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert answers.list_reward(gold, gold) == 1.0
    # One box right, one missed: matched IoU 1/2, no penalty (2 gold / 1 predicted > 1).
    assert answers.list_reward([[0, 0, 10, 10]], gold) == 0.5
    # Both right plus two spam boxes: 1.0 x 2/4.
    assert answers.list_reward(gold + [[40, 40, 50, 50], [60, 60, 70, 70]], gold) == 0.5
    # Half-shifted box: IoU 50/150 = 1/3, over 2 gold boxes.
    assert answers.list_reward([[5, 0, 15, 10]], gold) == pytest.approx(1 / 6)
    assert answers.list_reward([], []) == 1.0 and answers.list_reward([[0, 0, 1, 1]], []) == 0.0


def test_over_long_answer_is_not_read():
    meta = {"kind": "integer", "answer": 3, "think": False}
    assert answers.score_completion("3", meta) == 1.0
    assert answers.score_completion("3" + " " * 40, meta) == 1.0  # stripped first
    assert answers.score_completion("The answer is clearly 3", meta) == 0.0


def test_task_of_reads_the_family_and_falls_back_to_counting():
    assert isinstance(task_of({"task": {"family": "spatial"}}), SpatialFamily)
    legacy = {"counts": {"car": 2, "bus": 0}, "split": "train"}
    assert isinstance(task_of(legacy), CountFamily)
    meta = task_meta(legacy)
    assert task_of(legacy).score("There are 2 cars, 0 buses in the image.", meta) == 1.0
    assert task_of(legacy).score("There are 2 cars, 1 bus in the image.", meta) == 0.0
    with pytest.raises(VlmtuneError, match="unknown task family 'nope'.*count, compare"):
        task_of({"task": {"family": "nope"}})
    with pytest.raises(VlmtuneError, match="neither 'task' nor 'counts'"):
        task_of({"split": "train"})


def test_user_task_by_module_and_class(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(
        "from vlmtune.tasks.base import ProgramTask\n"
        "class Parity(ProgramTask):\n    family = 'parity'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = task_of({"task": {"family": "my_tasks:Parity"}})
    assert type(task).__name__ == "Parity"
    with pytest.raises(VlmtuneError, match="no class 'Nope'"):
        task_of({"task": {"family": "my_tasks:Nope"}})
    with pytest.raises(VlmtuneError, match="cannot import module"):
        task_of({"task": {"family": "no_such_module_xyz:Task"}})


def test_doctests_pass():
    import doctest

    from vlmtune.tasks import core, grounding, programs, rewards

    for module in (core, answers, grounding, programs, rewards):
        assert doctest.testmod(module).failed == 0, module.__name__
