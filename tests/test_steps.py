"""The one rule for which runs need a reference model (setup builds a frozen copy for it, the loop
precomputes its log-probs, the preference step runs it)."""

from __future__ import annotations

import pytest

from vlmtune.config import LossConfig, validate_config
from vlmtune.train.steps import loss_needs_reference, needs_reference


@pytest.mark.parametrize(
    "algo, section, expected",
    [
        ("dpo", {"loss": {"name": "dpo"}}, True),
        ("dpo", {"loss": {"name": "ipo"}}, True),
        ("dpo", {"loss": {"name": "simpo"}}, False),  # SimPO compares with no reference
        ("dpo", {"loss": {"name": "dpo", "reference_free": True}}, False),
        ("sft", {"loss": {"name": "dpo"}}, False),  # the loss section is not read by SFT
        ("grpo", {"grpo": {"beta": 0.0}}, False),  # no KL penalty
        ("grpo", {"grpo": {"beta": 0.04}}, True),
    ],
)
def test_which_runs_need_a_reference(tmp_path, algo, section, expected):
    raw = {"model": {"name_or_path": "m"}, "data": {"train": str(tmp_path / "d.jsonl")},
           "train": {"algo": algo, "output_dir": str(tmp_path / "run")}, **section}
    assert needs_reference(validate_config(raw)) is expected


def test_loss_rule():
    assert loss_needs_reference(LossConfig(name="dpop"))
    assert not loss_needs_reference(LossConfig(name="simpo"))
    assert not loss_needs_reference(LossConfig(name="hinge", reference_free=True))
