"""The counting grammar: render, parse (many phrasings, the seed's answers), score."""

import pytest

from vlmtune.tasks.counting import DEFAULT_CLASSES, CountingTask, ParsedCounts, plural

TASK = CountingTask()


def test_plurals_irregular_and_regular():
    words = ["car", "bus", "person", "ambulance", "motorbike", "truck", "lorry", "motorcycle", "bicycle"]
    assert [plural(w) for w in words] == [
        "cars", "buses", "people", "ambulances", "motorbikes", "trucks", "lorries", "motorcycles", "bicycles"]
    assert plural("fire truck") == "fire trucks"


def test_render_canonical_sentence_and_singular():
    counts = {"car": 2, "motorcycle": 3, "bus": 0, "bicycle": 0}
    assert TASK.render(counts) == "There are 2 cars, 3 motorcycles, 0 buses, 0 bicycles in the image."
    assert TASK.render({"car": 1, "bus": 1}) == "There are 1 car, 0 motorcycles, 1 bus, 0 bicycles in the image."
    assert TASK.render_total(5) == "There are 5 vehicles in the image."
    assert TASK.render_total(1) == "There is 1 vehicle in the image."


def test_render_then_parse_round_trips():
    for counts in ({"car": 0, "motorcycle": 0, "bus": 0, "bicycle": 0},
                   {"car": 1, "motorcycle": 12, "bus": 3, "bicycle": 1}):
        assert TASK.parse(TASK.render(counts)).counts == counts


def _c(car=None, motorcycle=None, bus=None, bicycle=None):
    return {"car": car, "motorcycle": motorcycle, "bus": bus, "bicycle": bicycle}


@pytest.mark.parametrize("text, counts, total", [
    # the seed's chosen answer, with its "buss" typo
    ("There are 2 cars, 3 motorcycles, 0 buss, 0 bicycles in the image.", _c(2, 3, 0, 0), None),
    # the seed's answers before and after fine-tuning
    ("There are 7 vehicles in the photo.", _c(), 7),
    ("There are 7 cars and 1 truck in the picture.", _c(car=7), None),
    ("two buses", _c(bus=2), None),
    ("a bicycle", _c(bicycle=1), None),
    ("An image with no motorcycles.", _c(motorcycle=0), None),
    ("one car", _c(car=1), None),
    ("zero buses", _c(bus=0), None),
    ("THERE ARE THREE CARS AND ONE BUS", _c(car=3, bus=1), None),
    ("I see a single red car and three small motorbikes.", _c(car=1, motorcycle=3), None),
    ("car: 2, bus = 1", _c(car=2, bus=1), None),
    ("A total of 7 vehicles: 5 cars and 2 buses.", _c(car=5, bus=2), 7),
    ("No, there are 2 cars.", _c(car=2), None),
    ("There is 1 bike.", _c(bicycle=1), None),
    ("12 cars", _c(car=12), None),
    ("I cannot tell from this picture.", _c(), None),
    ("", _c(), None),
])
def test_parse_phrasings(text, counts, total):
    parsed = TASK.parse(text)
    assert parsed.counts == counts
    assert parsed.total == total


def test_first_mention_wins_and_not_mentioned_differs_from_zero():
    parsed = TASK.parse("2 cars. Actually 3 cars.")
    assert parsed.counts["car"] == 2
    assert TASK.parse("0 buses").counts["bus"] == 0
    assert TASK.parse("0 buses").counts["car"] is None


def test_custom_classes_plurals_and_synonyms():
    task = CountingTask(("ambulance", "person"), plurals={"person": "persons"}, synonyms={"medic van": "ambulance"})
    assert task.render({"ambulance": 2, "person": 1}) == "There are 2 ambulances, 1 person in the image."
    assert task.parse("two medic vans and 3 persons").counts == {"ambulance": 2, "person": 3}
    with pytest.raises(ValueError):
        CountingTask(("car",), synonyms={"auto": "truck"})


def test_motorbike_is_a_motorcycle_only_when_the_task_counts_motorcycles():
    assert TASK.parse("2 motorbikes").counts["motorcycle"] == 2
    assert CountingTask(("car", "motorbike")).parse("2 motorbikes").counts == {"car": None, "motorbike": 2}


def test_score_exact_and_errors():
    gold = {"car": 2, "motorcycle": 3, "bus": 0, "bicycle": 0}
    s = TASK.score(TASK.parse("There are 2 cars, 3 motorcycles, 0 buss, 0 bicycles."), gold)
    assert s.exact and not s.parse_failure and s.total_error == 0 and s.class_accuracy == 1.0

    s = TASK.score(TASK.parse("There are 2 cars, 1 motorcycle, 2 buses, 0 bicycles."), gold)
    assert not s.exact
    assert s.hits == {"car": True, "motorcycle": False, "bus": False, "bicycle": True}
    assert s.abs_errors == {"car": 0, "motorcycle": 2, "bus": 2, "bicycle": 0}
    assert s.total_error == 0  # 5 said, 5 there: the errors cancel in the total
    assert s.class_accuracy == 0.5


def test_score_total_only_and_missing_classes():
    gold = {"car": 7, "motorcycle": 0, "bus": 0, "bicycle": 0}
    s = TASK.score(TASK.parse("There are 7 vehicles in the photo."), gold)
    assert not s.exact and not s.parse_failure and s.total_error == 0
    assert s.abs_errors == {c: None for c in DEFAULT_CLASSES}
    # "7 cars and 1 truck": right about cars, silent about the rest
    after = TASK.parse("There are 7 cars and 1 truck in the picture.")
    assert not TASK.score(after, gold).exact
    lenient = TASK.score(after, gold, missing_as_zero=True)
    assert lenient.exact and lenient.abs_errors["bus"] == 0


def test_score_parse_failure():
    s = TASK.score(TASK.parse("no idea"), {"car": 0})
    assert s.parse_failure and not s.exact and s.total_error is None
    assert ParsedCounts({"car": None}).failed


def test_doctests_pass():
    import doctest

    import vlmtune.tasks.counting as counting

    assert doctest.testmod(counting).failed == 0
