"""surgery: CLIP Surgery's second path of v-v attention, with feature surgery over the image's labels.

Li et al., "CLIP Surgery for Better Explainability with Enhancement in Open-Vocabulary Tasks" (2023),
arXiv:2304.05653. ViT: over the last ``surgery_depth`` blocks the path adds v-v attention of the
stock path's ``ln_1`` output and skips the MLP; token 0 comes from the stock path. ModifiedResNet:
the attention pool becomes plain v-v attention, as the released code runs it (``resnet_surgery:
normalised`` is the branch it carries but never switches on: unit keys, 8x the scale); token 0 is
the stock pool's, i.e. ``encode_image``. A depth of 0 gives the raw tokens on either backend.
"""

from __future__ import annotations

from pipeline.lazy import lazy_module
from pipeline.heatmaps.base import BlockStep, MapSettings, PathMethod, PoolStep
from pipeline.heatmaps.registry import register

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")


@register
class Surgery(PathMethod):
    name = "surgery"
    title = "surgery"
    summary = ("CLIP Surgery ([Li et al. 2023](https://arxiv.org/abs/2304.05653)): a second path of v-v attention over "
               "the last `surgery_depth` blocks, no MLP, plus feature surgery over the image's labels")
    prefer = "the original's method; good when an image has several labels"
    backends = ("vit", "resnet")
    params = ("surgery_depth", "resnet_surgery")
    feature_surgery = "multi"

    def path_step(self, step: BlockStep, path: torch.Tensor) -> torch.Tensor:
        vv = F.scaled_dot_product_attention(step.v, step.v, step.v)  # [B, heads, N, hd]
        return path + step.parts.ls_1(step.out_proj(vv))  # no MLP on this path

    def resnet_tokens(self, pool: PoolStep, settings: MapSettings) -> torch.Tensor:
        if settings.surgery_depth == 0:
            return pool.raw
        v = pool.v
        if settings.resnet_surgery == "normalised":
            kn = v / (v.norm(dim=-1, keepdim=True) + 1e-6)
            out = pool.merge(F.scaled_dot_product_attention(kn, kn, v, scale=8 * v.shape[-1] ** -0.5))
        elif settings.resnet_surgery == "official":
            out = pool.merge(F.scaled_dot_product_attention(v, v, v))
        else:
            raise ValueError(f"resnet_surgery must be 'official' or 'normalised', got {settings.resnet_surgery!r}")
        return torch.cat([pool.raw[:, :1], out[:, 1:]], dim=1)
