"""decode: opinions become clean labels with counts, CLIP scores and ranks.

A label is a word that appears at least ``min_frequency`` times among the final
candidates (the original's rule), minus the block-list and the stop-words. Each label
is scored with stock CLIP: the cosine between its 85-template prompt-ensemble feature
and the image; labels scored below ``min_score`` are dropped.

An opinion of several views (ascend's ``discover: regions``, ``tiles`` or ``explain``) is decoded
as one: a word is a label when, on average over the check-ins, it fills at least ``min_share`` of
one view's candidates (so a word that one small view holds all along counts as much as one the
whole image holds); it is scored on the views that produced it, and keeps them, with their boxes,
as its ``evidence``.

A vocabulary (``decode.words``, ``--words``) adds the user's own words: each is scored by stock CLIP
on the whole image, with the same prompt ensemble, and is a label when its score stands out from the
image's scores of the whole vocabulary and a few background prompts: its z-score among them is at
least ``vocabulary_z`` (a threshold on the standardised score, so it holds across models whose cosines
differ in scale; chosen on held-out scenes by ``tests/benchmarks/vocabulary.py``). Each label says
where it came from: ``opinion``, ``vocabulary`` or ``both``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline.lazy import lazy_module
from pipeline.run.config import require
from pipeline.model.encode import load_batch, view_features
from pipeline.run.images import ImageRef
from pipeline.run.rundir import atomic_write_json, read_output
from pipeline.run.stage import BAD_INPUT, Finish, ItemResult, PerImageStage, StageContext
from pipeline.model.tokens import STOP_WORDS

torch = lazy_module("torch")


@dataclass(frozen=True)
class DecodeConfig:
    min_frequency: int = 3  # a label must occur this often among the final candidates (an opinion of one view)
    min_share: float = 0.5  # several views: a label must fill at least this share of one view's candidates, on average over the check-ins (chosen on held-out scenes)
    lowercase: bool = False  # merge words that differ only in case
    block_words: tuple[str, ...] = ()  # labels containing one of these (any case) are dropped
    stop_words: tuple[str, ...] = STOP_WORDS  # labels equal to one of these (any case) are dropped
    min_score: float | None = 0.0  # labels whose stock-CLIP score is below this are dropped; null keeps all
    prompts: int = 5  # best decoded candidates kept, by stock-CLIP score, trimmed and without repeats
    words: tuple[str, ...] = ()  # your vocabulary (--words): each "word" or "word: synonym, synonym"; each is scored on every image and is a label when it stands out
    vocabulary_z: float = 0.5  # a vocabulary word is a label when its score's z-score among the image's scores of every vocabulary text and the background prompts is at least this (chosen on held-out scenes)

    def __post_init__(self) -> None:
        require(self.min_frequency >= 1, f"decode.min_frequency must be >= 1, got {self.min_frequency}")
        require(self.min_share > 0, f"decode.min_share must be > 0, got {self.min_share}")
        require(self.prompts >= 0, f"decode.prompts must be >= 0, got {self.prompts}")
        for entry in self.words:
            require(bool(vocabulary_entries((entry,))), f"decode.words: {entry!r} names no word")


@dataclass
class Labels:
    """One image's decode result: labels best-scored first, and the best decoded prompts."""

    labels: list[dict]  # {"word", "frequency", "score", "rank"} (+ "source", "z" with a vocabulary; "evidence")
    prompts: list[dict]  # {"text", "score"}: the candidates with the best stock-CLIP re-score


def decode_labels(words: dict[str, dict], cfg: DecodeConfig, extra_block: tuple[str, ...] = (),
                  views: list[dict] | None = None) -> list[dict]:
    """Labels from an opinion's word statistics, most frequent first.

    Args:
        words: ``{word: {"frequency": ..., "appearances": ...}}`` as ``ascend`` writes it.
        cfg: the rule.
        extra_block: more blocked words (e.g. the ascend stage's own block-list).
        views: for an opinion of several views, its ``views``: a word is then a label when its share of one
            view's candidates, on average over that view's check-ins (``appearances / (checkins * candidates)``),
            is at least ``cfg.min_share`` in some view, not only at the end, and however few candidates the
            view has; otherwise, when it occurs ``cfg.min_frequency`` times among the final candidates.
    """
    key = (lambda w: w.lower()) if cfg.lowercase else (lambda w: w)
    frequency: dict[str, int] = {}
    for word, stats in words.items():
        frequency[key(word)] = frequency.get(key(word), 0) + int(stats["frequency"])
    if views:
        share: dict[str, float] = {}
        for v in views:
            held: dict[str, int] = {}
            for word, stats in v["words"].items():
                held[key(word)] = held.get(key(word), 0) + stats.get("appearances", 0)
            for w, n in held.items():
                share[w] = max(share.get(w, 0.0), n / max(1, v.get("checkins", 1) * v.get("candidates", 1)))
        passes = lambda w: share.get(w, 0.0) >= cfg.min_share  # noqa: E731
    else:
        passes = lambda w: frequency[w] >= cfg.min_frequency  # noqa: E731
    blocked = [b.lower() for b in (*cfg.block_words, *extra_block) if b.strip()]
    stop = {w.lower() for w in cfg.stop_words}
    labels = [
        {"word": w, "frequency": n}
        for w, n in frequency.items()
        if passes(w) and w.lower() not in stop and not any(b in w.lower() for b in blocked)
    ]
    return sorted(labels, key=lambda d: (-d["frequency"], d["word"]))


# The texts a vocabulary word must stand out from besides the vocabulary itself, so that a vocabulary of
# one word still has a background to be compared with.
BACKGROUND: tuple[str, ...] = ("nothing", "background", "a photo", "an empty scene")


def vocabulary_entries(words: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """``("forklift: fork lift, lift truck", "pallet")`` -> ``[("forklift", ("forklift", "fork lift",
    "lift truck")), ("pallet", ("pallet",))]``: each word with the texts it is scored by (itself first)."""
    out: dict[str, tuple[str, ...]] = {}
    for entry in words:
        name, _, rest = entry.partition(":")
        name = name.strip()
        if name:
            texts = (name, *(t.strip() for t in rest.split(",") if t.strip()))
            out[name] = tuple(dict.fromkeys((*out.get(name, ()), *texts)))
    return list(out.items())


def vocabulary_labels(whole: torch.Tensor, words: tuple[str, ...],
                      text_features: Callable[[list[str]], torch.Tensor], z_min: float) -> list[list[dict]]:
    """Per image, the vocabulary words that stand out on it, best first.

    A word's ``score`` is the best stock-CLIP cosine of its texts (itself and its synonyms, each a prompt
    ensemble) with the image; its ``z`` standardises that score among the image's scores of every
    vocabulary text and ``BACKGROUND``. It is a label when ``z >= z_min``.

    Shape:
        - whole: :math:`(B, D)`, unit whole-image features.
    """
    entries = vocabulary_entries(words)
    if not entries or not len(whole):
        return [[] for _ in range(len(whole))]
    texts = list(dict.fromkeys([t for _, ts in entries for t in ts] + list(BACKGROUND)))
    column = {t: i for i, t in enumerate(texts)}
    scores = (whole.to(torch.float32) @ text_features(texts).to(whole.device, torch.float32).T).cpu()  # [B, texts]
    mean, std = scores.mean(-1, keepdim=True), scores.std(-1, keepdim=True).clamp_min(1e-6)
    best = torch.stack([scores[:, [column[t] for t in ts]].max(-1).values for _, ts in entries], -1)  # [B, words]
    z = (best - mean) / std
    out = []
    for b in range(len(whole)):
        labels = [{"word": name, "frequency": 0, "score": round(best[b, k].item(), 4), "z": round(z[b, k].item(), 3),
                   "source": "vocabulary"} for k, (name, _) in enumerate(entries) if z[b, k].item() >= z_min]
        out.append(sorted(labels, key=lambda d: -d["score"]))
    return out


def merge_vocabulary(labels: list[dict], vocabulary: list[dict], lowercase: bool = False) -> list[dict]:
    """Opinion labels (``source: opinion``) and vocabulary labels as one list: a word in both is one label,
    the opinion's, with ``source: both`` and the vocabulary's ``z``."""
    key = (lambda w: w.lower()) if lowercase else (lambda w: w)
    found = {key(d["word"]): d for d in labels}
    out = [{**d, "source": "opinion"} for d in labels]
    index = {key(d["word"]): i for i, d in enumerate(out)}
    for v in vocabulary:
        if key(v["word"]) in found:
            out[index[key(v["word"])]].update(source="both", z=v["z"])
        else:
            out.append(dict(v))
    return out


def evidence(word: str, views: list[dict], scores: list[float], lowercase: bool = False) -> list[dict]:
    """The views that produced ``word``: each view whose candidates held it at least once a check-in on
    average (or, when none did, the one that held it most), most appearances first, with its box and the
    word's score on it."""
    def held(v: dict) -> int:
        return sum(d.get("appearances", 0) for w, d in v["words"].items() if (w.lower() if lowercase else w) == word)

    counts = [held(v) for v in views]
    keep = [k for k, v in enumerate(views) if counts[k] and counts[k] >= v.get("checkins", 1)]
    keep = keep or [max(range(len(views)), key=lambda k: counts[k])]
    return [{"view": views[k]["view"], "kind": views[k]["kind"], "box": views[k]["box"], "appearances": counts[k],
             "score": round(scores[k], 4)} for k in sorted(keep, key=lambda k: (-counts[k], k))]


def label_opinions(opinions: list[dict], features: list[torch.Tensor],
                   text_features: Callable[[list[str]], torch.Tensor], cfg: DecodeConfig) -> list[Labels]:
    """Labels for a batch of opinions, each scored by stock CLIP on the views that found it.

    With ``cfg.words``, the vocabulary's labels (``vocabulary_labels``) join them (``merge_vocabulary``);
    every label has a ``source``. An opinion of one view (the whole image) gives labels scored on the image. An opinion of several
    (``views``: tiles, or rounds) gives each label its ``evidence``: the views that produced it, with
    their boxes; its ``score`` is the best of its scores there, so a small object's word is not dropped
    for a low whole-image score, and each word is one label however many views found it.

    Args:
        opinions: ``ascend`` outputs, one per image.
        features: per opinion, the unit stock-CLIP features of its views ``[V, D]`` (``view_features``).
        text_features: unit prompt-ensemble features of words (one call for the batch's words).
        cfg: the rule.
    """
    labels_of = [decode_labels(op["words"], cfg, tuple(op.get("settings", {}).get("block_words", ())), op.get("views"))
                 for op in opinions]
    vocab = list(dict.fromkeys(d["word"] for labels in labels_of for d in labels))
    text = text_features(vocab)  # [V, D]
    index = {w: i for i, w in enumerate(vocab)}
    out = []
    for b, (opinion, labels) in enumerate(zip(opinions, labels_of)):
        if labels:
            rows = torch.tensor([index[d["word"]] for d in labels], device=text.device)
            scores = (text[rows] @ torch.atleast_2d(features[b]).to(text.device).T).cpu()  # [L, views]
            for d, s in zip(labels, scores.tolist()):
                if opinion.get("views"):
                    d["evidence"] = evidence(d["word"], opinion["views"], s, cfg.lowercase)
                    d["score"] = max(e["score"] for e in d["evidence"])
                else:
                    d["score"] = round(s[0], 4)
        labels.sort(key=lambda d: -d["score"])
        if cfg.min_score is not None:
            labels = [d for d in labels if d["score"] >= cfg.min_score]
        out.append(labels)
    whole = torch.stack([torch.atleast_2d(f)[0] for f in features])  # every opinion's first view: the image
    for b, extra in enumerate(vocabulary_labels(whole, cfg.words, text_features, cfg.vocabulary_z)):
        out[b] = sorted(merge_vocabulary(out[b], extra, cfg.lowercase), key=lambda d: -d["score"])
    for labels in out:
        for rank, d in enumerate(labels, 1):
            d["rank"] = rank
    return [Labels(labels, best_prompts(op["candidates"], cfg.prompts)) for labels, op in zip(out, opinions)]


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
        human = {}  # a reviewer's labels (``import``): kept however often decode runs, never redone from the opinion
        for r in refs:
            doc, _ = read_output(ctx.run.human(r.id), ctx.run.root) if ctx.run.human(r.id).is_file() else (None, None)
            if isinstance(doc, dict) and isinstance(doc.get("labels"), list):
                human[r.id] = doc
        refs = [r for r in refs if r.id not in human]
        ok, images, failed = load_batch(ctx.models.clip.input_resolution, refs, ctx.settings.max_side)
        return ok, images, failed, [read_output(ctx.run.opinion(r.id), ctx.run.root) for r in ok], human

    def process(self, ctx: StageContext[DecodeConfig], refs: list[ImageRef], loaded: tuple) -> Finish:
        lm = ctx.models.clip
        ok, images, failed, read, human = loaded
        results = {i: ItemResult(error=e, advice=BAD_INPUT) for i, e in failed.items()}
        written = [(r, Labels(human[r.id]["labels"], [])) for r in refs if r.id in human]
        if ok:
            opinions = [doc if isinstance(doc, dict) and "words" in doc else None for doc, _ in read]
            for ref, op, (_, why) in zip(ok, opinions, read):
                if op is None:
                    why = why or f"ascend/{ref.id}.json: not an opinion file"
                    results[ref.id] = ItemResult(error=f"{ref.rel}: {why}", damaged={"ascend": why},
                                                 advice="the next run redoes ascend, then decode")
            keep = [b for b, op in enumerate(opinions) if op is not None]
            ok, opinions = [ok[b] for b in keep], [opinions[b] for b in keep]
            if ok:
                with torch.no_grad():
                    feats = view_features(lm, images[keep], [op.get("views", []) for op in opinions])
                written += list(zip(ok, label_opinions(opinions, feats, ctx.models.text_features, ctx.config)))

        def finish() -> list[ItemResult]:
            for ref, labels in written:
                path = ctx.run.labels(ref.id)
                review = {"review": human[ref.id].get("review")} if ref.id in human else {}
                atomic_write_json(path, {"image": ref.id, "labels": labels.labels, "prompts": labels.prompts, **review})
                results[ref.id] = ItemResult(outputs=[ctx.run.rel(path)])
            return [results[r.id] for r in refs]

        return finish
