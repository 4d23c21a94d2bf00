"""decode: opinions become clean labels with counts, CLIP scores and ranks.

A label is a word that appears at least ``min_frequency`` times among the final
candidates (the original's rule), minus the block-list and the stop-words. Each label
is scored with stock CLIP: the cosine between its 85-template prompt-ensemble feature
and the image; labels scored below ``min_score`` are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.run.config import require
from pipeline.model.encode import encode_images, load_batch
from pipeline.run.images import ImageRef
from pipeline.run.rundir import atomic_write_json, read_output
from pipeline.run.stage import Finish, ItemResult, PerImageStage, StageContext


# Function words that CLIP's opinions are full of and that name nothing in a picture. A label equal to
# one of them (any case) is dropped; ``decode.stop_words: []`` keeps them.
STOP_WORDS: tuple[str, ...] = (
    "a", "an", "the", "and", "or", "of", "in", "on", "at", "to", "by", "for", "with", "from", "as", "is", "are",
    "was", "be", "it", "its", "this", "that", "these", "those", "his", "her", "their", "my", "your", "our", "i",
    "you", "he", "she", "we", "they", "me", "him", "them", "us", "not", "no", "so", "but", "if", "than", "then",
    "there", "here", "very", "just", "also", "into", "onto", "over", "under", "about", "up", "down", "out", "off",
)


@dataclass(frozen=True)
class DecodeConfig:
    min_frequency: int = 3  # a label must occur this often among the final candidates
    lowercase: bool = False  # merge words that differ only in case
    block_words: tuple[str, ...] = ()  # labels containing one of these (any case) are dropped
    stop_words: tuple[str, ...] = STOP_WORDS  # labels equal to one of these (any case) are dropped
    min_score: float | None = 0.0  # labels whose stock-CLIP score is below this are dropped; null keeps all
    prompts: int = 5  # best decoded candidates kept, by stock-CLIP score, trimmed and without repeats

    def __post_init__(self) -> None:
        require(self.min_frequency >= 1, f"decode.min_frequency must be >= 1, got {self.min_frequency}")
        require(self.prompts >= 0, f"decode.prompts must be >= 0, got {self.prompts}")


@dataclass
class Labels:
    """One image's decode result: labels best-scored first, and the best decoded prompts."""

    labels: list[dict]  # {"word", "frequency", "score", "rank"}
    prompts: list[dict]  # {"text", "score"}: the candidates with the best stock-CLIP re-score


def decode_labels(words: dict[str, dict], cfg: DecodeConfig, extra_block: tuple[str, ...] = ()) -> list[dict]:
    """Labels from an opinion's word statistics, most frequent first.

    Args:
        words: ``{word: {"frequency": ...}}`` as ``ascend`` writes it.
        cfg: the rule.
        extra_block: more blocked words (e.g. the ascend stage's own block-list).
    """
    merged: dict[str, int] = {}
    for word, stats in words.items():
        key = word.lower() if cfg.lowercase else word
        merged[key] = merged.get(key, 0) + int(stats["frequency"])
    blocked = [b.lower() for b in (*cfg.block_words, *extra_block) if b.strip()]
    stop = {w.lower() for w in cfg.stop_words}
    labels = [
        {"word": w, "frequency": n}
        for w, n in merged.items()
        if n >= cfg.min_frequency and w.lower() not in stop and not any(b in w.lower() for b in blocked)
    ]
    return sorted(labels, key=lambda d: (-d["frequency"], d["word"]))


def label_opinions(opinions: list[dict], image_features: torch.Tensor,
                   text_features: Callable[[list[str]], torch.Tensor], cfg: DecodeConfig) -> list[Labels]:
    """Labels for a batch of opinions, each scored by stock CLIP against its image.

    Args:
        opinions: ``ascend`` outputs, one per image.
        image_features: unit stock-CLIP features of the images, one row per opinion.
        text_features: unit prompt-ensemble features of words (one call for the batch's words).
        cfg: the rule.

    Shape:
        - image_features: :math:`(B, D)`.
    """
    labels_of = [decode_labels(op["words"], cfg, tuple(op.get("settings", {}).get("block_words", ())))
                 for op in opinions]
    vocab = list(dict.fromkeys(d["word"] for labels in labels_of for d in labels))
    text = text_features(vocab)  # [V, D]
    index = {w: i for i, w in enumerate(vocab)}
    out = []
    for b, (opinion, labels) in enumerate(zip(opinions, labels_of)):
        if labels:
            rows = torch.tensor([index[d["word"]] for d in labels], device=text.device)
            scores = (text[rows] @ image_features[b].to(text.device)).cpu()
            for d, s in zip(labels, scores):
                d["score"] = round(float(s), 4)
        labels.sort(key=lambda d: -d["score"])
        if cfg.min_score is not None:
            labels = [d for d in labels if d["score"] >= cfg.min_score]
        for rank, d in enumerate(labels, 1):
            d["rank"] = rank
        out.append(Labels(labels, best_prompts(opinion["candidates"], cfg.prompts)))
    return out


def best_prompts(candidates: list[dict], n: int) -> list[dict]:
    """The ``n`` best-rescored candidate texts, trimmed, each text once (at its best score)."""
    best: dict[str, float | None] = {}
    for c in sorted(candidates, key=lambda c: -c.get("rescored", float("-inf"))):
        best.setdefault(" ".join(c["text"].split()), c.get("rescored"))
    return [{"text": t, "score": s} for t, s in list(best.items())[:n] if t]


class DecodeStage(PerImageStage[DecodeConfig]):
    """Reads ``ascend/<id>.json``, writes ``labels/<id>.json``."""

    name = "decode"
    needs = ("ascend",)

    def batch_size(self, ctx: StageContext[DecodeConfig]) -> int:
        return ctx.settings.encode_batch_size

    def load(self, ctx: StageContext[DecodeConfig], refs: list[ImageRef]) -> tuple:
        ok, images, failed = load_batch(ctx.models.clip.input_resolution, refs, ctx.settings.max_side)
        return ok, images, failed, [read_output(ctx.run.opinion(r.id), ctx.run.root) for r in ok]

    def process(self, ctx: StageContext[DecodeConfig], refs: list[ImageRef], loaded: tuple) -> Finish:
        lm = ctx.models.clip
        ok, images, failed, read = loaded
        results = {i: ItemResult(error=e) for i, e in failed.items()}
        written = []
        if ok:
            with torch.no_grad():
                feats = encode_images(lm, images)
            opinions = [doc if isinstance(doc, dict) and "words" in doc else None for doc, _ in read]
            for ref, op, (_, why) in zip(ok, opinions, read):
                if op is None:
                    why = why or f"ascend/{ref.id}.json: not an opinion file"
                    results[ref.id] = ItemResult(error=f"{ref.rel}: {why}; the next run redoes ascend, then decode",
                                                 damaged={"ascend": why})
            keep = [b for b, op in enumerate(opinions) if op is not None]
            ok, feats, opinions = [ok[b] for b in keep], feats[keep], [opinions[b] for b in keep]
            written = list(zip(ok, label_opinions(opinions, feats, ctx.models.text_features, ctx.config)))

        def finish() -> list[ItemResult]:
            for ref, labels in written:
                path = ctx.run.labels(ref.id)
                atomic_write_json(path, {"image": ref.id, "labels": labels.labels, "prompts": labels.prompts})
                results[ref.id] = ItemResult(outputs=[ctx.run.rel(path)])
            return [results[r.id] for r in refs]

        return finish
