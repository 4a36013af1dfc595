"""The docs site: one page per command from the real --help, API pages from the docstrings, and a strict
build that passes as it is and fails on a broken reference."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
import subprocess
import sys

import pytest
import yaml

from vlmtune import NAME
from vlmtune.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_docs = _script("gen_docs")
docs_hooks = _script("docs_hooks")


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs") / "src"


def _build(staged: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of the staged pages, with mkdocs.yml's settings and nav."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config.update(docs_dir=str(staged), site_dir=str(site), hooks=[str(ROOT / "scripts" / "docs_hooks.py")])
    config["plugins"][1]["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT / "src")]
    path = site.parent / f"{site.name}.yml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(path)],
                          cwd=site.parent, env=env, capture_output=True, text=True, timeout=120)


def test_the_nav_has_a_page_for_every_command_and_no_other():
    pages = gen_docs.nav_pages(ROOT / "mkdocs.yml")
    cli_pages = [Path(p).stem for p in pages if p.startswith("cli/")]
    assert cli_pages == list(gen_docs.subcommands(build_parser())), "update mkdocs.yml's Commands nav"
    for page in pages:
        if page.startswith("api/"):
            module = Path(page).stem
            assert module.startswith(f"{NAME}.") and importlib.util.find_spec(module), f"{page}: no module {module}"


def test_command_pages_hold_the_real_help(staged, capsys, monkeypatch):
    gen_docs.stage(staged)
    monkeypatch.setenv("COLUMNS", gen_docs.COLUMNS)
    for argv in (["train"], ["data", "synth"], ["study", "raters", "add"]):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        real = capsys.readouterr().out.rstrip()
        page = (staged / "cli" / f"{argv[0]}.md").read_text()
        assert f"```text\n{real}\n```" in page, f"{' '.join(argv)} --help differs from its page"
    assert (staged / "index.md").read_text() == (ROOT / "README.md").read_text()
    assert (staged / "architecture.md").read_text() == (ROOT / "docs" / "architecture.md").read_text()
    assert (staged / f"api/{NAME}.model_card.md").read_text().endswith(f"::: {NAME}.model_card\n")


def test_strict_build_passes_and_renders_the_docstrings(staged, tmp_path):
    gen_docs.stage(staged)
    done = _build(staged, tmp_path / "site")
    assert done.returncode == 0, done.stderr
    index = (tmp_path / "site" / "index.html").read_text()
    assert "A short tour" in index
    api = (tmp_path / "site" / "api" / f"{NAME}.model_card.html").read_text()
    assert "write_model_card" in api and "sha256" in api
    counting = (tmp_path / "site" / "api" / f"{NAME}.tasks.counting.html").read_text()
    assert 'class="language-pycon' in counting  # the doctests are code, not block quotes


def test_a_broken_reference_fails_the_strict_build(staged, tmp_path):
    gen_docs.stage(staged)
    (staged / "learning.md").write_text("# Notes\n\nSee [the losses](no-such-page.md).\n")
    done = _build(staged, tmp_path / "site")
    assert done.returncode != 0 and "no-such-page.md" in done.stderr


def test_doctest_lines_become_fences_and_existing_fences_are_left_alone():
    lines = ["Text.", "", "    >>> f(1)", "    [2]", "", "```python", ">>> not a doctest", "```", ">>> g()", "3"]
    got = docs_hooks.DoctestFences(None).run(lines)
    assert got == ["Text.", "", "    ```pycon", "    >>> f(1)", "    [2]", "    ```", "",
                   "```python", ">>> not a doctest", "```", "```pycon", ">>> g()", "3", "```"]
