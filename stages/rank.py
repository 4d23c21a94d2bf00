"""rank: a leaderboard of CLIP's most unusual words across a run.

For every word of every opinion: its length, how many BPE pieces the tokenizer splits
it into, whether it is a single vocabulary token (a word CLIP "knows"), how many
images produced it, and its best label score with the image where that happened.

    unusualness = (pieces + length / 10 + (0 if known else 1)) / (1 + log2(images))

Long words glued from many pieces and unknown to the vocabulary score high; words
that many images produce score low. ``rank.sort_by`` picks the ranking column.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Literal

from pipeline.config import require
from pipeline.rundir import LONGEST, RECORDS, RECORDS_MD, RunDir, atomic_write_text, read_json
from pipeline.runner import StageContext, WholeRunStage
from pipeline.tokens import vocab



@dataclass(frozen=True)
class WordRecord:
    """One word of the leaderboard; its fields are the columns of ``records.csv``, in order."""

    word: str
    length: int
    pieces: int  # BPE pieces the tokenizer splits it into
    known: bool  # a single vocabulary token
    images: int  # images whose opinion holds it
    score: float | None  # its best label score, if it was ever a label
    best_image: str  # where that score was, else the first image that produced it
    unusualness: float


COLUMNS = tuple(f.name for f in fields(WordRecord))


@dataclass(frozen=True)
class RankConfig:
    min_length: int = 1
    sort_by: Literal["unusualness", "length", "pieces", "images", "score"] = "unusualness"
    top: int = 50  # rows in records.md
    longest_over: int = 15  # the original's "longest words" file keeps words longer than this

    def __post_init__(self) -> None:
        require(self.min_length >= 1, f"rank.min_length must be >= 1, got {self.min_length}")
        require(self.top >= 1, f"rank.top must be >= 1, got {self.top}")


def unusualness(length: int, pieces: int, known: bool, images: int) -> float:
    return (pieces + length / 10 + (0 if known else 1)) / (1 + math.log2(max(images, 1)))


def rank_unusual_words(opinions: dict[str, dict], labels: dict[str, dict], cfg: RankConfig) -> list[WordRecord]:
    """Records for every word of a run, best first.

    Args:
        opinions: ``{image_id: ascend json}``.
        labels: ``{image_id: labels json}`` (may miss images).
        cfg: ranking settings.
    """
    v = vocab()
    seen: dict[str, set[str]] = {}
    for image, op in opinions.items():
        for word in op["words"]:
            seen.setdefault(word, set()).add(image)
    best: dict[str, tuple[float, str]] = {}
    for image, lab in labels.items():
        for d in lab["labels"]:
            if "score" in d and (d["word"] not in best or d["score"] > best[d["word"]][0]):
                best[d["word"]] = (d["score"], image)
    records = []
    for word, images in seen.items():
        if len(word) < cfg.min_length:
            continue
        pieces = len(v.encode(word))
        known = pieces == 1
        score, where = best.get(word, (None, None))
        records.append(WordRecord(word, len(word), pieces, known, len(images), score, where or sorted(images)[0],
                                  round(unusualness(len(word), pieces, known, len(images)), 4)))

    def order(r: WordRecord) -> tuple:
        value = getattr(r, cfg.sort_by)
        return -(value if value is not None else float("-inf")), r.word

    return sorted(records, key=order)


def read_run(run: RunDir, prefix: str = "", keep: Callable[[str, str], bool] | None = None
             ) -> tuple[dict[str, dict], dict[str, dict]]:
    """A run's opinions and labels by image id (``prefix`` + id); unreadable files are skipped.

    ``keep(image_id, stage)`` chooses the outputs to read (e.g. only those made with today's settings).
    """
    opinions, labels = {}, {}
    for image_id in run.stage_ids("ascend"):
        doc = read_json(run.opinion(image_id)) if keep is None or keep(image_id, "ascend") else None
        if doc is not None:
            opinions[prefix + image_id] = doc
    for image_id in run.stage_ids("labels"):
        doc = read_json(run.labels(image_id)) if keep is None or keep(image_id, "decode") else None
        if doc is not None:
            labels[prefix + image_id] = doc
    return opinions, labels


def write_records(folder: Path, records: list[WordRecord], cfg: RankConfig) -> list[str]:
    """``records.csv``, ``records.md`` and ``longest_clip_word_records.txt`` in ``folder``; returns their names."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(asdict(r) for r in records)
    atomic_write_text(folder / RECORDS, buf.getvalue())
    md = ["| # | word | length | pieces | known | images | score | unusualness |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(records[: cfg.top], 1):
        score = "" if r.score is None else f"{r.score:.3f}"
        md.append(f"| {i} | `{r.word}` | {r.length} | {r.pieces} | {'yes' if r.known else 'no'} "
                  f"| {r.images} | {score} | {r.unusualness:.3f} |")
    atomic_write_text(folder / RECORDS_MD, "# CLIP's most unusual words\n\n" + "\n".join(md) + "\n")
    longest = sorted({r.word for r in records if len(r.word) > cfg.longest_over}, key=lambda s: (-len(s), s))
    atomic_write_text(folder / LONGEST, "".join(x + "\n" for x in longest))
    return [RECORDS, RECORDS_MD, LONGEST]


def merge_runs(roots: list[Path], out: Path, cfg: RankConfig) -> list[WordRecord]:
    """One leaderboard over several runs, written to ``out``. Images are named ``<run>/<id>``."""
    opinions, labels = {}, {}
    for root in roots:
        ops, labs = read_run(RunDir(root), prefix=f"{root.name}/")
        opinions.update(ops)
        labels.update(labs)
    records = rank_unusual_words(opinions, labels, cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_records(out, records, cfg)
    return records


class RankStage(WholeRunStage[RankConfig]):
    """Writes ``records.csv``, ``records.md`` and ``longest_clip_word_records.txt``."""

    name = "rank"
    needs = ("ascend", "decode")

    def run_all(self, ctx: StageContext[RankConfig]) -> list[str]:
        latest = ctx.run.latest()
        opinions, labels = read_run(ctx.run, keep=lambda i, stage: ctx.status(i, stage, latest).state == "done")
        return write_records(ctx.run.root, rank_unusual_words(opinions, labels, ctx.config), ctx.config)
