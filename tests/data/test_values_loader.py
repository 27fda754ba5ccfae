"""Training batches pinned by content: each embedding sits beside its own caption, padding is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_data import make_dataset

from prefixcap.data.loader import CaptionDataset, LengthGroupedBatchSampler, collate, make_loader
from prefixcap.data.shards import load_preprocessed


def test_collate_keeps_each_embedding_with_its_caption():
    # Unsorted lengths (short, long, middle, 1) and one distinct embedding per caption.
    caps = [np.array([11, 12], np.int32), np.array([21, 22, 23, 24, 25], np.int32),
            np.array([31, 32, 33], np.int32), np.array([41], np.int32)]
    embs = [np.full(3, 0.5 * (i + 1), np.float16) for i in range(4)]
    batch = collate(list(zip(caps, embs)))
    assert batch.tokens.dtype == torch.int64 and batch.mask.dtype == torch.int64
    assert batch.embeddings.dtype == torch.float16
    assert batch.tokens.tolist() == [[11, 12, 0, 0, 0], [21, 22, 23, 24, 25], [31, 32, 33, 0, 0],
                                     [41, 0, 0, 0, 0]]
    assert batch.mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    assert batch.embeddings.tolist() == [[0.5] * 3, [1.0] * 3, [1.5] * 3, [2.0] * 3]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_gpt2) -> str:
    return str(make_dataset(tmp_path_factory.mktemp("loader_values"), tiny_gpt2, num_images=10,
                            captions_per_image=2, num_shards=2, prefix_length=4))


def test_loader_batches_pair_embeddings_with_their_captions(dataset):
    ds = CaptionDataset(dataset)
    ref = load_preprocessed(dataset)
    sampler = LengthGroupedBatchSampler(np.arange(len(ds)), ds.data.lengths(), 3, seed=5)
    sampler.set_epoch(1)
    order = list(sampler)
    batches = list(make_loader(ds, sampler, num_workers=0, pin_memory=False, seed=0))
    assert len(batches) == len(order)
    for batch, idx in zip(batches, order):
        for row, i in enumerate(idx):
            sample = ref[i]
            n = len(sample.tokens)
            assert batch.tokens[row, :n].tolist() == sample.tokens.tolist()
            assert batch.mask[row].tolist() == [1] * n + [0] * (batch.tokens.shape[1] - n)
            assert batch.tokens[row, n:].eq(0).all()
            np.testing.assert_array_equal(batch.embeddings[row].float().numpy(), sample.embedding)
