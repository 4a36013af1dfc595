"""The disk caches' keys and files: the weights fingerprint against a hand computation, the atomic
write, and the reference cache's key, which must change with the model, the data and max_length."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import struct

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vlmtune.data.formats import read_records
from vlmtune.forward.cache_files import save_safetensors_atomic, weights_fingerprint
from vlmtune.forward.ref_cache import cache_key
from vlmtune.models.load import add_lora, load_model


def test_weights_fingerprint_is_sha256_of_names_shapes_and_bytes():
    state = {"b": torch.tensor([1.0, -2.0]), "a": torch.tensor([[3]], dtype=torch.int16)}
    expected = hashlib.sha256()
    expected.update(b"a:torch.int16:(1, 1)" + struct.pack("<h", 3))
    expected.update(b"b:torch.float32:(2,)" + struct.pack("<2f", 1.0, -2.0))
    assert weights_fingerprint(state) == expected.hexdigest()
    assert weights_fingerprint(dict(reversed(state.items()))) == expected.hexdigest()  # name order, not dict order
    assert weights_fingerprint({**state, "b": torch.tensor([1.0, -2.0], dtype=torch.float64)}) != expected.hexdigest()


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "x.safetensors"
    save_safetensors_atomic(path, {"x": torch.arange(3.0)}, metadata={"ids": "[1]"})
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"ids": "[1]"} and torch.equal(f.get_tensor("x"), torch.arange(3.0))
    with pytest.raises(Exception):
        save_safetensors_atomic(path, {"x": "not a tensor"})
    with safe_open(path, framework="pt") as f:  # the earlier file is intact, no temporary file is left
        assert torch.equal(f.get_tensor("x"), torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]


@pytest.fixture
def lora_policy(tiny_model_dir):
    model, processor = load_model(tiny_model_dir)
    return add_lora(model, rank=4, alpha=8), processor


def test_reference_cache_key_follows_model_data_and_max_length(lora_policy, synth_pairs_file, tmp_path):
    model, processor = lora_policy
    records = read_records(synth_pairs_file)[:3]
    key = cache_key(model, processor, records, 512)
    assert cache_key(model, processor, list(records), 512) == key  # the same inputs: the same file

    with torch.no_grad():  # the adapter is off in the reference: its weights are not part of the key
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
    assert cache_key(model, processor, records, 512) == key

    assert cache_key(model, processor, records, 256) != key  # max_length
    edited = [dataclasses.replace(records[0], chosen=records[0].chosen + " ")] + records[1:]
    assert cache_key(model, processor, edited, 512) != key  # an answer
    image = tmp_path / "copy.png"
    shutil.copy(records[0].images[0], image)
    assert cache_key(model, processor, [dataclasses.replace(records[0], images=[str(image)])] + records[1:],
                     512) == key  # the same image bytes under another path
    Image.new("RGB", (112, 112), "white").save(image)
    assert cache_key(model, processor, [dataclasses.replace(records[0], images=[str(image)])] + records[1:],
                     512) != key  # other image bytes

    with torch.no_grad():  # the model: one base weight of the language model
        model.get_base_model().model.language_model.layers[0].mlp.up_proj.base_layer.weight.mul_(1.01)
    changed = cache_key(model, processor, records, 512)
    assert changed != key and changed.split("-")[1] == key.split("-")[1]  # model part only
