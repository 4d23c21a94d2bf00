"""Model helpers the stages share: decoding a batch of images for the model, encoding them and the views
ascend looked through, re-scoring texts, and explaining words away from a target.

Every function takes the loaded model and tensors, returns tensors, and leaves the
grad mode to the caller (the stages call them under ``torch.no_grad``).
"""

from __future__ import annotations

from pipeline.lazy import lazy_module
from pipeline.run.images import ImageError, ImageRef, load_image, normalize, to_tensor
from pipeline.model.load import LoadedModel
from pipeline.model.discovery import BOXED, tile_views
from pipeline.model.tokens import tokenize

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")


def load_batch(resolution: int, refs: list[ImageRef], max_side: int) -> tuple[list[ImageRef], torch.Tensor | None, dict[str, str]]:
    """Decode a batch at the model's input ``resolution`` (CPU only, so it may run beside the model).

    Returns:
        The refs that decoded, their ``[B, 3, R, R]`` tensors in [0, 1] (``None`` when
        none did), and ``{id: reason}`` for the rest.
    """
    ok, tensors, failed = [], [], {}
    for ref in refs:
        try:
            tensors.append(to_tensor(load_image(ref.path, max_side=max_side), resolution))
            ok.append(ref)
        except ImageError as err:
            failed[ref.id] = f"{ref.rel}: {err}"
    return ok, (torch.stack(tensors) if tensors else None), failed


def encode_images(lm: LoadedModel, images: torch.Tensor) -> torch.Tensor:
    """Unit stock-CLIP features of un-augmented images.

    Shape:
        - images: :math:`(B, 3, R, R)` in [0, 1]; Output: :math:`(B, D)` float32.
    """
    f = lm.clip.encode_image(normalize(images.to(lm.device)).to(lm.dtype)).float()
    return F.normalize(f, dim=-1)


def rescore_texts(lm: LoadedModel, texts: list[str], image_features: torch.Tensor) -> torch.Tensor:
    """Cosine of stock ``encode_text(tokenize(text))`` with each text's own image feature.

    Shape:
        - image_features: :math:`(N, D)`, one row per text; Output: :math:`(N,)` on the CPU.
    """
    ctx_len = lm.clip.context_length
    ids = tokenize(texts, ctx_len).to(lm.device)
    f = F.normalize(lm.clip.encode_text(ids).float(), dim=-1)
    return (f * image_features).sum(-1).cpu()


def word_directions(lm: LoadedModel, wordsets: list[list[str]], dim: int) -> torch.Tensor:
    """An orthonormal basis per image of its words' stock text features (``encode_text`` of each word alone).

    Args:
        lm: the model.
        wordsets: the words of each image.
        dim: the embedding's width (for images with no words).

    Shape:
        - Output: :math:`(B, E, D)`, with ``E`` the most words of any image and zero rows where an image has fewer.
    """
    basis = torch.zeros(len(wordsets), max([len(ws) for ws in wordsets] + [1]), dim, device=lm.device)
    words = sorted({w for ws in wordsets for w in ws})
    if words:
        feats = F.normalize(lm.clip.encode_text(tokenize(words, lm.clip.context_length).to(lm.device)).float(), dim=-1)
        row = {w: i for i, w in enumerate(words)}
        for b, ws in enumerate(wordsets):
            if ws:
                q, _ = torch.linalg.qr(feats[[row[w] for w in ws]].T)  # [D, k]: the span of the words' features
                basis[b, : len(ws)] = q.T
    return basis


def explain_away(target: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """``target`` less its components along each image's orthonormal ``basis`` rows (zero rows do nothing).

    Shape:
        - target: :math:`(B, D)`; basis: :math:`(B, E, D)`; Output: :math:`(B, D)`.
    """
    if basis is None:
        return target
    return target - torch.einsum("be,bed->bd", torch.einsum("bd,bed->be", target, basis), basis)


def view_features(lm: LoadedModel, images: torch.Tensor, views: list[list[dict]]) -> list[torch.Tensor]:
    """Each image's views as ascend saw them, un-augmented: unit features ``[V, D]`` per image.

    A view (an entry of an opinion's ``views``) is a box of it (``kind: "tile"`` or ``"region"``, its ``box``), the whole
    image (``"image"``), or a round of explaining away (``"round"``: the whole image less the
    directions of the words in its ``explained``). An image with no views gets its whole-image row.

    Shape:
        - images: :math:`(B, 3, R, R)` in [0, 1].
    """
    whole = encode_images(lm, images)  # [B, D]
    tiles = [(b, k, tuple(v["box"])) for b, vs in enumerate(views) for k, v in enumerate(vs) if v["kind"] in BOXED]
    tiled = encode_images(lm, torch.cat([tile_views(images[b : b + 1], [box]) for b, _, box in tiles])) if tiles else None
    explained = [[v.get("explained", []) for v in vs if v["kind"] == "round"] for vs in views]
    out = []
    for b, vs in enumerate(views):
        rows = [whole[b]] * max(1, len(vs))
        if explained[b]:
            basis = word_directions(lm, explained[b], whole.shape[1])  # one basis per round
            residual = F.normalize(explain_away(whole[b].expand(len(explained[b]), -1), basis), dim=-1)
            for row, k in zip(residual, [k for k, v in enumerate(vs) if v["kind"] == "round"]):
                rows[k] = row
        out.append(torch.stack(rows))
    for i, (b, k, _) in enumerate(tiles):
        out[b][k] = tiled[i]
    return out
