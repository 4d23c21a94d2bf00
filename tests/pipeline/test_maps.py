"""pipeline.heatmaps.blocks: one block runner, each method against its equations written out plainly, the model untouched."""

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.heatmaps import method, names
from pipeline.heatmaps.base import neighbourhood_bias
from pipeline.heatmaps.blocks import encode_image_tokens, encode_method_tokens, interpolate_positions
from pipeline.heatmaps.methods.resclip import resclip_blocks
from pipeline.model.load import load_model

LAST = ("maskclip", "sclip", "clearclip", "naclip", "resclip")
VIT_METHODS = tuple(m for m in names("vit") if method(m).input == "native")  # what one forward computes
RESNET_METHODS = tuple(m for m in names("resnet") if method(m).input == "native")


@pytest.fixture(scope="module")
def tiny_rn():
    return load_model("random:tiny-rn", torch.device("cpu"), seed=0)


def _images(side, n=2, seed=0):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _qkv(blk, x):
    """The block's q, k, v of ``ln_1(x)`` by its in-projection, and its head size. x: [N, C]."""
    c = x.shape[-1]
    h = blk.ln_1(x)
    w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
    return h, h @ w[:c].T + b[:c], h @ w[c : 2 * c].T + b[c : 2 * c], h @ w[2 * c :].T + b[2 * c :], c // blk.attn.num_heads


def _reference(visual, image, method, sigma=5.0):
    """One image, the last block by the method's equations, one head at a time. image: [3, H, W]."""
    x = visual.conv1(image[None]).flatten(2).transpose(1, 2)[0]  # [P, C]
    grid = (image.shape[1] // visual.conv1.kernel_size[0], image.shape[2] // visual.conv1.kernel_size[0])
    x = torch.cat([visual.class_embedding[None], x]) + interpolate_positions(visual.positional_embedding, grid)
    x = visual.ln_pre(x)[:, None]  # [N, 1, C]
    blocks = list(visual.transformer.resblocks)
    recorded = []
    for i, blk in enumerate(blocks[:-1]):
        if i in resclip_blocks(len(blocks)):
            _, q, k, _, hd = _qkv(blk, x[:, 0])
            recorded.append(torch.stack([torch.softmax(q[:, j * hd : (j + 1) * hd] @ k[:, j * hd : (j + 1) * hd].T / hd**0.5, -1)
                                         for j in range(blk.attn.num_heads)]))
        x = blk(x)
    blk = blocks[-1]
    x = x[:, 0]
    heads = blk.attn.num_heads
    _, q, k, v, hd = _qkv(blk, x)
    n = x.shape[0]
    omega = torch.zeros(n, n)
    for i in range(1, n):
        for j in range(1, n):
            (yi, xi), (yj, xj) = divmod(i - 1, grid[1]), divmod(j - 1, grid[1])
            omega[i, j] = torch.exp(torch.tensor(-((yi - yj) ** 2 + (xi - xj) ** 2) / (2 * sigma**2)))
    outs = []
    for j in range(heads):
        qh, kh, vh = (t[:, j * hd : (j + 1) * hd] for t in (q, k, v))
        sm = lambda a: torch.softmax(a / hd**0.5, -1)  # noqa: E731
        a = {"maskclip": torch.eye(n), "sclip": sm(qh @ qh.T) + sm(kh @ kh.T), "clearclip": sm(qh @ qh.T),
             "naclip": torch.softmax(kh @ kh.T / hd**0.5 + omega, -1)}
        if method == "resclip":
            a["resclip"] = 2 * (0.7 * a["naclip"] + 0.3 * torch.stack([r[j] for r in recorded]).mean(0))
        outs.append(a[method] @ vh)
    o = torch.cat(outs, -1) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
    if method in ("maskclip", "sclip"):  # residual, with the MLP
        t = x + o
        o = t + blk.mlp(blk.ln_2(t))
    return visual.ln_post(o) @ visual.proj


def _reference_gem(visual, image, depth):
    """GEM written out for one image: the dual path over the last ``depth`` blocks, one head at a time."""
    grid = (image.shape[1] // visual.conv1.kernel_size[0], image.shape[2] // visual.conv1.kernel_size[0])
    x = visual.conv1(image[None]).flatten(2).transpose(1, 2)[0]
    x = visual.ln_pre(torch.cat([visual.class_embedding[None], x]) + interpolate_positions(visual.positional_embedding, grid))
    blocks = list(visual.transformer.resblocks)
    gem = None
    for i, blk in enumerate(blocks):
        if i >= len(blocks) - depth:
            heads = blk.attn.num_heads
            h, q, k, v, hd = _qkv(blk, x)
            t = h.norm(dim=-1).mean() / hd**0.5  # the temperature: scale x the mean token norm
            outs = []
            for j in range(heads):
                vh = v[:, j * hd : (j + 1) * hd]
                acc = 0
                for z in (vh, k[:, j * hd : (j + 1) * hd], q[:, j * hd : (j + 1) * hd]):
                    z = F.normalize(z, dim=-1)
                    z = F.normalize(torch.softmax(z @ z.T * t, -1) @ z, dim=-1)  # one self-self step
                    acc = acc + torch.softmax(z @ z.T * t, -1) @ vh
                outs.append(acc / 3)
            o = torch.cat(outs, -1) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
            gem = (x if gem is None else gem) + o
        x = blk(x[:, None])[:, 0]
    return visual.ln_post(torch.cat([x[:1], gem[1:]])) @ visual.proj


@pytest.mark.parametrize("side", [32, 48])
@pytest.mark.parametrize("depth", [1, 2])
def test_gem_matches_its_equations(tiny, side, depth):
    x = _images(side)
    with torch.no_grad():
        got = encode_method_tokens(tiny.model, x, ("gem",), surgery_depth=depth).tokens["gem"]
        want = torch.stack([_reference_gem(tiny.model.visual, img, depth) for img in x])
    assert _rel(got, want) <= 1e-5


@pytest.mark.parametrize("side", [32, 48])  # native, and a size whose positions are interpolated
def test_every_method_matches_its_equations(tiny, side):
    x = _images(side)
    with torch.no_grad():
        got = encode_method_tokens(tiny.model, x, LAST)
        for m in LAST:
            want = torch.stack([_reference(tiny.model.visual, img, m) for img in x])
            assert got.tokens[m].shape == want.shape and _rel(got.tokens[m], want) <= 1e-5, m
    assert got.grid == (side // 8, side // 8)


def test_methods_share_one_forward_and_surgery_is_unchanged(tiny):
    x = _images(32)
    with torch.no_grad():
        together = encode_method_tokens(tiny.model, x, VIT_METHODS, surgery_depth=1)
        alone = encode_image_tokens(tiny.model, x, 1)
    assert list(together.tokens) == list(VIT_METHODS)
    torch.testing.assert_close(together.tokens["surgery"], alone.surgery, rtol=0, atol=0)  # bit for bit
    torch.testing.assert_close(together.tokens["raw"], alone.raw, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny", "toy"])
def test_no_method_changes_the_model(name, request):
    lm = request.getfixturevalue(name)
    before = copy.deepcopy(lm.model.state_dict())
    x = _images(lm.input_resolution)
    with torch.no_grad():
        stock = lm.model.encode_image(x)
        encode_method_tokens(lm.model, _images(2 * lm.input_resolution), VIT_METHODS)
        after = lm.model.encode_image(x)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    torch.testing.assert_close(after, stock, rtol=0, atol=0)


def test_resnet_methods_and_a_vit_only_method_is_refused(tiny_rn):
    x = _images(64)
    v = tiny_rn.model.visual
    with torch.no_grad():
        got = encode_method_tokens(tiny_rn.model, x, RESNET_METHODS)
        raw = encode_image_tokens(tiny_rn.model, x, 0).raw
        t = v.relu3(v.bn3(v.conv3(v.relu2(v.bn2(v.conv2(v.relu1(v.bn1(v.conv1(x)))))))))
        t = v.layer4(v.layer3(v.layer2(v.layer1(v.avgpool(t))))).flatten(2).transpose(1, 2)  # [B, P, C]
        want = v.attnpool.c_proj(v.attnpool.v_proj(t + v.attnpool.positional_embedding[1:]))  # c_proj(v_proj(x)) per position
    assert set(got.tokens) == {"raw", "surgery", "maskclip"} and got.tokens["maskclip"].shape == raw.shape
    torch.testing.assert_close(got.tokens["maskclip"][:, 0], raw[:, 0])  # the class token stays stock
    assert _rel(got.tokens["maskclip"][:, 1:], want) <= 1e-5
    with pytest.raises(ValueError, match="'naclip' has no ResNet form"):
        encode_method_tokens(tiny_rn.model, x, ("raw", "naclip"))


def test_neighbourhood_bias_and_resclip_blocks():
    omega = neighbourhood_bias((2, 3), sigma=1.0)
    assert omega.shape == (7, 7) and omega[0].abs().sum() == 0 and omega[:, 0].abs().sum() == 0
    assert omega[1, 1] == 1 and torch.isclose(omega[1, 2], torch.exp(torch.tensor(-0.5)))
    assert list(resclip_blocks(12)) == [5, 6, 7, 8] and list(resclip_blocks(24)) == list(range(10, 18))
    assert all(list(resclip_blocks(n)) and max(resclip_blocks(n)) < n - 1 for n in range(2, 40))
