"""Every family's programs against a hand-worked scene, their slips, and the box conventions.

The scene (112 x 112 px, so the relation margin is 0.04 * 112 = 4.48 px)::

    #  class       box                 colour size   centre    area
    0  bus         (10, 10, 40, 34)    red    large  (25, 22)  720
    1  car         (60, 20, 80, 32)    blue   small  (70, 26)  240
    2  car         (70, 60, 98, 80)    red    large  (84, 70)  560
    3  motorcycle  (5, 70, 15, 80)     red    small  (10, 75)  100
    4  bicycle     (40, 90, 56, 100)   green  small  (48, 95)  160
    5  car         (20, 50, 40, 62)    blue   small  (30, 56)  240
"""

import random

import pytest

from vlmtune.tasks import answers
from vlmtune.tasks.arithmetic import ArithmeticFamily, diff_program, remove_program, sum_program
from vlmtune.tasks.attribute import AttributeFamily, attribute_program
from vlmtune.tasks.compare import CompareFamily, compare_program
from vlmtune.tasks.core import Obj, Scene, render_completion
from vlmtune.tasks.count import CountFamily
from vlmtune.tasks.grounding import GroundingFamily, answer_frame, ground_program
from vlmtune.tasks.listing import ListFamily, list_program
from vlmtune.tasks.multihop import MultihopFamily, hop_program
from vlmtune.tasks.programs import execute, slips
from vlmtune.tasks.spatial import SpatialFamily, relate_program

CLASSES = ("car", "motorcycle", "bus", "bicycle")
OBJECTS = (
    Obj("bus", (10, 10, 40, 34), "red", "large"), Obj("car", (60, 20, 80, 32), "blue", "small"),
    Obj("car", (70, 60, 98, 80), "red", "large"), Obj("motorcycle", (5, 70, 15, 80), "red", "small"),
    Obj("bicycle", (40, 90, 56, 100), "green", "small"), Obj("car", (20, 50, 40, 62), "blue", "small"),
)
SCENE = Scene("scene.png", 112, 112, OBJECTS, "scene", CLASSES)


def asked(task, program, scene=SCENE):
    """The family's question with this program on the scene, or None when it was not asked."""
    for seed in range(5):  # phrasing and compound form are random; the programs are not
        for q in task.questions(scene, random.Random(seed)):
            if q is not None and q.program == program:
                return q
    return None


def test_count_family_answers_every_class():
    (q,) = CountFamily().questions(SCENE, random.Random(0))
    assert q.answer == {"car": 3, "motorcycle": 1, "bus": 1, "bicycle": 1}
    assert answers.render(q.kind, q.answer, q.extra) == "There are 3 cars, 1 motorcycle, 1 bus, 1 bicycle in the image."
    assert q.trace == ["Count each class: 3 cars, 1 motorcycle, 1 bus, 1 bicycle."]


def test_compare_verdict_and_compound():
    assert execute(compare_program("car", "bus"), SCENE)[0] == "more"
    assert execute(compare_program("bicycle", "car"), SCENE)[0] == "fewer"
    assert execute(compare_program("bus", "bicycle"), SCENE)[0] == "same"
    task = CompareFamily()
    q = task.make("compound", "?", compare_program("car", "bus"), SCENE, 0, {"a": "car", "b": "bus"})
    assert q.answer == [[3, "car"], [1, "bus"], "more"]
    assert answers.render("compound", q.answer, {}) == "3 cars, 1 bus: more"
    wrong = {answers.render("compound", n.answer, {}) for n in task.negatives(q, SCENE)}
    assert "1 cars, 3 buses: fewer" not in wrong and "3 cars, 1 bus: fewer" in wrong  # a slip or a near miss
    assert "4 cars, 1 bus: more" in wrong  # count_one_more on the cars


def test_arithmetic_sum_difference_removal():
    assert execute(sum_program(["motorcycle", "bicycle"]), SCENE)[0] == 2
    assert execute(sum_program(["car", "bus"]), SCENE)[0] == 4
    assert execute(diff_program("car", "bus"), SCENE)[0] == 2
    assert execute(remove_program("car"), SCENE)[0] == 3
    task = ArithmeticFamily()
    assert asked(task, diff_program("car", "bus")) is not None
    assert asked(task, diff_program("bus", "car")) is None  # negative difference: not asked
    q = asked(task, remove_program("car"))
    assert q.trace == ["Find every object: 6 found.", "Remove every car: 3 left.", "Count them: 3."]
    slipped = {n.slip: n.answer for n in task.negatives(q, SCENE)}
    assert slipped["forget_removal"] == 6


def test_spatial_margin_and_degenerate_rules():
    task = SpatialFamily()
    q = asked(task, relate_program("car", "bicycle", "left"))
    assert q is not None and q.answer == 1 and q.hops == 3  # only car 5 (x 30 < 48 - 4.48)
    # Car 1 is 4 px below the bus's centre: within the margin, so no above/below question on the bus.
    assert asked(task, relate_program("car", "bus", "below")) is None
    assert asked(task, relate_program("car", "bus", "above")) is None
    # All three cars are right of the bicycle? No: cars 1 and 2 are; car 5 is not. But all cars
    # are right of the bus (70, 84, 30 > 25 + 4.48): the relation changes nothing, not asked.
    assert asked(task, relate_program("car", "bus", "right")) is None
    assert asked(task, relate_program("car", "car", "left")) is None  # the reference is not unique
    slipped = {n.slip: n.answer for n in task.negatives(q, SCENE)}
    assert slipped["flip_relation"] == 2 and slipped["ignore_relation"] == 3


def test_attribute_colour_size_and_degenerate():
    task = AttributeFamily()
    assert asked(task, attribute_program("car", colour="red")).answer == 1
    assert asked(task, attribute_program("car", size="small")).answer == 2
    assert asked(task, attribute_program("bus", size="large")) is None  # the only bus is large: degenerate
    q = asked(task, attribute_program("car", colour="blue"))
    assert {n.slip: n.answer for n in task.negatives(q, SCENE)}["ignore_colour"] == 3
    bare = Scene("s.png", 112, 112, tuple(Obj(o.cls, o.box) for o in OBJECTS), "s", CLASSES)
    assert task.questions(bare, random.Random(0)) == []  # no colours: nothing to ask


def test_grounding_unique_by_margin():
    task = GroundingFamily()
    assert asked(task, ground_program("car", "largest")).answer == [70, 60, 98, 80]
    assert asked(task, ground_program("car", "leftmost")).answer == [20, 50, 40, 62]
    assert asked(task, ground_program("car", "topmost")).answer == [60, 20, 80, 32]
    assert asked(task, ground_program("car", "smallest")) is None  # two cars of area 240
    assert asked(task, ground_program("bus", "largest")) is None  # only one bus
    q = asked(task, ground_program("car", "leftmost"))
    assert {n.slip: n.answer for n in task.negatives(q, SCENE)}["wrong_extreme"] == [70, 60, 98, 80]
    q = asked(task, ground_program("car", "largest"))  # "smallest" is ambiguous: that slip gives nothing
    assert "wrong_extreme" not in {n.slip for n in task.negatives(q, SCENE)}


def test_box_conventions_per_family():
    # Qwen2-VL: 0-1000 relative. 70/112*1000 = 625, 60/112*1000 = 535.7, 98 -> 875, 80 -> 714.3.
    q = asked(GroundingFamily("qwen2_vl"), ground_program("car", "largest"))
    assert q.answer == [625, 536, 875, 714] and q.extra["frame"] == [1000, 1000]
    # Qwen2.5-VL: smart_resize(50, 100, factor 28) = (56, 112): x * 112/100, y * 56/50.
    assert answer_frame(100, 50, "qwen2_5_vl") == (112, 56)
    # Qwen3-VL: factor 32: round(50/32)*32 = 64, round(100/32)*32 = 96.
    assert answer_frame(100, 50, "qwen3_vl") == (96, 64)
    wide = Scene("w.png", 100, 50, (Obj("car", (10, 10, 30, 20)), Obj("car", (60, 20, 95, 45))), "w", ("car",))
    q = asked(GroundingFamily("qwen2_5_vl"), ground_program("car", "largest"), wide)
    assert q.answer == [67, 22, 106, 50]  # 60*1.12 = 67.2, 20*1.12 = 22.4, 95*1.12 = 106.4, 45*1.12 = 50.4


def test_wrong_convention_answers_are_caught():
    """A box in the other family's convention scores IoU ~0, never a pass."""
    scene = Scene("big.png", 224, 224, (Obj("car", (140, 120, 196, 160)), Obj("car", (10, 10, 30, 24))), "b", ("car",))
    rel = asked(GroundingFamily("qwen2_vl"), ground_program("car", "largest"), scene)
    pix = asked(GroundingFamily("qwen2_5_vl"), ground_program("car", "largest"), scene)
    assert pix.answer == [140, 120, 196, 160] and rel.answer == [625, 536, 875, 714]
    for right, wrong in ((pix, rel), (rel, pix)):
        meta = {"family": "grounding", "kind": "box", "answer": right.answer, "think": False, "extra": right.extra}
        said = answers.render("box", wrong.answer, {})
        assert answers.completion_metrics(said, meta)["acc@0.5"] == 0.0
        assert answers.score_completion(said, meta) < 0.1
        assert answers.score_completion(answers.render("box", right.answer, {}), meta) == 1.0


def test_list_family_all_boxes_and_spam():
    q = asked(ListFamily(), list_program("car"))
    assert q.answer == [[60, 20, 80, 32], [70, 60, 98, 80], [20, 50, 40, 62]]
    meta = {"kind": "boxes", "answer": q.answer, "think": False}
    assert answers.score_completion(answers.render("boxes", q.answer, {}), meta) == 1.0
    spam = q.answer + [[0, 0, 10, 10], [100, 100, 110, 110], [50, 0, 60, 10]]
    assert answers.score("boxes", spam, q.answer, {}) == 0.5  # 1.0 x 3/6


def test_multihop_two_three_and_four_hops():
    task = MultihopFamily()
    two = asked(task, hop_program("bus", "right"))
    assert two.hops == 2 and two.answer == 4  # cars 1, 2, 5 and the bicycle; not the motorcycle
    three = asked(task, hop_program("car", "above", "largest"))
    assert three.hops == 3 and three.answer == 3  # bus, car 1, car 5 (centres y < 70 - 4.48)
    four = asked(task, hop_program("car", "above", "largest", "motorcycle"))
    assert four.hops == 4 and four.answer == 0
    assert asked(task, hop_program("car", "left", "largest")) is None  # all five are left: degenerate
    assert "Of all objects, 3 are above the large red car at (84, 70)." in three.trace


def test_slips_name_one_change_each():
    program = hop_program("car", "above", "largest", "motorcycle")
    names = [name for name, _ in slips(program)]
    assert {"wrong_extreme", "flip_relation", "ignore_relation", "count_one_more"} <= set(names)
    for _, wrong in slips(program):
        assert sum(a != b for a, b in zip(program, wrong)) == 1


@pytest.mark.parametrize("task", [CountFamily(), CompareFamily(), ArithmeticFamily(), SpatialFamily(),
                                  AttributeFamily(), GroundingFamily(), ListFamily(), MultihopFamily()])
def test_every_gold_scores_one_and_every_negative_less(task):
    questions = [q for q in task.questions(SCENE, random.Random(1)) if q is not None]
    assert questions
    for q in questions:
        meta = {"family": task.family, "kind": q.kind, "answer": q.answer, "think": True, "extra": q.extra}
        gold = render_completion(answers.render(q.kind, q.answer, q.extra), q.trace, True)
        assert task.score(gold, meta) == 1.0
        negatives = task.negatives(q, SCENE)
        assert negatives
        for n in negatives:
            wrong = render_completion(answers.render(q.kind, n.answer, q.extra), n.trace or q.trace, True)
            assert task.score(wrong, meta) < 1.0
