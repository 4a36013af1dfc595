"""Programs over a scene (CLEVR-style): filter, relate, argmax, count, compare, arithmetic.

A program is a list of steps, each a JSON-able dict; a step reads earlier steps' outputs by
their position (``"in"``, ``"a"``, ``"b"``, ``"ref"``; a ``filter`` without ``"in"`` reads every
object of the scene). The last step's output is the answer. Operations:

=============  =================================================  ==============================
op             fields                                             output
=============  =================================================  ==============================
``filter``     ``classes`` (list or None), ``colour``, ``size``   objects (indices)
``remove``     ``in``, ``classes``                                 objects minus those classes
``argmax``     ``in``, ``key`` (largest, smallest, leftmost, …)   one object (unique by margin)
``relate``     ``in`` (default all), ``ref``, ``rel``               objects on that side of ref
``count_each`` ``classes``                                        {class: count}
``count``      ``in``, ``offset`` (0; a slip adds one)             integer
``add/sub``    ``a``, ``b``                                        integer
``compare``    ``a``, ``b``                                        more / fewer / same
``box(es)``    ``in``                                              a box / a list of boxes
=============  =================================================  ==============================

:func:`execute` returns the answer and a trace, one sentence per step, which becomes the gold
reasoning chain. ``relate`` compares box centres: an object is left of the reference when its
centre is more than ``margin`` pixels left of the reference's. :func:`ambiguous` finds the
objects within the margin, which question makers reject (CLEVR's rule), and ``argmax`` raises
:class:`Ambiguous` when the best object does not beat the next by its margin.

:func:`slips` lists perturbed programs, each a named reasoning slip (the relation flipped, a
filter forgotten, the operands swapped, the wrong extreme, ...); executed, they give the hard
negatives that preference pairs need.
"""

from __future__ import annotations

import copy
from typing import Any

from vlmtune.tasks.core import Scene
from vlmtune.tasks.counting import plural

OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above",
            "largest": "smallest", "smallest": "largest", "leftmost": "rightmost",
            "rightmost": "leftmost", "topmost": "bottommost", "bottommost": "topmost"}
RELATION_WORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
# Readouts turn objects into an answer; every other step is a reasoning hop.
READOUTS = {"count", "box", "boxes"}


class Ambiguous(Exception):
    """The program has no unique answer on this scene (an argmax within its margin)."""


def hops(program: list[dict]) -> int:
    """Reasoning steps of a program: every step except the readouts (count, box, boxes)."""
    return sum(1 for step in program if step["op"] not in READOUTS)


def margin_of(scene: Scene) -> float:
    """The relation margin: 4% of the image's larger side (4.5 px at 112 px)."""
    return 0.04 * max(scene.width, scene.height)


def _side(scene: Scene, i: int, ref: int, rel: str) -> float:
    """How far object ``i`` lies towards ``rel`` of ``ref``, centre to centre, in pixels."""
    (x, y), (rx, ry) = scene.objects[i].centre, scene.objects[ref].centre
    return {"left": rx - x, "right": x - rx, "above": ry - y, "below": y - ry}[rel]


def ambiguous(scene: Scene, objects, ref: int, rel: str) -> list[int]:
    """The objects whose side of ``ref`` is within the margin (reject the question if any)."""
    m = margin_of(scene)
    return [i for i in objects if i != ref and abs(_side(scene, i, ref, rel)) <= m]


def _key(scene: Scene, i: int, key: str) -> float:
    o = scene.objects[i]
    x, y = o.centre
    return {"largest": o.area, "smallest": -o.area, "leftmost": -x, "rightmost": x,
            "topmost": -y, "bottommost": y}[key]


def _argmax(scene: Scene, objects: list[int], key: str) -> int:
    """The unique extreme: areas must differ by 25%, positions by the relation margin."""
    if not objects:
        raise Ambiguous("nothing to choose from")
    ranked = sorted(objects, key=lambda i: _key(scene, i, key), reverse=True)
    if len(ranked) > 1:
        best, second = _key(scene, ranked[0], key), _key(scene, ranked[1], key)
        if key in ("largest", "smallest"):
            big, small = max(abs(best), abs(second)), min(abs(best), abs(second))
            if big < 1.25 * small:
                raise Ambiguous(f"the two {key} are within 25% in area")
        elif best - second <= margin_of(scene):
            raise Ambiguous(f"the two {key} are within the margin")
    return ranked[0]


def _names(step: dict) -> str:
    words = " ".join(w for w in (step.get("size"), step.get("colour")) if w)
    classes = step.get("classes")
    noun = " or ".join(classes) if classes else "object"
    return f"{words} {noun}".strip()


def _run(step: dict, out: list, scene: Scene) -> tuple[Any, str]:
    """One step's output and its sentence for the trace."""
    op = step["op"]
    if op == "filter":
        source = out[step["in"]] if "in" in step else range(len(scene.objects))
        classes, colour, size = step.get("classes"), step.get("colour"), step.get("size")
        found = [i for i in source if (not classes or scene.objects[i].cls in classes)
                 and (not colour or scene.objects[i].colour == colour)
                 and (not size or scene.objects[i].size == size)]
        return found, f"Find every {_names(step)}: {len(found)} found."
    if op == "remove":
        classes = set(step["classes"])
        kept = [i for i in out[step["in"]] if scene.objects[i].cls not in classes]
        removed = f"every {' and every '.join(step['classes'])}" if step["classes"] else "nothing"
        return kept, f"Remove {removed}: {len(kept)} left."
    if op == "argmax":
        i = _argmax(scene, out[step["in"]], step["key"])
        return [i], f"The {step['key']} one is {scene.describe(i)}."
    if op == "relate":
        (ref,) = out[step["ref"]]
        source = out[step["in"]] if "in" in step else range(len(scene.objects))
        m = margin_of(scene)
        found = [i for i in source if i != ref and _side(scene, i, ref, step["rel"]) > m]
        which = "Of those" if "in" in step else "Of all objects"
        return found, f"{which}, {len(found)} are {RELATION_WORDS[step['rel']]} {scene.describe(ref)}."
    if op == "count_each":
        counts = {c: sum(o.cls == c for o in scene.objects) for c in step["classes"]}
        listed = ", ".join(f"{n} {c if n == 1 else plural(c)}" for c, n in counts.items())
        return counts, f"Count each class: {listed}."
    if op == "count":
        n = len(out[step["in"]]) + step.get("offset", 0)
        return n, f"Count them: {n}."
    if op in ("add", "sub"):
        a, b = out[step["a"]], out[step["b"]]
        n = a + b if op == "add" else a - b
        return n, f"{a} {'+' if op == 'add' else '-'} {b} = {n}."
    if op == "compare":
        a, b = out[step["a"]], out[step["b"]]
        verdict = "more" if a > b else "fewer" if a < b else "same"
        return verdict, f"{a} against {b}: {verdict}."
    if op == "box":
        (i,) = out[step["in"]]
        return [round(v) for v in scene.objects[i].box], "Take its box."
    if op == "boxes":
        boxes = [[round(v) for v in scene.objects[i].box] for i in out[step["in"]]]
        return boxes, f"Take their {len(boxes)} box{'' if len(boxes) == 1 else 'es'}."
    raise ValueError(f"unknown program step {op!r}")


def execute(program: list[dict], scene: Scene) -> tuple[Any, list[str]]:
    """Run a program; returns the answer and the trace. Raises :class:`Ambiguous`."""
    out: list = []
    trace: list[str] = []
    for step in program:
        value, sentence = _run(step, out, scene)
        out.append(value)
        trace.append(sentence)
    return out[-1], trace


def outputs(program: list[dict], scene: Scene) -> list:
    """Every step's output (for question makers that check intermediate values)."""
    out: list = []
    for step in program:
        out.append(_run(step, out, scene)[0])
    return out


# ---------------------------------------------------------------------- slips
def slips(program: list[dict]) -> list[tuple[str, list[dict]]]:
    """Perturbed programs, one named reasoning slip each (programs that are unchanged are left out)."""
    found = []

    def variant(name: str, k: int, change) -> None:
        wrong = copy.deepcopy(program)
        change(wrong[k])
        if wrong != program:
            found.append((name, wrong))

    for k, step in enumerate(program):
        op = step["op"]
        if op == "relate":
            variant("flip_relation", k, lambda s: s.update(rel=OPPOSITE[s["rel"]]))
            variant("ignore_relation", k, lambda s: s.update(op="filter", classes=None, rel=None))
        elif op == "argmax":
            variant("wrong_extreme", k, lambda s: s.update(key=OPPOSITE[s["key"]]))
        elif op == "filter":
            if step.get("colour"):
                variant("ignore_colour", k, lambda s: s.update(colour=None))
            if step.get("size"):
                variant("wrong_size", k, lambda s: s.update(size="small" if s["size"] == "large" else "large"))
            if step.get("classes") and len(step["classes"]) > 1:
                variant("miss_a_class", k, lambda s: s.update(classes=s["classes"][:-1]))
        elif op == "remove":
            variant("forget_removal", k, lambda s: s.update(classes=[]))
        elif op in ("sub", "compare"):
            variant("swap_operands", k, lambda s: s.update(a=s["b"], b=s["a"]))
        elif op == "add":
            variant("subtract_instead", k, lambda s: s.update(op="sub"))
        elif op == "count":
            variant("count_one_more", k, lambda s: s.update(offset=s.get("offset", 0) + 1))
            variant("count_one_fewer", k, lambda s: s.update(offset=s.get("offset", 0) - 1))
    return found
