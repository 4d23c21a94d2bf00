"""Text encoding over a causal prefix, read out at any position.

Stock ``CLIP.encode_text`` runs all 77 positions with the model's causal mask (on each
block in openai-clip, on the model in OpenCLIP). With a causal mask the feature at position ``p`` depends only on positions ``0..p``,
so these functions run only the prefix up to the read-out, with a local mask; they
read the model's parameters and never change its modules or buffers.
"""

from __future__ import annotations

from pipeline.lazy import lazy_module
from pipeline.model.adapter import as_adapter, block_parts

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")
nn = lazy_module("torch.nn")


def causal_mask(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask ``[n, n]``: ``-inf`` above the diagonal."""
    return torch.full((n, n), float("-inf"), device=device, dtype=dtype).triu_(1)


def attention(attn: nn.MultiheadAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``attn(x, x, x, attn_mask=mask)`` for batch-first ``x``, written out.

    The prefixes here are a few positions long, where a fused attention kernel spends most of
    its time on empty tiles (most of all in the backward); three small products cost less.

    Shape:
        - x: :math:`(B, n, W)`; mask: :math:`(n, n)`; Output: :math:`(B, n, W)`.
    """
    b, n, w = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)
    scores = (q * (w // heads) ** -0.5) @ k.transpose(-1, -2) + mask  # [B, heads, n, n]
    out = scores.softmax(-1) @ v  # [B, heads, n, d]
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, w))


def run_text_transformer(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The text transformer plus ``ln_final`` over a prefix of embeddings.

    Args:
        model: a stock openai-clip or OpenCLIP ``CLIP``, or its adapter.
        x: token embeddings plus positional embeddings, ``[B, n, width]``.

    Shape:
        - Input: :math:`(B, n, W)`; Output: :math:`(B, n, W)`.
    """
    clip = as_adapter(model)
    mask = causal_mask(x.shape[1], x.device, x.dtype)
    for block in clip.text_blocks:
        p = block_parts(block)
        x = x + p.ls_1(attention(p.attn, p.ln_1(x), mask))
        x = x + p.ls_2(p.mlp(p.ln_2(x)))
    return clip.ln_final(x)  # [B, n, width]


def encode_text_embeddings(model: nn.Module, emb: torch.Tensor, readout: torch.Tensor | int) -> torch.Tensor:
    """Text features from token embeddings, read at ``readout``.

    Args:
        model: a stock openai-clip or OpenCLIP ``CLIP``, or its adapter.
        emb: token embeddings (before the positional embedding) of a prefix, ``[B, n, width]``.
        readout: the position to read, one per row or one for all.

    Returns:
        Unnormalised text features ``[B, D]``.

    Shape:
        - emb: :math:`(B, n, W)`; readout: :math:`(B,)` or int; Output: :math:`(B, D)`.
    """
    clip = as_adapter(model)
    n = emb.shape[1]
    x = emb.to(clip.dtype) + clip.positional_embedding[:n].to(clip.dtype)
    x = run_text_transformer(clip, x)
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, readout] @ clip.text_projection


def encode_tokens(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Equal to stock ``encode_text(ids)``, over the shortest prefix that holds every EOT.

    Shape:
        - ids: :math:`(B, L)` with EOT the largest id of each row; Output: :math:`(B, D)`.
    """
    eot_at = ids.argmax(dim=-1)  # [B], as stock encode_text pools
    n = int(eot_at.max()) + 1
    emb = as_adapter(model).token_embedding(ids[:, :n])
    return encode_text_embeddings(model, emb, eot_at)
