"""Prompt-ensemble features: 85 templates, cached per word in memory and on disk."""

import torch
import torch.nn.functional as F

from pipeline.model.prompts import TEMPLATES, TextFeatureStore, prompt_ensemble
from pipeline.model.tokens import tokenize


def test_prompt_ensemble_is_the_normalised_mean_of_the_templates(tiny):
    assert len(TEMPLATES) == 85
    got = prompt_ensemble(tiny.model, ["cat", ""])
    with torch.no_grad():
        ids = tokenize([t.format("cat") for t in TEMPLATES], tiny.model.positional_embedding.shape[0])
        want = F.normalize(F.normalize(tiny.model.encode_text(ids), dim=-1).mean(0), dim=0)
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))


def test_store_reloads_from_disk_without_encoding_again(tiny, tmp_path, monkeypatch):
    store = TextFeatureStore(tiny.model, tmp_path)
    first = store(["red", "ring", "red"])
    assert first.shape[0] == 3 and torch.equal(first[0], first[2])
    assert len(list(tmp_path.rglob("*.pt"))) == 1
    store(["red", "blue"])  # only "blue" is new: one more shard
    assert len(list(tmp_path.rglob("*.pt"))) == 2

    def no_encoding(*_):
        raise AssertionError("a cached word was encoded again")

    monkeypatch.setattr(tiny.model, "encode_text", no_encoding)
    again = TextFeatureStore(tiny.model, tmp_path)
    assert again.loaded_from_disk == 3
    torch.testing.assert_close(again(["red", "ring"]), first[:2])


def test_store_ignores_other_models_and_unreadable_shards(tiny, toy, tmp_path):
    TextFeatureStore(tiny.model, tmp_path)(["red"])
    assert TextFeatureStore(toy.model, tmp_path).loaded_from_disk == 0  # different weights, different folder
    (next(tmp_path.rglob("*.pt"))).write_bytes(b"torn")
    assert TextFeatureStore(tiny.model, tmp_path).loaded_from_disk == 0
