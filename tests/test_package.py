"""Install like a library: the sdist and wheel hold what they must, the WHEEL (not the source tree) runs
in a fresh venv, training needs none of the optional extras, and ``--version`` says what it runs on.

How the fresh venv is made without downloading anything: ``python -m build --no-isolation`` builds
the sdist and then the wheel from that sdist (so a file missing from the sdist breaks the wheel);
``python -m venv --without-pip`` makes a venv that does not see the project's packages;
the project venv's pip installs the wheel into it (``pip --python VENV install --no-index
--no-deps``). The dependencies come from the project venv, as on a machine where only the core was
installed: a folder of links to every entry of its site-packages except the optional extras'
packages (FastAPI, sacrebleu, matplotlib, ...), the test and docs tools and the project's own
editable install, appended by a ``.pth`` line. So ``import vlmtune`` finds the wheel's copy (the test
checks that it does) and ``import fastapi`` fails as it would there.
"""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile

import pytest

from vlmtune import NAME, __version__
from vlmtune.cli import EXTRA_OF_MODULE, main

ROOT = Path(__file__).resolve().parents[1]
# Top-level names (import names, and distribution names as dist-info folders spell them) that only
# the optional extras or the test and docs tools install; a core-only install has none of them.
NOT_IN_CORE = {*EXTRA_OF_MODULE, "python_multipart", "rouge_score", "starlette", "trl", "pytest", "_pytest",
               "playwright", "hypothesis", "mkdocs", "mkdocstrings", "mkdocstrings_python"}


def _run(args, cwd, env=None, check=True):
    env = {**os.environ, **(env or {})}
    env.pop("PYTHONPATH", None)  # the source tree must not be importable
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}", pytrace=False)
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # A copy of the tracked and new files only (no .venv, no build leftovers), like a fresh clone.
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT).stdout.split()
    src = out / "src-tree"
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], out)
    return out


@pytest.fixture(scope="module")
def wheel_venv(dist, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], venv.parent)
    wheel = next(dist.glob("*.whl"))
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
          "--no-index", "--no-deps", "--disable-pip-version-check", str(wheel)], venv.parent)
    site = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     venv.parent).stdout.strip())
    core_only = venv.parent / "core-dependencies"
    core_only.mkdir()
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        top = entry.name.split("-")[0].split(".")[0].lower()
        if top not in NOT_IN_CORE and top not in (NAME, "__editable__", "__pycache__") and entry.suffix != ".pth":
            (core_only / entry.name).symlink_to(entry)
    (site / "zz_core_dependencies.pth").write_text(f"{core_only}\n")
    return venv


def test_sdist_holds_what_make_test_and_make_docs_need(dist):
    sdist = next(dist.glob("*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in ("pyproject.toml", "README.md", "requirements.txt", "Makefile", "mkdocs.yml",
                   "configs/demo-cpu.yaml", "docs/architecture.md", "docs/learning.md", "scripts/gen_docs.py",
                   "tests/conftest.py", "tests/test_package.py", f"src/{NAME}/cli/__init__.py"):
        assert needed in names, f"{needed} is missing from {sdist.name}"
    assert not any("__pycache__" in name or name.startswith("docs/_build") for name in names)


def test_wheel_holds_every_module_and_the_command(dist):
    wheel = next(dist.glob("*.whl"))
    assert wheel.name.startswith(f"{NAME}-{__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = f"{NAME}-{__version__}.dist-info"
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        metadata = z.read(f"{info}/METADATA").decode()
    package_files = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / NAME).rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts}
    assert package_files and package_files <= names, f"missing from the wheel: {sorted(package_files - names)}"
    assert f"{NAME} = {NAME}.cli:main" in entry_points
    core = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert any("torch" in line for line in core)
    assert not any(word in line for line in core for word in ("fastapi", "playwright", "uvicorn", "trl"))
    for extra in ("study", "eval", "test", "docs"):
        assert f"Provides-Extra: {extra}" in metadata


def test_the_wheel_trains_in_a_fresh_venv_without_the_extras(wheel_venv, tmp_path):
    bin_dir = wheel_venv / "bin"
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    where = _run([str(bin_dir / "python"), "-c", f"import {NAME}; print({NAME}.__file__)"], tmp_path, env).stdout
    assert where.startswith(str(wheel_venv)), f"imported {where.strip()}, not the wheel's copy"
    assert "usage:" in _run([str(bin_dir / NAME), "--help"], tmp_path, env).stdout
    _run([str(bin_dir / NAME), "model", "tiny", "--family", "qwen2-vl", "--out", "tiny"], tmp_path, env)
    _run([str(bin_dir / NAME), "data", "synth", "--out", "scenes", "--n", "8", "--pairs", "--workers", "1"],
         tmp_path, env)
    _run([str(bin_dir / NAME), "train", "--algo", "dpo", "--config", str(ROOT / "configs" / "demo-cpu.yaml"),
          "model.name_or_path=tiny", "data.train=scenes/pairs/train.jsonl", "data.eval=null", "train.output_dir=run",
          "train.max_steps=2", "train.batch_size=1", "train.grad_accum=1", "train.progress=false",
          "train.eval_every=null", "train.save_every=null"], tmp_path, env)
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "final" / "README.md").is_file()
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len([row for row in rows if '"loss"' in row]) == 2


IMPORT_EVERY_MODULE = f"""
import importlib, pkgutil, {NAME}
for m in pkgutil.walk_packages({NAME}.__path__, "{NAME}."):
    if not m.name.endswith("__main__"):
        try:
            importlib.import_module(m.name)
        except ModuleNotFoundError as e:
            print(m.name, e.name)
"""


def test_only_the_study_app_needs_an_extra_to_be_imported(wheel_venv, tmp_path):
    done = _run([str(wheel_venv / "bin" / "python"), "-c", IMPORT_EVERY_MODULE], tmp_path)
    assert done.stdout.split() == [f"{NAME}.study.app", "fastapi"]


def test_a_command_that_needs_a_missing_extra_says_which_to_install(wheel_venv, tmp_path):
    done = _run([str(wheel_venv / "bin" / NAME), "study", "serve", "--db", "s.sqlite"], tmp_path, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: this command needs fastapi, which is not installed; install it with: pip install '{NAME}[study]'")


def test_extra_of_module_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    import_name = {"python-multipart": "multipart", "rouge-score": "rouge_score"}
    for extra in ("study", "eval"):
        listed = {import_name.get(req, req) for req in extras[extra]}
        mapped = {module for module, e in EXTRA_OF_MODULE.items() if e == extra and module != "python_multipart"}
        assert listed == mapped, f"[{extra}] in pyproject.toml and EXTRA_OF_MODULE differ"
    core = " ".join(project["dependencies"])
    assert not any(module in core for module in EXTRA_OF_MODULE)


def test_version_names_the_libraries_and_cuda(capsys):
    import peft
    import torch
    import transformers

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{NAME} {__version__}"
    cuda = "no" if not torch.cuda.is_available() else f"yes, {torch.cuda.device_count()} device(s)"
    assert f"torch {torch.__version__} (built for CUDA {torch.version.cuda or 'none'}; CUDA seen: {cuda})" in lines
    assert f"transformers {transformers.__version__}" in lines and f"peft {peft.__version__}" in lines
