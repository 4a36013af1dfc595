"""The values detection labels hold, read and checked: class indices, boxes, image sizes, image paths.

Pure functions (only :func:`header_size` and :func:`image_in_root` look at files) used by
:mod:`vlmtune.data.detections`, the reader of YOLO, COCO and VOC labels. Each check returns why a
value cannot be used, in words for a message that the caller prefixes with the file and line.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

from PIL import Image

Box = tuple[float, float, float, float]


def whole_number(text: str) -> bool:
    """ASCII digits only, short enough for int(): '²'.isdigit() is True but int('²') fails.

    >>> whole_number("12"), whole_number("²"), whole_number("-1"), whole_number("1" * 19)
    (True, False, False, False)
    """
    return text.isascii() and text.isdigit() and len(text) <= 18


def box_problem(numbers: list[float]) -> str | None:
    """Why box coordinates and sizes cannot be used: not finite, or negative.

    >>> box_problem([1.0, 2.0, 0.0, 3.5]), box_problem([1.0, float("nan")]), box_problem([-0.5, 1.0])
    (None, 'a coordinate or size is NaN or infinite', 'a coordinate or size is negative')
    """
    if not all(math.isfinite(v) for v in numbers):
        return "a coordinate or size is NaN or infinite"
    if any(v < 0 for v in numbers):
        return "a coordinate or size is negative"
    return None


def box_fractions(box: Box | None, size: tuple[int, int]) -> Box | None:
    """A pixel box ``(x0, y0, x1, y1)`` as fractions of the image's ``(width, height)``.

    >>> box_fractions((10, 20, 30, 40), (100, 200))
    (0.1, 0.1, 0.3, 0.2)
    """
    if box is None:
        return None
    w, h = size
    return box[0] / w, box[1] / h, box[2] / w, box[3] / h


def stated_size(width, height) -> tuple[int, int] | None:
    """The image size a label states, when both are whole numbers > 0 (ints, or ASCII digits).

    >>> stated_size(640, "480"), stated_size(0, 480), stated_size(640.0, 480), stated_size(True, 1)
    ((640, 480), None, None, None)
    """
    values = []
    for v in (width, height):
        if isinstance(v, str) and whole_number(v.strip()):
            v = int(v.strip())
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            return None
        values.append(v)
    return values[0], values[1]


def header_size(image: Path) -> tuple[tuple[int, int] | None, str]:
    """``(width, height)`` from the image file's header (pixels are not decoded), or None and why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only its size is read
            with Image.open(image) as im:
                return im.size, ""
    except Image.DecompressionBombError as e:
        return None, f"{image}: too large for PIL to open ({e})"
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        return None, f"{image}: not an image PIL can read ({e})"


def image_in_root(root: Path, folders: tuple[Path, ...], file_name: str) -> tuple[Path | None, str]:
    """The image ``file_name`` names, found in the first of ``folders`` holding it, or None and why.

    Names are joined and normalised without following links, and must stay inside ``root``.
    """
    candidates = list(dict.fromkeys(Path(os.path.normpath(folder / file_name)) for folder in folders))
    inside = [c for c in candidates if c.is_relative_to(root)]
    if not inside:
        return None, f"file_name {file_name!r} leads outside the data set's root {root}"
    for image in inside:
        if image.is_file():
            return image, ""
    looked = ", ".join(str(c.parent) for c in inside)
    return None, f"image {file_name!r} not found (looked in {looked})"
