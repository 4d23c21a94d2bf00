"""The one block runner: every requested heatmap method's tokens from one forward of a stock CLIP image encoder.

It reads the stock model's parameters and calls its own submodules; it never copies, swaps or
changes them, and the caller chooses the grad mode. Positional embeddings are interpolated into
a local tensor for other input sizes.

* ViT: the blocks run once. In a block where some method reads ``q, k, v`` (a second path, or a
  recorded attention), the runner computes them once and the stock block from them; each path
  method takes its step there (``PathMethod.path_step``). Methods that change the last block get
  its input and ``q, k, v`` (``LastBlock``). ``ln_post`` and ``proj`` apply to every token.
* ModifiedResNet: the stem and four stages run once; each method forms its tokens from the
  attention pool's input (``PoolStep``), its ``c_proj`` being the projection.

The methods themselves are classes in ``pipeline/heatmaps/methods/``, found by name in the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.lazy import lazy_module
from pipeline.model.adapter import block_parts, is_vit, stem_activations, stock_block, vision_blocks
from pipeline.heatmaps.base import (BlockStep, HeatmapMethod, LastBlock, MapSettings, PathMethod, PoolStep, VitRun,
                                    merge_heads, split_heads)
from pipeline.heatmaps.registry import method as registered, names

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")
nn = lazy_module("torch.nn")


@dataclass(frozen=True)
class MethodTokens:
    """Projected tokens per method, class token first, patches in row-major order of ``grid``."""

    tokens: dict[str, torch.Tensor]  # method -> [B, 1 + gh * gw, D]
    grid: tuple[int, int]


@dataclass(frozen=True)
class ImageTokens:
    """Raw and CLIP Surgery tokens of one forward, not normalised: ``[B, 1 + gh * gw, D]``, class token first."""

    raw: torch.Tensor
    surgery: torch.Tensor
    grid: tuple[int, int]


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")


def interpolate_positions(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[1 + S*S, C]`` -> ``[1 + gh*gw, C]``, the grid part bilinearly resized. A new tensor, never in place."""
    side = math.isqrt(pos.shape[0] - 1)
    if (side, side) == tuple(grid):
        return pos
    patch = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # [1, C, S, S]
    patch = F.interpolate(patch, size=grid, mode="bilinear", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([pos[:1], patch])


def encode_method_tokens(model: nn.Module, images: torch.Tensor, methods: tuple[str, ...], surgery_depth: int = 6,
                         naclip_sigma: float = 5.0, resnet_surgery: str = "official") -> MethodTokens:
    """Every requested method's projected tokens from one forward of a stock CLIP image encoder.

    Args:
        model: a stock openai-clip or OpenCLIP ``CLIP`` (or its ``visual``, or its ``ClipAdapter``), ViT or
            ModifiedResNet.
        images: CLIP-normalised images, any size.
        methods: registered method names (``pipeline.heatmaps.names``) whose input is the native one.
        surgery_depth: the depth of the second paths (CLIP Surgery, GEM).
        naclip_sigma: NACLIP's (and ResCLIP's) neighbourhood σ in patches.
        resnet_surgery: ``"official"`` (plain v-v, as the released code runs) or ``"normalised"``
            (L2-normalised keys and 8x the scale, as the paper's code can be switched to).

    Shape:
        - images: :math:`(B, 3, H, W)`; each output: :math:`(B, 1 + gh \\cdot gw, D)`.

    Raises:
        ValueError: a method this architecture has no form of, naming both.

    Example:
        >>> out = encode_method_tokens(model, normalize(images), ("raw", "surgery", "clearclip"))
        >>> out.tokens["raw"][:, 0]  # equals model.encode_image(...) at the model's resolution
    """
    _check_images(images)
    if surgery_depth < 0:
        raise ValueError(f"surgery_depth must be >= 0, got {surgery_depth}")
    visual = getattr(model, "visual", model)
    vit = is_vit(visual)
    if not vit and not hasattr(visual, "attnpool"):
        raise TypeError(f"expected a CLIP VisionTransformer or ModifiedResNet, got {type(visual).__name__}")
    backend = "vit" if vit else "resnet"
    chosen = [registered(m) for m in methods]
    bad = [m for m in chosen if backend not in m.backends or m.input != "native"]
    if bad:
        kind = "ViT" if vit else "ResNet"
        valid = ", ".join(n for n in names(backend) if registered(n).input == "native")
        raise ValueError(f"heatmap method {bad[0].name!r} has no {kind} form on the native input; "
                         f"{kind} models offer: {valid}")
    run = _vit if vit else _resnet
    return run(visual, images, chosen, MapSettings(surgery_depth, naclip_sigma, resnet_surgery))


def encode_image_tokens(model: nn.Module, images: torch.Tensor, surgery_depth: int = 6,
                        resnet_surgery: str = "official") -> ImageTokens:
    """Raw and CLIP Surgery tokens of stock CLIP in one forward, at any input size; depth 0 gives the raw tokens.

    Shape:
        - images: :math:`(B, 3, H, W)`; outputs :math:`(B, 1 + gh \\cdot gw, D)`, ``grid = (H // patch, W // patch)``
          for ViT and ``(H / 32, W / 32)`` for ResNet.
    """
    out = encode_method_tokens(model, images, ("raw", "surgery"), surgery_depth, resnet_surgery=resnet_surgery)
    return ImageTokens(raw=out.tokens["raw"], surgery=out.tokens["surgery"], grid=out.grid)


def _vit_embed(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch embedding, class token, positions (resized to the grid) and ``ln_pre``: the first block's input."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # [B, width, gh, gw]
    b, width, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.to(x.dtype).expand(b, 1, width), x], dim=1)  # [B, N, width]
    return visual.ln_pre(x + interpolate_positions(visual.positional_embedding, (gh, gw)).to(x.dtype)), (gh, gw)


def _step(i: int, blk: nn.Module, x: torch.Tensor, step_class=BlockStep, **extra) -> BlockStep:
    p = block_parts(blk)
    h = p.ln_1(x)
    qkv = F.linear(h, p.attn.in_proj_weight, p.attn.in_proj_bias)  # [B, N, 3C]
    q, k, v = (split_heads(t, p.attn.num_heads) for t in qkv.chunk(3, -1))  # each [B, heads, N, hd]
    return step_class(i, p, x, h, q, k, v, q.shape[-1] ** -0.5, **extra)


def _vit(visual: nn.Module, images: torch.Tensor, methods: list[HeatmapMethod], settings: MapSettings) -> MethodTokens:
    x, grid = _vit_embed(visual, images)
    blocks = vision_blocks(visual)
    layers = len(blocks)
    walkers = {m.name: (m, m.path_start(layers, settings)) for m in methods if isinstance(m, PathMethod)}
    record = {i for m in methods for i in m.recorded_blocks(layers)}
    wants_last = any(m.reads_last_block for m in methods)
    recorded, paths, last = [], {}, None
    for i, blk in enumerate(blocks):  # the stock path, once for every method
        here = [(name, m) for name, (m, start) in walkers.items() if i >= start]
        is_last = wants_last and i == layers - 1  # its input and q, k, v are kept for the last-block methods
        if i not in record and not here and not is_last:
            x = stock_block(blk, x)
            continue
        step = _step(i, blk, x, LastBlock, grid=grid, settings=settings) if is_last else _step(i, blk, x)
        if i in record:
            recorded.append((step.q @ step.k.transpose(-1, -2) * step.scale).softmax(-1))
        for name, m in here:
            paths[name] = m.path_step(step, paths.get(name, x))
        if here:  # the stock block from the same q, k, v
            p = step.parts
            x = x + p.ls_1(step.out_proj(F.scaled_dot_product_attention(step.q, step.k, step.v)))
            x = x + p.ls_2(p.mlp(p.ln_2(x)))
        else:
            x = stock_block(blk, x)
        if is_last:
            last = step
    if last is not None:
        last.recorded = torch.stack(recorded).mean(0) if recorded else None

    def project(t: torch.Tensor) -> torch.Tensor:
        t = visual.ln_post(t)
        return t @ visual.proj if visual.proj is not None else t

    run = VitRun(x=x, paths=paths, last=last, project=project)
    return MethodTokens({m.name: m.vit_tokens(run) for m in methods}, grid)


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
    return x + interpolate_positions(pool.positional_embedding, (gh, gw)).to(x.dtype)


def _resnet(visual: nn.Module, images: torch.Tensor, methods: list[HeatmapMethod], settings: MapSettings) -> MethodTokens:
    trunk = resnet_trunk(visual, images)  # the unchanged layers, once for every method
    pool = visual.attnpool
    gh, gw = trunk.shape[-2:]
    tokens = resnet_pool_tokens(visual, trunk)
    heads = pool.num_heads
    q, k, v = (split_heads(F.linear(tokens, lin.weight, lin.bias), heads) for lin in (pool.q_proj, pool.k_proj, pool.v_proj))

    def merge(t: torch.Tensor) -> torch.Tensor:
        return F.linear(merge_heads(t), pool.c_proj.weight, pool.c_proj.bias)

    raw = merge(F.scaled_dot_product_attention(q, k, v))
    step = PoolStep(tokens=tokens, q=q, k=k, v=v, raw=raw, merge=merge, pool=pool)
    return MethodTokens({m.name: m.resnet_tokens(step, settings) for m in methods}, (gh, gw))
