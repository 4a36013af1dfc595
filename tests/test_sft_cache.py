"""The SFT step's processor-output cache gives exactly the uncached batch, and hits on a second epoch."""

from __future__ import annotations

import torch

from vlmtune.batch import EncodedRecordCache, encode_sft
from vlmtune.data.formats import read_records
from vlmtune.models.load import load_model


def test_cached_sft_batches_equal_the_plain_ones(tiny_model_dir, synth_pairs_file):
    _, processor = load_model(tiny_model_dir)
    records = read_records(synth_pairs_file)[:6]
    cache = EncodedRecordCache()
    for epoch in range(2):
        for batch in (records[:4], records[2:6]):
            plain = encode_sft(batch, processor, 128)
            cached = encode_sft(batch, processor, 128, cache)
            assert plain.keys() == cached.keys()
            for name in plain:
                assert torch.equal(plain[name], cached[name]), (epoch, name)
    assert cache.misses == 6 and cache.hits == 10
