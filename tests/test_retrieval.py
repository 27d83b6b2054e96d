"""Retrieval metrics against a direct computation."""

import pytest
import torch
from torch import nn

from anymodal.core.evaluate import retrieval


class FixedEmbeddings(nn.Module):
    """An objective-shaped object whose embeddings come from the batch itself."""

    partner_key = "text"

    def embed_sample(self, raw, student):
        return raw["a"]

    def embed_partner(self, raw, student):
        return raw["b"]


class NoBackbone(nn.Module):
    def eval(self):
        return self


def test_retrieval_counts_identical_captions_as_hits():
    # sample i is closest to partner perm[i]; captions repeat in pairs
    a = torch.eye(6)
    b = torch.eye(6)[[1, 0, 2, 3, 5, 4]]
    captions = ["x", "x", "y", "z", "w", "q"]
    data = [{"a": a[i], "b": b[i], "text": captions[i], "label": 0} for i in range(6)]
    out = retrieval(FixedEmbeddings(), NoBackbone(), data, batch_size=4, device=torch.device("cpu"))
    # sample 0 retrieves partner 1 ("x" == "x": hit); 4 retrieves 5 ("w" vs "q": miss), 5 retrieves 4: miss
    assert out["sample_to_partner_r1"] == pytest.approx(4 / 6)
    assert out["partner_to_sample_r1"] == pytest.approx(4 / 6)
    assert out["sample_to_partner_r5"] == 1.0


def test_retrieval_on_fewer_than_five_samples_ranks_them_all():
    a = torch.eye(3)
    data = [{"a": a[i], "b": a[[2, 0, 1][i]], "text": f"c{i}", "label": 0} for i in range(3)]
    out = retrieval(FixedEmbeddings(), NoBackbone(), data, batch_size=4, device=torch.device("cpu"))
    assert out["sample_to_partner_r1"] == 0.0 and out["sample_to_partner_r5"] == 1.0
