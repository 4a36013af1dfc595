"""mkdocs hook (mkdocs.yml ``hooks:``): render docstring doctests as code.

Docstrings carry examples as bare doctest lines (``>>> plural("bus")`` then its output). Markdown
would read them as nested block quotes, and their list output (``['cars', ...]``) as links that
cannot be resolved, which fails ``mkdocs build --strict``. This hook adds a Markdown preprocessor that
wraps each run of doctest lines (up to the next blank line) in a ``pycon`` fence; lines inside an
existing fence are left alone.
"""

from __future__ import annotations

from markdown import Extension
from markdown.preprocessors import Preprocessor

FENCE = "```"


class DoctestFences(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        in_fence = in_doctest = False
        indent = ""
        for line in lines:
            stripped = line.lstrip()
            if in_doctest and not stripped:
                out.append(indent + FENCE)
                in_doctest = False
            elif not in_doctest and stripped.startswith(FENCE):
                in_fence = not in_fence
            elif not in_fence and not in_doctest and stripped.startswith(">>>"):
                indent = line[: len(line) - len(stripped)]
                out.append(indent + FENCE + "pycon")
                in_doctest = True
            out.append(line)
        if in_doctest:
            out.append(indent + FENCE)
        return out


class DoctestExtension(Extension):
    def extendMarkdown(self, md) -> None:
        # Before fenced_code (priority 25), so the fences added here are read as code.
        md.preprocessors.register(DoctestFences(md), "doctest_fences", 30)


def on_config(config):
    config.markdown_extensions.append(DoctestExtension())
    return config
