"""Shared fixtures. Nothing here downloads: models and data are built locally."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where a CUDA device is seen and are reported as skipped elsewhere:
    the feature they test (QLoRA, Unsloth, ...) cannot run on a CPU-only machine."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real Roboflow exports beside the project; tests that need them skip where absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real data sets live beside the project, not in it)")
    return SHARED_DATA


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def chromium() -> dict:
    """Playwright's launch options for Debian's Chromium, which `make test` installs (`make browser`).

    A missing Chromium fails the browser tests instead of skipping them: a skip would hide red on a
    machine where the feature can run once the package is installed.
    """
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (installs Debian's chromium) and rerun the tests",
                    pytrace=False)
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"]
    return {"executable_path": CHROMIUM, "args": args}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL with a locally trained tokenizer, built once per test session."""
    from vlmtune.models.tiny import build_tiny

    return build_tiny("qwen2-vl", tmp_path_factory.mktemp("tiny-qwen2-vl"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen25_dir(tmp_path_factory) -> Path:
    from vlmtune.models.tiny import build_tiny

    return build_tiny("qwen2.5-vl", tmp_path_factory.mktemp("tiny-qwen2.5-vl"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def synth_pairs_file(tmp_path_factory) -> Path:
    """A small synthetic counting preference set (JSONL, canonical format) with its images."""
    from vlmtune.data.synth import synth_pairs_file as make

    return make(tmp_path_factory.mktemp("synth"), n_images=24, seed=0, image_size=112)


@pytest.fixture
def vision_biased_model(tiny_model_dir):
    """The tiny model with its output layer biased so ``<|image_pad|>`` wins every step, then the
    other vision tokens: ``(model, processor, banned_ids, image_pad_id)``."""
    import torch

    from vlmtune.generate import VISION_TOKENS, vision_token_ids
    from vlmtune.models.load import load_model

    model, processor = load_model(tiny_model_dir)
    banned = vision_token_ids(model, processor)
    assert set(banned) == {processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    bias = torch.zeros(model.lm_head.out_features)
    for rank, token_id in enumerate([image_pad] + [i for i in banned if i != image_pad]):
        bias[token_id] = 100.0 - rank
    model.lm_head.bias = torch.nn.Parameter(bias)
    return model, processor, banned, image_pad


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads wait on each other ~40x longer."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
