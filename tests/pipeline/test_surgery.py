"""pipeline.heatmaps (CLIP Surgery): the model is never changed, the equations match a plain reference, maps are normalised per text."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.load import load_model
from pipeline.heatmaps.blocks import encode_image_tokens
from pipeline.heatmaps.similarity import feature_surgery, grid_shape, similarity_map


@pytest.fixture(scope="module")
def tiny_rn():
    return load_model("random:tiny-rn", torch.device("cpu"), seed=0)


def _images(lm, side=None, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = side or lm.input_resolution
    return torch.randn(n, 3, side, side, generator=g)


@pytest.mark.parametrize("name", ["tiny", "tiny_rn", "toy"])
def test_surgery_never_mutates_the_model(name, request):
    lm = request.getfixturevalue(name)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    x = _images(lm)
    with torch.no_grad():
        stock = lm.model.encode_image(x)
        tokens = encode_image_tokens(lm.model, _images(lm, side=2 * lm.input_resolution), surgery_depth=6)
        again = lm.model.encode_image(x)
    assert tokens.grid[0] == tokens.grid[1] and tokens.raw.shape[1] == 1 + tokens.grid[0] ** 2
    after = lm.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(stock, again)


@pytest.mark.parametrize("name", ["tiny", "tiny_rn", "toy"])
def test_class_token_is_stock_encode_image(name, request):
    lm = request.getfixturevalue(name)
    x = _images(lm)
    with torch.no_grad():
        tokens = encode_image_tokens(lm.model, x, surgery_depth=2)
        stock = lm.model.encode_image(x)
    torch.testing.assert_close(tokens.raw[:, 0], stock, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens.surgery[:, 0], stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny_rn"])
def test_depth_zero_gives_raw_tokens(name, request):
    lm = request.getfixturevalue(name)
    with torch.no_grad():
        t = encode_image_tokens(lm.model, _images(lm), surgery_depth=0)
        d = encode_image_tokens(lm.model, _images(lm), surgery_depth=1)
    assert torch.equal(t.raw, t.surgery)
    assert not torch.allclose(d.raw[:, 1:], d.surgery[:, 1:])
    torch.testing.assert_close(t.raw, d.raw)  # the original path does not depend on the depth


def _vv_attention(x, w, b, heads, scale, out_w, out_b, normalise_keys=False):
    """Plain multi-head self-attention with q = k = v = the V projection, one image at a time. x: [N, C]."""
    n, c = x.shape
    hd = c // heads
    v = x @ w.T + b
    outs = []
    for h in range(heads):
        vh = v[:, h * hd : (h + 1) * hd]
        k = vh / (vh.norm(dim=-1, keepdim=True) + 1e-6) if normalise_keys else vh
        attn = torch.softmax((k @ k.T) * scale, dim=-1)
        outs.append(attn @ vh)
    return torch.cat(outs, -1) @ out_w.T + out_b


def _reference_vit(visual, x, depth):
    """The dual path written out block by block, following the equations literally."""
    x = visual.conv1(x).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], 1) + visual.positional_embedding
    x = visual.ln_pre(x)
    blocks = list(visual.transformer.resblocks)
    start = len(blocks) - depth
    out = []
    for img in x:  # one image at a time, [N, C]
        xo, xs = img[:, None], None
        for i, blk in enumerate(blocks):
            if i >= start:
                c = xo.shape[-1]
                w, b = blk.attn.in_proj_weight[2 * c :], blk.attn.in_proj_bias[2 * c :]
                a = _vv_attention(blk.ln_1(xo)[:, 0], w, b, blk.attn.num_heads, (c // blk.attn.num_heads) ** -0.5,
                                  blk.attn.out_proj.weight, blk.attn.out_proj.bias)
                xs = (xo[:, 0] if xs is None else xs) + a
            xo = blk(xo)  # the stock block is the original path
        xs = torch.cat([xo[:1, 0], xs[1:]])
        out.append(visual.ln_post(xs) @ visual.proj)
    return torch.stack(out)


def _reference_resnet(visual, x, pos, normalised=False):
    x = visual.relu1(visual.bn1(visual.conv1(x)))
    x = visual.relu2(visual.bn2(visual.conv2(x)))
    x = visual.relu3(visual.bn3(visual.conv3(x)))
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.avgpool(x)))))
    pool = visual.attnpool
    tokens = x.flatten(2).transpose(1, 2)
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + pos
    c = tokens.shape[-1]
    heads, hd = pool.num_heads, c // pool.num_heads
    out = []
    for img in tokens:
        q, k, v = pool.q_proj(img), pool.k_proj(img), pool.v_proj(img)
        cls = torch.cat([torch.softmax(q[:1, h * hd : (h + 1) * hd] @ k[:, h * hd : (h + 1) * hd].T * hd**-0.5, -1)
                         @ v[:, h * hd : (h + 1) * hd] for h in range(heads)], -1)
        cls = pool.c_proj(cls)  # the stock q-k pool at token 0
        s = _vv_attention(img, pool.v_proj.weight, pool.v_proj.bias, heads, (8 if normalised else 1) * hd**-0.5,
                          pool.c_proj.weight, pool.c_proj.bias, normalise_keys=normalised)
        out.append(torch.cat([cls, s[1:]]))
    return torch.stack(out)


def test_vit_dual_path_matches_the_reference(tiny, toy):
    for lm, depth in ((tiny, 1), (tiny, 2), (toy, 3)):
        x = _images(lm)
        with torch.no_grad():
            got = encode_image_tokens(lm.model, x, surgery_depth=depth).surgery
            want = _reference_vit(lm.model.visual, x, depth)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["official", "normalised"])
def test_resnet_vv_pool_matches_the_reference(tiny_rn, variant):
    """Official: plain v-v attention, as the released code runs it; normalised: unit keys, 8x the scale."""
    pos = tiny_rn.model.visual.attnpool.positional_embedding
    side = math.isqrt(pos.shape[0] - 1)
    for image_side, grid in ((64, 2), (96, 3)):  # native, and another size whose positions are interpolated
        x = _images(tiny_rn, side=image_side)
        with torch.no_grad():
            got = encode_image_tokens(tiny_rn.model, x, surgery_depth=1, resnet_surgery=variant)
            patch = F.interpolate(pos[1:].T.reshape(1, -1, side, side), size=(grid, grid), mode="bilinear", align_corners=False)
            want = _reference_resnet(tiny_rn.model.visual, x, torch.cat([pos[:1], patch.reshape(-1, grid * grid).T]),
                                     normalised=variant == "normalised")
        assert got.grid == (grid, grid)
        torch.testing.assert_close(got.surgery, want, atol=1e-4, rtol=1e-4)


def test_feature_surgery_forms():
    g = torch.Generator().manual_seed(1)
    tokens, text = torch.randn(3, 17, 8, generator=g), F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    multi = feature_surgery(tokens, text)
    assert multi.shape == (3, 17, 5)
    torch.testing.assert_close(multi.sum(-1), torch.zeros(3, 17), atol=1e-6, rtol=0)
    # the original's element-wise form, one image at a time (it breaks for B > 1)
    for b in range(3):
        img = F.normalize(tokens[b : b + 1], dim=-1)
        prob = (img[:, :1] @ text.T * 2).softmax(-1)
        w = prob / prob.mean(-1, keepdim=True)
        feats = img.reshape(1, 17, 1, 8) * text.reshape(1, 1, 5, 8) * w.reshape(1, 1, 5, 1)
        want = (feats - feats.mean(2, keepdim=True)).sum(-1)
        torch.testing.assert_close(multi[b : b + 1], want, atol=1e-5, rtol=1e-5)
    plain = feature_surgery(tokens, text, redundant=torch.zeros(8))
    torch.testing.assert_close(plain, F.normalize(tokens, dim=-1) @ text.T)
    r = F.normalize(torch.randn(8, generator=g), dim=0)
    torch.testing.assert_close(feature_surgery(tokens, text, redundant=r), F.normalize(tokens, dim=-1) @ (text - r).T)
    with pytest.raises(ValueError, match="text_features"):
        feature_surgery(tokens, torch.randn(5, 7))


def test_similarity_map_drops_the_class_token_and_normalises_per_text():
    g = torch.Generator().manual_seed(2)
    sim = torch.randn(2, 1 + 16, 3, generator=g)
    sim[1, :, 2] = 0.7  # a flat text
    maps = similarity_map(sim, (32, 40))
    assert maps.shape == (2, 32, 40, 3) and maps.min() >= 0 and maps.max() <= 1
    grid = similarity_map(sim, (4, 4))
    assert torch.equal(grid, similarity_map(sim[:, 1:], (4, 4)))  # with or without the class token
    assert torch.all(grid[0].amax((0, 1)) == 1) and torch.all(grid[0].amin((0, 1)) == 0)
    assert torch.all(grid[1, ..., 2] == 0)
    hot = sim[0, 1:, 0].argmax()
    assert grid[0, hot // 4, hot % 4, 0] == 1  # row-major grid
    assert grid_shape(1 + 6, (2, 3)) == (2, 3, True)
    with pytest.raises(ValueError):
        similarity_map(torch.randn(1, 7, 2), (8, 8))
