"""The heatmap method registry: a method defined here, in the tests alone, gets its maps, its config row and its
docs row through the registry; the docs table is what the classes say; the registry refuses what it cannot run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.run.config import ConfigError
from pipeline.run.configdoc import config_reference
from pipeline.heatmaps import LastBlockMethod, method, method_table, names, register, titles, unregister
from pipeline.heatmaps.base import LastBlock
from pipeline.heatmaps.blocks import encode_image_tokens, encode_method_tokens
from pipeline.heatmaps.compute import compute_heatmaps
from stages import PRESETS, RunConfig, config_choices
from stages.surgery import SurgeryConfig

ROOT = Path(__file__).resolve().parents[2]


class StockAttention(LastBlockMethod):
    """The last block's own q-k attention with its residual and MLP: the stock model, so its tokens are raw's."""

    name = "stockqk"
    title = "stock q-k"
    summary = "nothing, by another road: the last block's own attention"
    prefer = "a check of the runner"
    mode = "residual"
    equation = "softmax(s q kᵀ)"

    def attention(self, last: LastBlock) -> torch.Tensor:
        return (last.scale * last.q @ last.k.transpose(-1, -2)).softmax(-1)


@pytest.fixture
def stockqk():
    register(StockAttention)
    yield method("stockqk")
    unregister("stockqk")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_a_method_defined_in_a_test_gets_its_maps(tiny, stockqk):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = encode_method_tokens(tiny.model, x, ("stockqk",)).tokens["stockqk"]
        stock = encode_image_tokens(tiny.model, x, 0).raw  # the stock blocks, every token projected
        image = tiny.model.encode_image(x)
    assert _rel(got, stock) <= 1e-5 and _rel(got[:, 0], image) <= 1e-5
    cfg = SurgeryConfig(methods=("raw", "stockqk"), feature_surgery="off")  # plain cosine, as raw's maps
    text = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        out = compute_heatmaps(tiny.model, x, None, [["a", "b"], ["c"]], ["a", "b", "c"], text, text[0], [(32, 32)] * 2, cfg)
    for hm in out:
        assert set(hm.maps) == {"raw", "stockqk"} and hm.maps["stockqk"].shape == hm.maps["raw"].shape
        assert abs(hm.maps["stockqk"] - hm.maps["raw"]).max() <= 1e-4  # the same tokens, the same maps


def test_its_config_row_and_docs_row_come_from_the_class(stockqk):
    assert SurgeryConfig(methods=("stockqk",)).methods == ("stockqk",)
    assert "stockqk" in config_choices()["surgery.methods"] and titles()["stockqk"] == "stock q-k"
    row = next(line for line in config_reference(RunConfig, PRESETS, config_choices()).splitlines()
               if line.startswith("| `surgery.methods`"))
    assert "`stockqk`" in row
    assert ("| `stockqk` | nothing, by another road: the last block's own attention | last block, residual: "
            "`softmax(s q kᵀ)` | vit | - | a check of the runner |") in method_table().splitlines()


def test_an_unregistered_method_is_refused_everywhere(tiny):
    with pytest.raises(ConfigError, match="stockqk"):
        SurgeryConfig(methods=("raw", "stockqk"))
    with pytest.raises(ValueError, match="unknown heatmap method 'stockqk'; the methods are: raw, surgery"):
        encode_method_tokens(tiny.model, torch.zeros(1, 3, 32, 32), ("stockqk",))
    assert "stockqk" not in names()


def test_the_registry_refuses_a_taken_name_and_a_half_made_class(stockqk):
    with pytest.raises(ValueError, match="'stockqk' is already registered"):
        register(StockAttention)

    class Nameless(LastBlockMethod):
        name = "nameless"
        mode = "replace"

    with pytest.raises(TypeError, match="must set title, summary, prefer"):
        register(Nameless)

    class NoMode(StockAttention):
        name = "nomode"
        mode = "sideways"

    with pytest.raises(TypeError, match="mode must be 'replace' or 'residual'"):
        register(NoMode)
    assert "nameless" not in names() and "nomode" not in names()


def test_the_shipped_methods_in_order_and_the_docs_table_is_generated():
    assert names()[:3] == ("raw", "surgery", "single")  # the original's three, in its order
    assert set(names("resnet")) == {"raw", "surgery", "single", "maskclip"}
    assert all(isinstance(t, str) and t for t in titles().values())
    page = (ROOT / "docs" / "heatmap-methods.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- methods:[^\n]*-->\n(.*?)<!-- /methods -->", page, re.S)
    assert table and table.group(1) == method_table(), \
        "docs/heatmap-methods.md's table differs from the method classes: paste pipeline.heatmaps.method_table()"
    modules = sorted(p.stem for p in (ROOT / "pipeline" / "heatmaps" / "methods").glob("*.py") if p.stem != "__init__")
    assert modules == sorted(names())  # one module per method, each registered
