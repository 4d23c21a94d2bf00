"""decode: opinions become clean labels with counts, CLIP scores and ranks.

A label is a word that appears at least ``min_frequency`` times among the final
candidates (the original's rule), minus the block-list. Each label is scored with
stock CLIP: the cosine between its 85-template prompt-ensemble feature and the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import require
from pipeline.images import ImageRef
from pipeline.rundir import atomic_write_json, read_json
from pipeline.runner import ItemResult, RunContext
from stages.ascend import encode_images, load_batch


@dataclass(frozen=True)
class DecodeConfig:
    min_frequency: int = 3
    lowercase: bool = False  # merge words that differ only in case
    block_words: tuple[str, ...] = ()  # labels containing one of these (any case) are dropped
    prompts: int = 5  # best decoded candidates kept, by stock-CLIP score

    def __post_init__(self) -> None:
        require(self.min_frequency >= 1, f"decode.min_frequency must be >= 1, got {self.min_frequency}")
        require(self.prompts >= 0, f"decode.prompts must be >= 0, got {self.prompts}")


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
    labels = [
        {"word": w, "frequency": n}
        for w, n in merged.items()
        if n >= cfg.min_frequency and not any(b in w.lower() for b in blocked)
    ]
    return sorted(labels, key=lambda d: (-d["frequency"], d["word"]))


class DecodeStage:
    """Reads ``ascend/<id>.json``, writes ``labels/<id>.json``."""

    name = "decode"
    needs = ("ascend",)

    def batch_size(self, ctx: RunContext) -> int:
        return ctx.config.encode_batch_size

    def process(self, ctx: RunContext, refs: list[ImageRef]) -> list[ItemResult]:
        cfg: DecodeConfig = ctx.config.decode
        lm = ctx.model
        ok, images, failed = load_batch(lm, refs, ctx.config.max_side)
        results = {i: ItemResult(error=e) for i, e in failed.items()}
        if ok:
            feats = encode_images(lm, images)
            opinions = [read_json(ctx.run.file("ascend", f"{r.id}.json")) for r in ok]
            for ref, op in zip(ok, opinions):
                if op is None:
                    results[ref.id] = ItemResult(error=f"{ref.rel}: ascend/{ref.id}.json is unreadable; rerun ascend with --force")
            keep = [b for b, op in enumerate(opinions) if op is not None]
            ok, feats, opinions = [ok[b] for b in keep], feats[keep], [opinions[b] for b in keep]
            labels_of = [decode_labels(op["words"], cfg, ctx.config.ascend.block_words) for op in opinions]
            vocab = list(dict.fromkeys(d["word"] for labels in labels_of for d in labels))
            text = ctx.text_features(vocab)  # one pass for the batch's new words
            index = {w: i for i, w in enumerate(vocab)}
            for b, (ref, opinion, labels) in enumerate(zip(ok, opinions, labels_of)):
                if labels:
                    rows = torch.tensor([index[d["word"]] for d in labels], device=text.device)
                    scores = (text[rows] @ feats[b].to(text.device)).cpu()
                    for d, s in zip(labels, scores):
                        d["score"] = round(float(s), 4)
                labels.sort(key=lambda d: -d["score"])
                for rank, d in enumerate(labels, 1):
                    d["rank"] = rank
                prompts = sorted(opinion["candidates"], key=lambda c: -c.get("rescored", float("-inf")))
                prompts = [{"text": c["text"], "score": c.get("rescored")} for c in prompts[: cfg.prompts]]
                path = ctx.run.file("labels", f"{ref.id}.json")
                atomic_write_json(path, {"image": ref.id, "labels": labels, "prompts": prompts})
                results[ref.id] = ItemResult(outputs=[ctx.run.rel(path)])
        return [results[r.id] for r in refs]
