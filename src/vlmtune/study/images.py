"""Which files a study may serve as images: the images root, and the check that an image lies in it.

The root is the folder given with ``study create --images-root``, else the deepest folder holding
every record's images, taken from the paths as the records name them (symlinks not followed, so a
link cannot widen the root). An image passes when its real path (every symlink followed) is a
file inside the root's real path and its name has an image file type. ``study create`` refuses a
record whose image fails; the web app checks again on every request, as files can change later.
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Iterable
from pathlib import Path

from vlmtune.data.records import PreferenceRecord
from vlmtune.errors import VlmtuneError


def images_root(records: Iterable[PreferenceRecord], given: str | Path | None, fallback: Path) -> Path:
    """The real path of the images root: ``given``, else the common folder of the records' images.

    ``fallback`` is used when no record has an image.
    """
    if given is not None:
        if not Path(given).is_dir():
            raise VlmtuneError(f"--images-root {given}: no such folder; name the folder that holds the images")
        return Path(os.path.realpath(given))
    folders = sorted({os.path.dirname(os.path.abspath(image)) for record in records for image in record.images})
    if not folders:
        return Path(os.path.realpath(fallback))
    common = os.path.commonpath(folders)
    if os.path.dirname(common) == common:  # the file system's root: every file would be servable
        raise VlmtuneError(f"the records' images share no folder but {common} (e.g. {folders[0]} and {folders[-1]}); "
                         "pass --images-root DIR with the folder the study may serve images from")
    return Path(os.path.realpath(common))


def resolve_image(image: str, root: str | Path) -> tuple[str, str | None]:
    """``(real path, None)`` when ``image`` may be served from ``root``, else ``(real path, why not)``.

    A relative ``image`` is taken relative to ``root``.
    """
    real_root = os.path.realpath(root)
    named = os.path.abspath(os.path.join(real_root, image))
    real = os.path.realpath(named)
    if os.path.commonpath([real_root, real]) != real_root:
        if real != named:  # a symlink (the file's or a folder's) was followed
            return real, f"image {image} links to {real}, outside the images root {real_root}"
        return real, f"image {image} lies outside the images root {real_root}"
    if not os.path.isfile(real):
        return real, f"image {image} does not exist (or is not a file)"
    kind = mimetypes.guess_type(real)[0]
    if kind is None or not kind.startswith("image/"):
        return real, f"image {image} does not have an image file type (.png, .jpg, ...)"
    return real, None


def safe_image_path(image: str, root: str | Path) -> str | None:
    """The real path of ``image`` when it may be served from ``root`` (see ``resolve_image``), else None."""
    real, problem = resolve_image(image, root)
    return None if problem else real
