"""What a heatmap method is: a class with a name, its docs, and the hook the one block runner calls.

A method never runs a forward of its own. ``pipeline.heatmaps.blocks`` runs the stock blocks once for
every requested method and calls each method's hook where it changes something:

* ``LastBlockMethod.attention``: the attention ``A`` of the last block; the runner combines
  ``out_proj(A v)`` by the method's ``mode``, ``replace`` (the output alone) or ``residual``
  (``x + out_proj(A v)``, then the block's MLP);
* ``PathMethod.path_step``: one block of a second path beside the stock one, over the last
  ``surgery_depth`` blocks, whose patch tokens replace the stock path's (CLIP Surgery, GEM);
* ``HeatmapMethod.vit_tokens`` and ``resnet_tokens``: the projected tokens, from what the runner kept.

``similarity`` turns a method's tokens into per-label similarities; by default
``surgery.feature_surgery`` decides the form. The class attributes give the docs table
(``docs/heatmap-methods.md``), the report's names and the config's choices.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

from pipeline.lazy import lazy_module
from pipeline.model.adapter import BlockParts
from pipeline.heatmaps.similarity import feature_surgery as surgery_similarity

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")


@dataclass(frozen=True)
class MapSettings:
    """The settings a method's hooks may read (the ``surgery.*`` keys of the same names)."""

    surgery_depth: int = 6  # the last blocks a second path runs over
    naclip_sigma: float = 5.0  # NACLIP's neighbourhood, in patches
    resnet_surgery: str = "official"  # ResNet v-v pool: the released code's plain form, or "normalised"


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)  # [B, heads, N, hd]


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, hd = t.shape
    return t.transpose(1, 2).reshape(b, n, h * hd)  # [B, N, C]


@dataclass
class BlockStep:
    """One ViT block in which some method reads ``q, k, v``: its parts, its stock input and ``ln_1`` of it."""

    index: int
    parts: BlockParts
    x: torch.Tensor  # [B, N, C] the stock path's input of this block
    h: torch.Tensor  # [B, N, C] ln_1(x)
    q: torch.Tensor  # [B, heads, N, hd]
    k: torch.Tensor
    v: torch.Tensor
    scale: float  # head_dim ** -0.5

    def out_proj(self, attended: torch.Tensor) -> torch.Tensor:
        """``[B, heads, N, hd]`` attended values through the block's ``out_proj``: ``[B, N, C]``."""
        attn = self.parts.attn
        return F.linear(merge_heads(attended), attn.out_proj.weight, attn.out_proj.bias)


@dataclass
class LastBlock(BlockStep):
    """The last block, for methods that change only its attention; ``recorded`` holds the stock ``softmax(s q kᵀ)``
    of the blocks any requested method asked for (``recorded_blocks``), averaged."""

    grid: tuple[int, int] = (0, 0)
    settings: MapSettings = field(default_factory=MapSettings)
    recorded: torch.Tensor | None = None  # [B, heads, N, N]

    @functools.cached_property
    def neighbourhood(self) -> torch.Tensor:
        """NACLIP's Ω ``[N, N]`` at ``settings.naclip_sigma``, computed once for every method that reads it."""
        return neighbourhood_bias(self.grid, self.settings.naclip_sigma, self.q.device).to(self.q.dtype)


@dataclass
class VitRun:
    """What the ViT runner kept for the methods' outputs: the final stock tokens, each second path, the last block."""

    x: torch.Tensor  # [B, N, C] the stock path's output
    paths: dict[str, torch.Tensor]  # method -> its second path's output (absent: the path ran over no block)
    last: LastBlock | None  # set when a requested method changes the last block
    project: Callable[[torch.Tensor], torch.Tensor]  # ln_post then proj, on every token


@dataclass
class PoolStep:
    """A ModifiedResNet's attention pool on the trunk's output: its input tokens and ``q, k, v``."""

    tokens: torch.Tensor  # [B, 1 + gh*gw, C] the mean token, then the grid, with positions
    q: torch.Tensor  # [B, heads, N, hd]
    k: torch.Tensor
    v: torch.Tensor
    raw: torch.Tensor  # [B, N, D] the stock q-k pool at every position
    merge: Callable[[torch.Tensor], torch.Tensor]  # [B, heads, N, hd] -> c_proj: [B, N, D]
    pool: torch.nn.Module


def neighbourhood_bias(grid: tuple[int, int], sigma: float, device=None) -> torch.Tensor:
    """NACLIP's Ω ``[1 + gh*gw, 1 + gh*gw]``: ``exp(-d² / 2σ²)`` over patch-grid distance, 0 for the class token."""
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], -1).float()  # [P, 2]
    d2 = torch.cdist(pos, pos).pow(2)
    omega = torch.zeros(1 + gh * gw, 1 + gh * gw, device=device)
    omega[1:, 1:] = torch.exp(-d2 / (2 * sigma**2))
    return omega


def cosine(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[B, N, D] x [T, D] -> [B, N, T]`` plain cosine (``text`` already unit), as the raw CLIP maps use."""
    return F.normalize(tokens.float(), dim=-1) @ text.T


class HeatmapMethod:
    """One heatmap method. Subclass ``LastBlockMethod`` or ``PathMethod``, or this for a method of another kind,
    set the class attributes, and register the class (``pipeline.heatmaps.register``)."""

    name: ClassVar[str]  # the config's and the files' name
    title: ClassVar[str]  # the name a person reads (report, contact sheet)
    summary: ClassVar[str]  # docs: what it changes
    prefer: ClassVar[str]  # docs: when to prefer it
    backends: ClassVar[tuple[str, ...]] = ("vit",)  # "vit" and/or "resnet"
    params: ClassVar[tuple[str, ...]] = ()  # the surgery.* keys it reads
    feature_surgery: ClassVar[Literal["multi", "single", "off"] | None] = None  # None: surgery.feature_surgery decides
    input: ClassVar[Literal["native", "single"]] = "native"  # "single": its own input at surgery.single_resolution
    source: ClassVar[str | None] = None  # with input "single": the method whose tokens it takes of that input
    reads_last_block: ClassVar[bool] = False  # the runner keeps the last block's input and q, k, v (LastBlock)

    def recorded_blocks(self, layers: int) -> range | tuple[int, ...]:
        """The ViT blocks whose stock attention this method reads in ``LastBlock.recorded``."""
        return ()

    def vit_tokens(self, run: VitRun) -> torch.Tensor:
        """The projected tokens ``[B, 1 + gh*gw, D]`` of a ViT."""
        raise NotImplementedError(f"{self.name} has no ViT form")

    def resnet_tokens(self, pool: PoolStep, settings: MapSettings) -> torch.Tensor:
        """The projected tokens ``[B, 1 + gh*gw, D]`` of a ModifiedResNet."""
        raise NotImplementedError(f"{self.name} has no ResNet form")

    def similarity(self, tokens: torch.Tensor, text: torch.Tensor, empty: torch.Tensor, feature_surgery_setting: str
                   ) -> torch.Tensor:
        """Per-label similarity ``[B, N, T]`` of the tokens ``[B, N, D]`` and the labels' unit features ``[T, D]``.

        ``multi`` is feature surgery over the labels (the single-text form for one label), ``single`` the
        single-text form against the empty prompt ``empty`` ``[D]``, ``off`` plain cosine.
        """
        form = self.feature_surgery or feature_surgery_setting
        if form == "multi":
            return surgery_similarity(tokens, text, None if len(text) >= 2 else empty)
        if form == "single":
            return surgery_similarity(tokens, text, redundant=empty)
        return cosine(tokens, text)


class LastBlockMethod(HeatmapMethod):
    """A method that changes only the last block's attention; ``mode`` says how the block's output is formed."""

    mode: ClassVar[Literal["replace", "residual"]]
    reads_last_block = True
    equation: ClassVar[str]  # docs: the last block's attention

    def attention(self, last: LastBlock) -> torch.Tensor:
        """The attention ``[B, heads, N, N]`` of the last block, from ``last.q, k, v`` ``[B, heads, N, hd]``."""
        raise NotImplementedError

    def vit_tokens(self, run: VitRun) -> torch.Tensor:
        last = run.last
        o = last.out_proj(self.attention(last) @ last.v)  # [B, N, C]
        if self.mode == "replace":
            return run.project(o)
        p = last.parts
        t = last.x + p.ls_1(o)
        return run.project(t + p.ls_2(p.mlp(p.ln_2(t))))


class PathMethod(HeatmapMethod):
    """A second path beside the stock one over the last ``surgery_depth`` blocks; its patch tokens, with the stock
    path's class token, are the method's. A depth of 0 gives the stock tokens."""

    params = ("surgery_depth",)

    def path_start(self, layers: int, settings: MapSettings) -> int:
        return layers - min(settings.surgery_depth, layers)

    def path_step(self, step: BlockStep, path: torch.Tensor) -> torch.Tensor:
        """The path's tokens after block ``step.index``, from its tokens before it (the stock input at the first)."""
        raise NotImplementedError

    def vit_tokens(self, run: VitRun) -> torch.Tensor:
        path = run.paths.get(self.name)
        return run.project(run.x if path is None else torch.cat([run.x[:, :1], path[:, 1:]], 1))
