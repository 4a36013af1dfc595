"""What ``vlmtune model info`` reports about a model: its family, parameter count and image tokens.

An image of ``side`` x ``side`` pixels is cut into patches (``image_grid_thw``: frames, rows,
columns of patches after the processor resizes it), and every ``merge_size`` x ``merge_size``
patches become one image token in the language model, so the token count is
``t * h * w // merge_size**2``, with the merge size read from the model's own image processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelInfo:
    family: str
    parameters: int
    image_size: int | None = None  # the square image side the two fields below are for
    image_tokens: int | None = None
    patch_grid: tuple[int, int, int] | None = None  # (frames, rows, columns) of patches


def model_info(name_or_path: str | Path, image_size: int | None = None, trust_remote_code: bool = False) -> ModelInfo:
    """Load the model and describe it; with ``image_size``, also the tokens such an image costs."""
    from vlmtune.models.load import family_of, load_model

    model, processor = load_model(name_or_path, trust_remote_code=trust_remote_code)
    parameters = sum(p.numel() for p in model.parameters())
    if not image_size:
        return ModelInfo(family_of(model), parameters)
    tokens, grid = image_tokens(processor, image_size)
    return ModelInfo(family_of(model), parameters, image_size, tokens, grid)


def image_tokens(processor, side: int) -> tuple[int, tuple[int, int, int]]:
    """``(tokens, patch grid)`` of a ``side`` x ``side`` image through ``processor``."""
    from PIL import Image

    image_processor = processor.image_processor
    grid = image_processor(images=[Image.new("RGB", (side, side))])["image_grid_thw"][0]
    t, h, w = (int(x) for x in grid)
    return t * h * w // image_processor.merge_size**2, (t, h, w)
