"""Training-free heatmap methods on one block runner over a stock CLIP model of either backend.

Every method here changes only how the last block(s) of CLIP's image encoder attend,
and reads the stock model's parameters and submodules without copying, swapping or
changing them. One forward runs the unchanged blocks once for all methods; each method
then supplies its attention ``A`` for the changed block, and the runner combines
``out_proj(A v)`` by the method's mode:

* ``replace``: the block's output is ``out_proj(A v)`` alone (ClearCLIP, NACLIP, ResCLIP);
* ``residual``: ``x + out_proj(A v)``, then the block's MLP (MaskCLIP, SCLIP);
* ``dual``: CLIP Surgery's second path over the last ``surgery_depth`` blocks (see
  ``pipeline.surgery``), with the class token from the stock path.

``ln_post`` and ``proj`` are then applied to every token. With ``s = head_dim ** -0.5``:

| method | attention of the last block | mode | paper |
|---|---|---|---|
| ``maskclip`` | identity: each token keeps its own ``v`` | residual | Zhou et al., ECCV 2022 |
| ``sclip`` | ``softmax(s q qᵀ) + softmax(s k kᵀ)`` | residual | Wang et al., ECCV 2024 |
| ``clearclip`` | ``softmax(s q qᵀ)`` | replace | Lan et al., ECCV 2024 |
| ``naclip`` | ``softmax(s k kᵀ + Ω)``, Ω a Gaussian over grid distance (σ patches), 0 on the class row and column | replace | Hajimiri et al., WACV 2025 |
| ``resclip`` | ``2 [0.7 A_naclip + 0.3 mean of the stock softmax(s q kᵀ) of the middle blocks]`` | replace | Yang et al., CVPR 2025 |
| ``gem`` | the mean over ``v, k, q`` of a self-self attention of unit vectors, refined once, at temperature ``s`` × the mean token norm, applied to ``v``, in each of the last ``surgery_depth`` blocks | dual | Bousselham et al., CVPR 2024 |

ResNets have ``raw``, ``surgery`` and ``maskclip`` (``c_proj(v_proj(x))`` at every position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.adapter import block_parts, is_vit, stem_activations, stock_block, vision_blocks

def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")


def _interpolate_positions(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[1 + S*S, C]`` -> ``[1 + gh*gw, C]``, the grid part bilinearly resized. A new tensor, never in place."""
    side = math.isqrt(pos.shape[0] - 1)
    if (side, side) == tuple(grid):
        return pos
    patch = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # [1, C, S, S]
    patch = F.interpolate(patch, size=grid, mode="bilinear", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([pos[:1], patch])


def _dual_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's own projections, applied as v-v (surgery) and q-k (original) attention in one call.

    Shape:
        - x: :math:`(B, N, C)`, already through ``ln_1``.
        - Output: two :math:`(B, N, C)` tensors, surgery then original.
    """
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [B, N, 3C]
    q, k, v = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # each [B, heads, N, hd]
    out = F.scaled_dot_product_attention(torch.cat([v, q]), torch.cat([v, k]), torch.cat([v, v]))  # [2B, heads, N, hd]
    out = F.linear(out.transpose(1, 2).reshape(2 * b, n, c), attn.out_proj.weight, attn.out_proj.bias)
    return out[:b], out[b:]


def resnet_trunk(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A ModifiedResNet's stem and four stages, before its attention pool.

    Shape:
        - images: :math:`(B, 3, H, W)`; Output: :math:`(B, C, H / 32, W / 32)`.
    """
    act1, act2, act3 = stem_activations(visual)
    x = images.to(visual.conv1.weight.dtype)
    x = act1(visual.bn1(visual.conv1(x)))
    x = act2(visual.bn2(visual.conv2(x)))
    x = act3(visual.bn3(visual.conv3(x)))
    x = visual.avgpool(x)
    return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))  # [B, C, gh, gw]


def resnet_pool_tokens(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention pool's input tokens from the trunk's output: the mean token, then the grid, with positions.

    Shape:
        - x: :math:`(B, C, gh, gw)`; Output: :math:`(B, 1 + gh \\cdot gw, C)`.
    """
    pool = visual.attnpool
    gh, gw = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)  # [B, gh*gw, C]
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, 1+gh*gw, C]
    return x + _interpolate_positions(pool.positional_embedding, (gh, gw)).to(x.dtype)


def _resnet_pool(visual: nn.Module, x: torch.Tensor, surgery: bool, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's raw tokens (the stock q-k pool at every position) and its surgery tokens (v-v attention, the
    class token from the stock pool), from the trunk's output ``x``."""
    pool = visual.attnpool
    b, c, gh, gw = x.shape
    x = resnet_pool_tokens(visual, x)
    heads = pool.num_heads
    hd = c // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, heads, hd).transpose(1, 2)  # [B, heads, N, hd]

    q = split(F.linear(x, pool.q_proj.weight, pool.q_proj.bias))
    k = split(F.linear(x, pool.k_proj.weight, pool.k_proj.bias))
    v = split(F.linear(x, pool.v_proj.weight, pool.v_proj.bias))

    def merge(t: torch.Tensor) -> torch.Tensor:
        return F.linear(t.transpose(1, 2).reshape(b, -1, c), pool.c_proj.weight, pool.c_proj.bias)

    raw = merge(F.scaled_dot_product_attention(q, k, v))
    if not surgery:
        return raw, raw
    if variant == "normalised":  # the paper code's switchable branch: unit keys, 8x the scale
        kn = v / (v.norm(dim=-1, keepdim=True) + 1e-6)
        out = merge(F.scaled_dot_product_attention(kn, kn, v, scale=8 * hd**-0.5))
    elif variant == "official":  # what the released code runs: plain v-v attention
        out = merge(F.scaled_dot_product_attention(v, v, v))
    else:
        raise ValueError(f"resnet_surgery must be 'official' or 'normalised', got {variant!r}")
    return raw, torch.cat([raw[:, :1], out[:, 1:]], dim=1)


# method -> mode of the changed last block; "surgery" and "raw" are computed by the runner itself
LAST_BLOCK_MODES: dict[str, str] = {"maskclip": "residual", "sclip": "residual", "clearclip": "replace",
                                    "naclip": "replace", "resclip": "replace"}
VIT_METHODS: tuple[str, ...] = ("raw", "surgery", "maskclip", "sclip", "clearclip", "naclip", "resclip", "gem")
RESNET_METHODS: tuple[str, ...] = ("raw", "surgery", "maskclip")


@dataclass(frozen=True)
class MethodTokens:
    """Projected tokens per method, class token first, patches in row-major order of ``grid``."""

    tokens: dict[str, torch.Tensor]  # method -> [B, 1 + gh * gw, D]
    grid: tuple[int, int]


def resclip_blocks(layers: int) -> range:
    """The blocks whose stock attention ResCLIP averages: 0-based 5..8 of 12, scaled to ``layers``."""
    first, stop = round(5 * layers / 12), round(9 * layers / 12)
    return range(min(first, layers - 2), max(min(stop, layers - 1), min(first, layers - 2) + 1))


def neighbourhood_bias(grid: tuple[int, int], sigma: float, device=None) -> torch.Tensor:
    """NACLIP's Ω ``[1 + gh*gw, 1 + gh*gw]``: ``exp(-d² / 2σ²)`` over patch-grid distance, 0 for the class token."""
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], -1).float()  # [P, 2]
    d2 = torch.cdist(pos, pos).pow(2)
    omega = torch.zeros(1 + gh * gw, 1 + gh * gw, device=device)
    omega[1:, 1:] = torch.exp(-d2 / (2 * sigma**2))
    return omega


def _attention(method: str, q, k, v, scale: float, omega: torch.Tensor | None, recorded: torch.Tensor | None):
    """A method's attention ``[B, heads, N, N]`` from the last block's ``q, k, v`` ``[B, heads, N, hd]``."""
    if method == "maskclip":
        return torch.eye(q.shape[-2], device=q.device, dtype=q.dtype).expand(*q.shape[:2], -1, -1)
    if method == "qk":  # stock attention: the runner's own check
        return (scale * q @ k.transpose(-1, -2)).softmax(-1)
    if method == "sclip":
        return (scale * q @ q.transpose(-1, -2)).softmax(-1) + (scale * k @ k.transpose(-1, -2)).softmax(-1)
    if method == "clearclip":
        return (scale * q @ q.transpose(-1, -2)).softmax(-1)
    naclip = (scale * k @ k.transpose(-1, -2) + omega).softmax(-1)
    if method == "naclip":
        return naclip
    if method == "resclip":
        return 2 * (0.7 * naclip + 0.3 * recorded)
    raise ValueError(f"unknown heatmap method {method!r}")


def _gem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, scale: float, iters: int = 1) -> torch.Tensor:
    """GEM's output ``[B, heads, N, hd]`` (before ``out_proj``) from ``q, k, v`` and the block's ``ln_1`` input ``h``."""
    inv_temp = h.norm(dim=-1).mean(-1).view(-1, 1, 1, 1) * scale  # [B, 1, 1, 1]
    out = torch.zeros_like(v)
    for xs in (v, k, q):
        for _ in range(iters):  # self-self refinement
            xs = F.normalize(xs, dim=-1)
            xs = (xs @ xs.transpose(-1, -2) * inv_temp).softmax(-1) @ xs
        xs = F.normalize(xs, dim=-1)
        out = out + (xs @ xs.transpose(-1, -2) * inv_temp).softmax(-1) @ v
    return out / 3


def _split(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)  # [B, heads, N, hd]


def _merge(t: torch.Tensor) -> torch.Tensor:
    b, h, n, hd = t.shape
    return t.transpose(1, 2).reshape(b, n, h * hd)  # [B, N, C]


def _vit_embed(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch embedding, class token, positions (resized to the grid) and ``ln_pre``: the first block's input."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # [B, width, gh, gw]
    b, width, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.to(x.dtype).expand(b, 1, width), x], dim=1)  # [B, N, width]
    return visual.ln_pre(x + _interpolate_positions(visual.positional_embedding, (gh, gw)).to(x.dtype)), (gh, gw)


def _qkv(p, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's ``q, k, v`` ``[B, heads, N, hd]`` of its ``ln_1`` output ``h``."""
    heads = p.attn.num_heads
    return tuple(_split(t, heads) for t in F.linear(h, p.attn.in_proj_weight, p.attn.in_proj_bias).chunk(3, -1))  # type: ignore[return-value]


def _vit(visual: nn.Module, images: torch.Tensor, methods: tuple[str, ...], surgery_depth: int, sigma: float,
         extra: dict[str, str]) -> MethodTokens:
    x, (gh, gw) = _vit_embed(visual, images)
    blocks = vision_blocks(visual)
    layers = len(blocks)
    last = {m: mode for m, mode in {**LAST_BLOCK_MODES, **extra}.items() if m in methods}
    record = set(resclip_blocks(layers)) if "resclip" in last else set()
    dual_from = layers - min(surgery_depth, layers)
    recorded, x_s, x_gem, x_last = [], None, None, x
    for i, blk in enumerate(blocks):  # the stock path, once for every method
        p = block_parts(blk)
        if i == layers - 1:
            x_last = x  # the input of the last block, which last-block methods change
        if i in record or (i >= dual_from and "gem" in methods):
            h = p.ln_1(x)
            q, k, v = _qkv(p, h)
            scale = q.shape[-1] ** -0.5
            if i in record:
                recorded.append((q @ k.transpose(-1, -2) * scale).softmax(-1))
            if i >= dual_from:  # GEM's path adds its attention of the stock path's ln_1 output, with no MLP
                o = F.linear(_merge(_gem(q, k, v, h, scale)), p.attn.out_proj.weight, p.attn.out_proj.bias)
                x_gem = (x if x_gem is None else x_gem) + p.ls_1(o)
        if i < dual_from:
            x = stock_block(blk, x)
        else:  # CLIP Surgery's dual path: v-v and the stock q-k attention in one call
            a_s, a_o = _dual_attention(p.attn, p.ln_1(x))
            x_s = (x if x_s is None else x_s) + p.ls_1(a_s)  # no MLP on the surgery path
            x = x + p.ls_1(a_o)
            x = x + p.ls_2(p.mlp(p.ln_2(x)))

    def project(t: torch.Tensor) -> torch.Tensor:
        t = visual.ln_post(t)
        return t @ visual.proj if visual.proj is not None else t

    out: dict[str, torch.Tensor] = {}
    if "raw" in methods:
        out["raw"] = project(x)
    if "surgery" in methods:
        out["surgery"] = project(torch.cat([x[:, :1], x_s[:, 1:]], 1)) if x_s is not None else project(x)
    if "gem" in methods:
        out["gem"] = project(torch.cat([x[:, :1], x_gem[:, 1:]], 1)) if x_gem is not None else project(x)
    if last:
        p = block_parts(blocks[-1])
        q, k, v = _qkv(p, p.ln_1(x_last))
        scale = q.shape[-1] ** -0.5
        omega = neighbourhood_bias((gh, gw), sigma, x.device).to(q.dtype) if {"naclip", "resclip"} & set(last) else None
        mean_recorded = torch.stack(recorded).mean(0) if recorded else None
        for m, mode in last.items():
            a = _attention(m, q, k, v, scale, omega, mean_recorded)
            o = F.linear(_merge(a @ v), p.attn.out_proj.weight, p.attn.out_proj.bias)
            if mode == "replace":
                out[m] = project(o)
            else:
                t = x_last + p.ls_1(o)
                out[m] = project(t + p.ls_2(p.mlp(p.ln_2(t))))
    return MethodTokens(out, (gh, gw))


def encode_method_tokens(model: nn.Module, images: torch.Tensor, methods: tuple[str, ...], surgery_depth: int = 6,
                         naclip_sigma: float = 5.0, resnet_surgery: str = "official",
                         _extra: dict[str, str] | None = None) -> MethodTokens:
    """Every requested method's projected tokens from one forward of a stock CLIP image encoder.

    Args:
        model: a stock openai-clip or OpenCLIP ``CLIP`` (or its ``visual``, or its ``ClipAdapter``), ViT or
            ModifiedResNet.
        images: CLIP-normalised images, any size.
        methods: names from ``VIT_METHODS`` (ViT) or ``RESNET_METHODS`` (ResNet).
        surgery_depth: CLIP Surgery's dual-path depth.
        naclip_sigma: NACLIP's (and ResCLIP's) neighbourhood σ in patches.
        resnet_surgery: ``"official"`` (plain v-v, as the released code runs) or ``"normalised"``
            (L2-normalised keys and 8x the scale, as the paper's code can be switched to).

    Shape:
        - images: :math:`(B, 3, H, W)`; each output: :math:`(B, 1 + gh \\cdot gw, D)`.

    Raises:
        ValueError: a method this architecture has no form of, naming both.
    """
    _check_images(images)
    visual = getattr(model, "visual", model)
    vit = is_vit(visual)
    if not vit and not hasattr(visual, "attnpool"):
        raise TypeError(f"expected a CLIP VisionTransformer or ModifiedResNet, got {type(visual).__name__}")
    valid = VIT_METHODS if vit else RESNET_METHODS
    bad = [m for m in methods if m not in valid and m not in (_extra or {})]
    if bad:
        kind = "ViT" if vit else "ResNet"
        raise ValueError(f"heatmap method {bad[0]!r} has no {kind} form; {kind} models offer: {', '.join(valid)}")
    if not vit:
        return _resnet(visual, images, methods, resnet_surgery)
    tokens = _vit(visual, images, methods, surgery_depth, naclip_sigma, _extra or {})
    return MethodTokens({m: tokens.tokens[m] for m in methods}, tokens.grid)


def _resnet(visual: nn.Module, images: torch.Tensor, methods: tuple[str, ...], resnet_surgery: str) -> MethodTokens:
    trunk = resnet_trunk(visual, images)  # the unchanged layers, once for every method
    raw, surgery = _resnet_pool(visual, trunk, "surgery" in methods, resnet_surgery)
    out = {"raw": raw, "surgery": surgery}
    if "maskclip" in methods:  # each position's own value through the pool's projections; the class token stays stock
        pool = visual.attnpool
        out["maskclip"] = torch.cat([raw[:, :1], pool.c_proj(pool.v_proj(resnet_pool_tokens(visual, trunk)))[:, 1:]], 1)
    return MethodTokens({m: out[m] for m in methods}, tuple(trunk.shape[-2:]))  # type: ignore[arg-type]
