"""The built-in task families by name (what ``metadata.task.family`` and ``--families`` say).

Grounding and list answers depend on the model family's box convention; the instances here use
the default (``qwen2_5_vl``), and scoring never needs it (a record keeps its frame).
"""

from __future__ import annotations

from vlmtune.tasks.arithmetic import ArithmeticFamily
from vlmtune.tasks.attribute import AttributeFamily
from vlmtune.tasks.compare import CompareFamily
from vlmtune.tasks.count import CountFamily
from vlmtune.tasks.grounding import GroundingFamily
from vlmtune.tasks.listing import ListFamily
from vlmtune.tasks.multihop import MultihopFamily
from vlmtune.tasks.spatial import SpatialFamily

FAMILIES = {
    task.family: task
    for task in (CountFamily(), CompareFamily(), ArithmeticFamily(), SpatialFamily(), AttributeFamily(),
                 GroundingFamily(), ListFamily(), MultihopFamily())
}
# What detection labels support: no colour or size, so no attribute questions.
DETECTION_FAMILIES = ("count", "compare", "arithmetic", "spatial", "grounding", "list", "multihop")
