"""Both backends through one adapter: the shipped toy's weights in ``open_clip.CLIP`` give what openai-clip gives.

The toy is a stock openai-clip ``CLIP``; its state dict loads strictly into an
``open_clip.CLIP`` built with the same widths and QuickGELU. Every stage's core then
runs on both, and must agree: the same ascent token ids and labels, and every
heatmap method's maps equal to about 1e-5.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

open_clip = pytest.importorskip("open_clip")

from pipeline.model.adapter import ClipAdapter, as_adapter, openclip_refusal  # noqa: E402
from pipeline.heatmaps import names  # noqa: E402
from pipeline.run.images import normalize, to_tensor  # noqa: E402
from pipeline.model.load import TOY_CHECKPOINT, LoadedModel, ModelError, load_model  # noqa: E402
from pipeline.model.prompts import TextFeatureStore, prompt_ensemble  # noqa: E402
from pipeline.toy.train import held_out_single_objects  # noqa: E402
from pipeline.toy.world import SceneSpec, make_scenes  # noqa: E402
from stages.ascend import AscentConfig, extract_opinions, score_candidates  # noqa: E402
from stages.decode import DecodeConfig, label_opinions  # noqa: E402
from pipeline.heatmaps.compute import compute_heatmaps  # noqa: E402
from stages.surgery import SurgeryConfig  # noqa: E402


def toy_in_open_clip(toy: LoadedModel) -> LoadedModel:
    """The shipped toy's exact weights in an ``open_clip.CLIP`` of the same architecture."""
    state = torch.load(TOY_CHECKPOINT, map_location="cpu", weights_only=True)
    v, t = toy.model.visual, toy.model
    model = open_clip.CLIP(
        embed_dim=t.text_projection.shape[1],
        vision_cfg=open_clip.CLIPVisionCfg(layers=len(v.transformer.resblocks), width=v.conv1.out_channels,
                                           patch_size=v.conv1.kernel_size[0], image_size=v.input_resolution,
                                           head_width=64),
        text_cfg=open_clip.CLIPTextCfg(context_length=t.positional_embedding.shape[0], vocab_size=t.vocab_size,
                                       width=t.ln_final.weight.shape[0], heads=t.transformer.resblocks[0].attn.num_heads,
                                       layers=len(t.transformer.resblocks)),
        quick_gelu=True,
    )
    model.load_state_dict({k: v.float() for k, v in state.items() if k not in ("input_resolution", "context_length",
                                                                                "vocab_size")}, strict=True)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, name="toy-in-open_clip", device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def pair(toy):
    return toy, toy_in_open_clip(toy)


def _images(n, res=64):
    return torch.stack([to_tensor(Image.fromarray(s.image), res) for s in held_out_single_objects(n)])


def test_adapter_reads_each_backend(pair):
    a, b = (lm.clip for lm in pair)
    assert (a.backend, b.backend) == ("openai-clip", "open_clip")
    assert a.input_resolution == b.input_resolution == 64 and a.is_vit and b.is_vit
    assert a.context_length == b.context_length == 77 and (a.sot, a.eot) == (b.sot, b.eot) == (49406, 49407)
    assert a.dtype == b.dtype == torch.float32
    assert len(a.vision_blocks) == len(b.vision_blocks) and len(a.text_blocks) == len(b.text_blocks)
    assert torch.equal(a.tokenize(["a red circle."]), b.tokenize(["a red circle."]))
    assert isinstance(as_adapter(a), ClipAdapter) and as_adapter(a) is a


@torch.no_grad()
def test_stock_forwards_agree(pair):
    a, b = pair
    x = normalize(_images(4))
    ids = a.clip.tokenize(["a red circle.", "a blue square and a green ring."])
    assert torch.allclose(a.clip.encode_image(x), b.clip.encode_image(x), atol=1e-5)
    assert torch.allclose(a.clip.encode_text(ids), b.clip.encode_text(ids), atol=1e-5)


@pytest.mark.parametrize("method", ["gumbel", "pez"])
def test_ascend_and_decode_agree(pair, method):
    """The same ascent (token ids, words) and the same decode labels on both backends."""
    images = _images(2)
    cfg = AscentConfig(iterations=12, candidates=4, bank_size=16, views=8, checkin_every=5, method=method)
    results = []
    for lm in pair:
        ops = extract_opinions(lm, images, [3, 4], cfg)  # the ascent takes its own gradients
        with torch.no_grad():
            feats = F.normalize(lm.clip.encode_image(normalize(images)).float(), dim=-1)
            ops = score_candidates(lm, ops, feats)
            store = TextFeatureStore(lm.model)
            labels = label_opinions([{"words": op.words, "candidates": op.candidates, "settings": {}} for op in ops],
                                    feats, store, replace(DecodeConfig(), min_frequency=1))
        results.append((ops, labels))
    (ops_a, labels_a), (ops_b, labels_b) = results
    for x, y in zip(ops_a, ops_b):
        assert [c["ids"] for c in x.candidates] == [c["ids"] for c in y.candidates]
        assert x.words == y.words
    for x, y in zip(labels_a, labels_b):
        assert [d["word"] for d in x.labels] == [d["word"] for d in y.labels]
        assert all(abs(d["score"] - e["score"]) <= 1e-4 for d, e in zip(x.labels, y.labels))
        assert x.labels, "the toy's ascent found no labels: the comparison would be empty"


@torch.no_grad()
def test_every_heatmap_method_agrees(pair):
    """Every map method's maps (and their points) from the surgery stage's core, on both backends."""
    scenes = make_scenes(11, 3, SceneSpec(min_objects=2, max_objects=2))
    words = [[w for o in s.objects for w in o.words] for s in scenes]
    vocab = list(dict.fromkeys(w for ws in words for w in ws))
    cfg = SurgeryConfig(methods=names(), single_resolution=96, surgery_depth=3)
    out = []
    for lm in pair:
        base = normalize(torch.stack([to_tensor(Image.fromarray(s.image), 64) for s in scenes]))
        single = normalize(torch.stack([to_tensor(Image.fromarray(s.image), 96) for s in scenes]))
        text, empty = prompt_ensemble(lm.model, vocab), prompt_ensemble(lm.model, [""])[0]
        out.append(compute_heatmaps(lm.clip, base, single, words, vocab, text, empty,
                                    [s.image.shape[:2] for s in scenes], cfg))
    assert set(out[0][0].maps) == set(names())
    for x, y in zip(*out):
        for m in names():
            np.testing.assert_allclose(x.maps[m], y.maps[m], atol=1e-5, err_msg=m)
        assert x.points == y.points


@pytest.mark.parametrize("name", ["random:openclip:ViT-S-32", "random:openclip:RN50"])
def test_random_openclip_models_load_and_run(name):
    lm = load_model(name, torch.device("cpu"))
    assert lm.clip.backend == "open_clip" and lm.input_resolution == 224
    with torch.no_grad():
        f = lm.clip.encode_image(torch.zeros(1, 3, 224, 224))
    assert f.shape == (1, lm.clip.text_projection.shape[1])


def test_refused_families_name_their_reason():
    for arch, words in (("ViT-B-16-SigLIP", "SigLIP"), ("coca_ViT-B-32", "CoCa"), ("ViT-H-14-CLIPA", "CLIPA"),
                        ("roberta-ViT-B-32", "Hugging Face text tower"), ("convnext_base", "timm image trunk")):
        assert words in openclip_refusal(arch, open_clip.get_model_config(arch)), arch
        with pytest.raises(ModelError, match=f"refused.*{words}"):
            load_model(f"random:openclip:{arch}", torch.device("cpu"))
    for arch in ("ViT-B-32", "ViT-B-16", "RN50", "ViT-L-14", "ViT-M-16-alt", "ViT-B-32-quickgelu"):
        assert openclip_refusal(arch, open_clip.get_model_config(arch)) is None, arch


def test_offline_pretrained_fails_fast_naming_file_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(ModelError) as err:
        load_model("openclip:ViT-B-32/laion2b_s34b_b79k", torch.device("cpu"), cache_dir=tmp_path)
    assert time.time() - t < 10
    msg = str(err.value)
    assert "open_clip_pytorch_model.bin" in msg and str(tmp_path) in msg and "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in msg
    with pytest.raises(ModelError, match="neither a pretrained tag"):
        load_model("openclip:ViT-B-32/no_such_tag", torch.device("cpu"))
    with pytest.warns(UserWarning, match="QuickGELU.*ViT-B-32-quickgelu/openai"), pytest.raises(ModelError):
        load_model("openclip:ViT-B-32/openai", torch.device("cpu"), cache_dir=tmp_path)


def test_a_checkpoint_file_as_the_tag(tmp_path, pair):
    """``openclip:ARCH/PATH`` loads a file placed by hand: here the toy's weights under a toy config."""
    _, b = pair
    path = tmp_path / "weights.pt"
    torch.save(b.model.state_dict(), path)
    arch = "toy-vit-test"
    open_clip.factory._MODEL_CONFIGS[arch] = {
        "embed_dim": 128, "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 4, "head_width": 64},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4}}
    try:
        lm = load_model(f"openclip:{arch}/{path}", torch.device("cpu"))
    finally:
        del open_clip.factory._MODEL_CONFIGS[arch]
    x = normalize(_images(2))
    with torch.no_grad():
        assert torch.allclose(lm.clip.encode_image(x), b.clip.encode_image(x), atol=1e-6)
