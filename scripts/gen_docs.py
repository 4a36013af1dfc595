"""Stage the docs site's pages for mkdocs: ``python scripts/gen_docs.py`` (``make docs`` runs it).

Writes ``docs/_build/src`` (git-ignored; mkdocs.yml's ``docs_dir``) afresh:
- ``index.md``: the README (the tour);
- every hand-written page of ``docs/`` (architecture, learning notes), copied;
- ``cli/COMMAND.md`` for each command in mkdocs.yml's nav: the real ``--help`` of the command and of
  each of its sub-commands, walked from the argparse parser, printed at a fixed width of 100 columns;
- ``api/MODULE.md`` for each API page in the nav: a mkdocstrings ``::: MODULE`` block, which renders
  the module's docstrings (mkdocs build --strict fails when one cannot be found).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import shutil
import sys

import yaml

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = "100"  # argparse wraps help to the terminal width; a fixed one keeps the pages stable


def nav_pages(mkdocs_yml: Path) -> list[str]:
    """Every page path that mkdocs.yml's nav names, in order."""
    def walk(entry) -> list[str]:
        if isinstance(entry, str):
            return [entry]
        if isinstance(entry, list):
            return [page for item in entry for page in walk(item)]
        return [page for value in entry.values() for page in walk(value)]

    return walk(yaml.safe_load(mkdocs_yml.read_text(encoding="utf-8"))["nav"])


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``{name: parser}`` of a parser's sub-commands, in the order they were added (none: empty)."""
    for action in parser._actions:  # argparse keeps sub-parsers only on this private list
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def help_sections(parser: argparse.ArgumentParser, depth: int = 2) -> list[str]:
    """The parser's ``--help`` as a Markdown section, then each sub-command's, one level deeper."""
    sections = [f"{'#' * depth} `{parser.prog}`\n\n```text\n{parser.format_help().rstrip()}\n```"]
    for child in subcommands(parser).values():
        sections += help_sections(child, depth + 1)
    return sections


def cli_page(command: str, parser: argparse.ArgumentParser) -> str:
    """The page of one top-level command: its help and its sub-commands' help, as the CLI prints them."""
    sections = help_sections(parser)
    title = f"# {parser.prog}\n\nGenerated from the command's own `--help` by `scripts/gen_docs.py`."
    return title + "\n\n" + "\n\n".join(sections[0].split("\n", 2)[2:] + sections[1:]) + "\n"


def fixed_width(function, *args):
    """``function(*args)`` with argparse wrapping help at ``COLUMNS`` columns (it reads the variable
    when it formats), the variable put back as it was afterwards."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = COLUMNS
    try:
        return function(*args)
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def api_page(module: str) -> str:
    """mkdocstrings renders the module's heading (the page title) and its docstrings from this line."""
    return f"::: {module}\n"


def stage(out: Path) -> list[Path]:
    """Write every page of the nav to ``out`` (emptied first); return the paths written."""
    sys.path.insert(0, str(ROOT / "src"))
    from vlmtune.cli import build_parser

    commands = subcommands(build_parser())
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(ROOT / "docs", out, ignore=shutil.ignore_patterns("_build"))
    written = []
    for page in nav_pages(ROOT / "mkdocs.yml"):
        path = out / page
        path.parent.mkdir(parents=True, exist_ok=True)
        if page == "index.md":
            shutil.copyfile(ROOT / "README.md", path)
        elif page.startswith("cli/"):
            name = Path(page).stem
            if name not in commands:
                sys.exit(f"mkdocs.yml lists {page}, but there is no command {name!r}: remove it from the nav")
            path.write_text(fixed_width(cli_page, name, commands[name]), encoding="utf-8")
        elif page.startswith("api/"):
            path.write_text(api_page(Path(page).stem), encoding="utf-8")
        elif not path.is_file():
            sys.exit(f"mkdocs.yml lists {page}, which is neither in docs/ nor generated")
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "_build" / "src", help="where to stage the pages")
    args = parser.parse_args()
    written = stage(args.out)
    print(f"staged {len(written)} pages in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
