"""maskclip: the last block's attention is the identity, each token keeping its own value.

Zhou et al., "Extract Free Dense Labels from CLIP", ECCV 2022. On a ModifiedResNet: each position's
own value through the pool's ``v_proj`` and ``c_proj``, the class token the stock pool's.
"""

from __future__ import annotations

from pipeline.lazy import lazy_module
from pipeline.heatmaps.base import LastBlock, LastBlockMethod, MapSettings, PoolStep
from pipeline.heatmaps.registry import register

torch = lazy_module("torch")


@register
class MaskClip(LastBlockMethod):
    name = "maskclip"
    title = "MaskCLIP"
    summary = "MaskCLIP (Zhou et al., ECCV 2022): the last block's attention becomes the identity, each token keeps its own value"
    prefer = "the classic baseline; also on ResNets"
    backends = ("vit", "resnet")
    mode = "residual"
    equation = "I"

    def attention(self, last: LastBlock) -> torch.Tensor:
        q = last.q
        return torch.eye(q.shape[-2], device=q.device, dtype=q.dtype).expand(*q.shape[:2], -1, -1)

    def resnet_tokens(self, pool: PoolStep, settings: MapSettings) -> torch.Tensor:
        own = pool.pool.c_proj(pool.pool.v_proj(pool.tokens))  # [B, N, D]
        return torch.cat([pool.raw[:, :1], own[:, 1:]], 1)
