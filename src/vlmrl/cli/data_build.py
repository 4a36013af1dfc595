"""`vlmrl data from-detections` and `vlmrl data synth`: build counting preference data."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    pass
