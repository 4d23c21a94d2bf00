"""gem: a second path like CLIP Surgery's whose attention is GEM's self-self attention (Bousselham et al., CVPR 2024).

The mean over ``v, k, q`` of a self-self attention of unit vectors, refined once, at temperature
``s`` times the mean token norm, applied to ``v``, in each of the last ``surgery_depth`` blocks.
"""

from __future__ import annotations

from pipeline.lazy import lazy_module
from pipeline.heatmaps.base import BlockStep, PathMethod
from pipeline.heatmaps.registry import register

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")


def gem_attended(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, scale: float, iters: int = 1
                 ) -> torch.Tensor:
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


@register
class Gem(PathMethod):
    name = "gem"
    title = "GEM"
    summary = ("GEM (Bousselham et al., CVPR 2024): a second path like Surgery's whose attention is the mean of q-q, "
               "k-k and v-v self-self attentions of unit vectors, refined once")
    prefer = "when Surgery's maps are noisy"

    def path_step(self, step: BlockStep, path: torch.Tensor) -> torch.Tensor:
        o = step.out_proj(gem_attended(step.q, step.k, step.v, step.h, step.scale))
        return path + step.parts.ls_1(o)  # GEM's attention of the stock path's ln_1 output, no MLP
