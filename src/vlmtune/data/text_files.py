"""Read a user's files as UTF-8 text, JSON or YAML: every way one can be unreadable is one message.

A file that is missing, a symbolic link that loops, a folder where a file is expected, bytes that
are not UTF-8 (named by byte offset and line), JSON or YAML that does not parse, nesting too deep
for Python's parsers (100,000 ``[`` make them raise ``RecursionError``), a number too long for
Python's int limit, input too large for memory: each becomes a :class:`VlmtuneError` naming the file
(file-level functions) or a :class:`BadText` (functions over one fragment, such as a JSONL line,
whose caller knows the location and adds it) whose message says what is wrong.

Parsed JSON is also refused when nested deeper than :data:`MAX_DEPTH` levels (real records are a
few levels deep, and a value a few hundred levels deep parses but then overflows the stack of
whatever walks it later: ``str``, ``json.dumps``, ``copy``), and when a string holds a lone UTF-16
surrogate (the escape ``"\\ud800"`` without its pair parses, but is no character: writing it as
UTF-8, or tokenizing it, fails later).
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from vlmtune.errors import VlmtuneError

MAX_DEPTH = 100
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"


class BadText(VlmtuneError):
    """A fragment of text or JSON that cannot be read; the message says why, not where."""


def path_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be opened (missing, a looping symbolic link, no permission), or None."""
    try:
        os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; fix the link"
        return f"{path}: no such file or folder; check the path"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return (f"{path} is a symbolic link that loops (it leads back to itself through links); "
                    "point it at a real file or folder")
        return f"{path} cannot be opened ({e.strerror}); check its permissions"
    except ValueError as e:  # an embedded NUL byte
        return f"{path!r} is not a usable path ({e})"
    return None


def require_path(path: str | Path) -> None:
    """Raise VlmtuneError naming what is wrong when ``path`` cannot be opened."""
    problem = path_problem(path)
    if problem:
        raise VlmtuneError(problem)


def decode_utf8(raw: bytes, offset: int = 0) -> str:
    """``raw`` as text (a leading byte-order mark dropped); BadText naming the first bad byte by its
    byte offset in the file (``offset``: where ``raw`` starts in it) and, in text of several lines,
    its line."""
    try:
        return raw.removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError as e:
        start = e.start + (len(_BOM) if raw.startswith(_BOM) else 0)
        lines = raw.count(b"\n", 0, start) + 1
        line = f" (line {lines})" if b"\n" in raw.rstrip() else ""
        raise BadText(f"not UTF-8 text: byte 0x{raw[start]:02x} at byte offset {offset + start}{line} "
                      f"({e.reason}); save the file as UTF-8") from None


def require_file(path: str | Path) -> None:
    """Raise VlmtuneError unless ``path`` is a regular file (not missing, a folder, a device or a pipe,
    which would block or never end)."""
    require_path(path)
    if os.path.isdir(path):
        raise VlmtuneError(f"{path} is a folder where a file was expected")
    if not os.path.isfile(path):
        raise VlmtuneError(f"{path} is not a regular file (a device or a pipe?); give a file")


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a file; VlmtuneError naming the file and what is wrong."""
    require_file(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise VlmtuneError(f"{path} cannot be read ({e.strerror or e})") from None
    except MemoryError:
        raise VlmtuneError(f"{path} is too large to read into memory") from None
    try:
        return decode_utf8(raw)
    except BadText as e:
        raise VlmtuneError(f"{path}: {e}") from None


def parse_json(text: str | bytes) -> Any:
    """The JSON value of ``text`` (bytes are decoded as UTF-8); BadText saying why it cannot be read.

    The message locates a syntax error by line and column when ``text`` has several lines, by
    column alone otherwise (a JSONL line).
    """
    if isinstance(text, bytes):
        text = decode_utf8(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}" if "\n" in text.rstrip() else f"column {e.colno}"
        raise BadText(f"not valid JSON: {e.msg} at {where}") from None
    except RecursionError:
        raise BadText("not readable JSON: nested too deeply for Python's parser "
                      f"(records are a few levels deep; at most {MAX_DEPTH} are read)") from None
    except MemoryError:
        raise BadText("not readable JSON: too large to hold in memory") from None
    except ValueError as e:  # Python's limit on the digits of an integer (4,300)
        raise BadText(f"not readable JSON: a number too long to read ({str(e).split(';')[0]})") from None
    problem = _value_problem(value, MAX_DEPTH, strings="\\u" in text)
    if problem:
        raise BadText(f"not readable JSON: {problem}")
    return value


def read_json(path: str | Path) -> Any:
    """The JSON value of a whole file; VlmtuneError naming the file and what is wrong."""
    text = read_text(path)
    try:
        return parse_json(text)
    except BadText as e:
        raise VlmtuneError(f"{path}: {e}") from None


def read_yaml(path: str | Path) -> Any:
    """The YAML value of a file, read with ``safe_load`` (no Python objects); VlmtuneError naming the
    file and what is wrong."""
    text = read_text(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise VlmtuneError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise VlmtuneError(f"{path}: not readable YAML: nested too deeply for the parser") from None


def _value_problem(value: Any, limit: int, strings: bool) -> str | None:
    """Why a parsed JSON value cannot be used: lists and dicts nested more than ``limit`` levels,
    or (when ``strings``) a string or key holding a lone surrogate. Walked without recursion."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if strings and isinstance(node, str) and _SURROGATE.search(node):
            found = _SURROGATE.search(node)[0]
            return (f"a string holds the escape \\u{ord(found):04x}, half of a UTF-16 surrogate pair "
                    "without its other half, which is no character")
        if isinstance(node, dict):
            children = [*node.keys(), *node.values()] if strings else node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return f"nested more than {limit} levels deep (records are a few levels deep)"
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, str)))
    return None
