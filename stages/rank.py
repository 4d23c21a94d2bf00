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
import functools
import io
import math
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Mapping

from pipeline.run.config import require
from pipeline.run.images import ImageRef
from pipeline.run.provenance import (mark_damaged, output_states, reads_stamp, root_line, set_stamp, stamp_of,
                                     states_digest)
from pipeline.run.shards import caption_of
from pipeline.run.rundir import (IMAGES_CSV, LONGEST, RECORDS, RECORDS_MD, RunDir, atomic_path, atomic_write_text,
                                 read_output)
from pipeline.run.stage import StageContext, WholeRunStage
from pipeline.model.tokens import BYTE_MARK, vocab



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
    broken: bool = False  # holds a byte sequence that is not valid UTF-8 (shown as <0x..> bytes), as CLIP produced it


COLUMNS = tuple(f.name for f in fields(WordRecord))


@dataclass(frozen=True)
class RankConfig:
    min_length: int = 1  # words shorter than this, in characters, are left off the leaderboard
    sort_by: Literal["unusualness", "length", "pieces", "images", "score"] = "unusualness"  # the ranking column
    top: int = 50  # rows in records.md
    longest_over: int = 15  # the original's "longest words" file keeps words longer than this
    keep_broken: bool = False  # rank words with broken byte sequences among the rest (by default they go last)

    def __post_init__(self) -> None:
        require(self.min_length >= 1, f"rank.min_length must be >= 1, got {self.min_length}")
        require(self.top >= 1, f"rank.top must be >= 1, got {self.top}")


def unusualness(length: int, pieces: int, known: bool, images: int) -> float:
    return (pieces + length / 10 + (0 if known else 1)) / (1 + math.log2(max(images, 1)))


def is_broken(word: str) -> bool:
    """Whether a decoded word holds bytes that are not valid UTF-8 (BPE pieces cut inside a character):
    written ``<0x..>`` by today's decoding, U+FFFD in runs made before it."""
    return "\ufffd" in word or BYTE_MARK.search(word) is not None


class Tally:
    """What the leaderboard and ``images.csv`` need of a run's opinions and labels, gathered one output at a time, so
    a run of any size is ranked without holding its files: per word, how many images hold it and the first of them,
    and its best label score with where; per image, its words and its labels' summary (``top_labels`` of them)."""

    def __init__(self, top_labels: int = 5) -> None:
        self.top_labels = top_labels
        self.images: dict[str, int] = {}
        self.first: dict[str, str] = {}
        self.best: dict[str, tuple[float, str]] = {}
        self.words: dict[str, tuple[str, ...]] = {}  # per image; each word one shared string
        self.summary: dict[str, tuple[str, float | None, tuple]] = {}  # per image: best prompt, its score, labels

    @classmethod
    def of(cls, opinions: dict[str, dict], labels: dict[str, dict], top_labels: int = 5) -> "Tally":
        """A tally of outputs already read: ``{image_id: ascend json}`` and ``{image_id: labels json}``."""
        tally = cls(top_labels)
        for image, doc in opinions.items():
            tally.opinion(image, doc)
        for image, doc in labels.items():
            tally.labels(image, doc)
        return tally

    def opinion(self, image: str, doc: dict) -> None:
        words = self.words[image] = tuple(map(sys.intern, doc["words"]))
        for word in words:
            self.images[word] = self.images.get(word, 0) + 1
            if word not in self.first or image < self.first[word]:
                self.first[word] = image

    def labels(self, image: str, doc: dict) -> None:
        for d in doc["labels"]:
            if "score" in d and (d["word"] not in self.best or d["score"] > self.best[d["word"]][0]):
                self.best[d["word"]] = (d["score"], image)
        prompt = (doc.get("prompts") or [{}])[0]
        self.summary[image] = (prompt.get("text", ""), prompt.get("score"),
                               tuple((d["word"], d["score"]) for d in doc.get("labels", [])[:self.top_labels]))

    def records(self, cfg: RankConfig) -> list[WordRecord]:
        """Records for every word, best first."""
        v = vocab()
        records = []
        for word, images in self.images.items():
            if len(word) < cfg.min_length:
                continue
            pieces = len(v.encode(word))
            known = pieces == 1
            score, where = self.best.get(word, (None, None))
            records.append(WordRecord(word, len(word), pieces, known, images, score, where or self.first[word],
                                      round(unusualness(len(word), pieces, known, images), 4), is_broken(word)))

        def order(r: WordRecord) -> tuple:
            value = getattr(r, cfg.sort_by)
            return r.broken and not cfg.keep_broken, -(value if value is not None else float("-inf")), r.word

        return sorted(records, key=order)

    def rows(self, refs: Iterable[ImageRef], states: dict[str, tuple[str, str]],
             records: list[WordRecord]) -> Iterator[dict]:
        """One summary row per image (the columns of ``images.csv``), as ``image_rows`` describes."""
        rank_of = {r.word: (i, r) for i, r in enumerate(records)}
        for ref in refs:
            state, reason = states.get(ref.id, ("pending", ""))
            prompt, score, labels = self.summary.get(ref.id, ("", None, ()))
            words = [rank_of[w] for w in self.words.get(ref.id, ()) if w in rank_of]
            unusual = min(words, key=lambda t: t[0])[1] if words else None
            yield {
                "file": ref.rel, "id": ref.id, "status": state, "reason": reason, "best_prompt": prompt,
                "best_prompt_score": "" if score is None else f"{score:.4f}",
                "labels": "; ".join(f"{word} {s:.3f}" for word, s in labels),
                "unusual_word": unusual.word if unusual else "", "unusualness": unusual.unusualness if unusual else "",
                "caption": caption_of(ref),
            }


def rank_unusual_words(opinions: dict[str, dict], labels: dict[str, dict], cfg: RankConfig) -> list[WordRecord]:
    """Records for every word of a run, best first.

    Args:
        opinions: ``{image_id: ascend json}``.
        labels: ``{image_id: labels json}`` (may miss images).
        cfg: ranking settings.
    """
    return Tally.of(opinions, labels).records(cfg)


def tally_run(run: RunDir, tally: Tally, prefix: str = "", keep: Callable[[str, str], bool] | None = None,
              unreadable: dict[tuple[str, str], str] | None = None) -> Tally:
    """``tally`` with a run's opinions and labels by image id (``prefix`` + id), each file read and let go;
    unreadable files are left out.

    ``keep(image_id, stage)`` chooses the outputs to read (e.g. only those made with today's settings).
    ``unreadable``, when given, receives each kept output that does not parse: ``(image_id, stage) -> reason``.
    """
    for stage, folder, path, add, key in (("ascend", "ascend", run.opinion, tally.opinion, "words"),
                                          ("decode", "labels", run.labels, tally.labels, "labels")):
        for image_id in run.stage_ids(folder):
            if keep is not None and not keep(image_id, stage):
                continue
            doc, why = read_output(path(image_id), run.root)
            if isinstance(doc, dict) and key in doc:
                add(prefix + image_id, doc)
            elif unreadable is not None:
                unreadable[(image_id, stage)] = why or f"{folder}/{image_id}.json: not a {stage} output"
    return tally


def write_records(folder: Path, records: list[WordRecord], cfg: RankConfig) -> list[str]:
    """``records.csv``, ``records.md`` and ``longest_clip_word_records.txt`` in ``folder``; returns their names."""
    atomic_write_text(folder / RECORDS, _csv_text(COLUMNS, (asdict(r) for r in records)))
    md = ["| # | word | length | pieces | known | images | score | unusualness | broken |",
          "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(records[: cfg.top], 1):
        score = "–" if r.score is None else f"{r.score:.3f}"
        md.append(f"| {i} | `{r.word}` | {r.length} | {r.pieces} | {'yes' if r.known else 'no'} "
                  f"| {r.images} | {score} | {r.unusualness:.3f} | {'yes' if r.broken else ''} |")
    notes = ["score: the word's best stock-CLIP label score; – when it was never a label (too rare, a stop-word, "
             "or scored below decode.min_score)."]
    if any(r.broken for r in records) and not cfg.keep_broken:
        notes.append("Words with broken byte sequences are ranked last (rank.keep_broken: true ranks them with the rest).")
    body = "\n".join(md) if records else "No words: no image of this run has a finished opinion (run ascend)."
    atomic_write_text(folder / RECORDS_MD, "# CLIP's most unusual words\n\n" + body + "\n\n" + "\n".join(notes) + "\n")
    longest = sorted({r.word for r in records if len(r.word) > cfg.longest_over}, key=lambda s: (-len(s), s))
    empty = (f"# no word of this run is longer than {cfg.longest_over} characters (rank.longest_over)\n" if records
             else "# no words: no image of this run has a finished opinion\n")
    atomic_write_text(folder / LONGEST, "".join(x + "\n" for x in longest) if longest else empty)
    return [RECORDS, RECORDS_MD, LONGEST]


def merge_runs(roots: list[Path], out: Path, cfg: RankConfig) -> list[WordRecord]:
    """One leaderboard over several runs, written to ``out``. Images are named ``<run>/<id>``."""
    tally = Tally()
    for root in roots:
        tally_run(RunDir(root), tally, prefix=f"{root.name}/")
    records = tally.records(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_records(out, records, cfg)
    return records


PER_IMAGE = ("ascend", "decode", "surgery")  # the per-image stages whose outputs and states rank reads
IMAGE_COLUMNS = ("file", "id", "status", "reason", "best_prompt", "best_prompt_score", "labels", "unusual_word",
                 "unusualness", "caption")


def image_rows(refs: list[ImageRef], states: dict[str, tuple[str, str]], opinions: dict[str, dict],
               labels: dict[str, dict], records: list[WordRecord], top_labels: int = 5) -> list[dict]:
    """One summary row per image (the columns of ``images.csv``; ``Tally.rows``, over files already read).

    Args:
        refs: the run's images, in order.
        states: per image id, ``(state, reason)``: "done" when every per-image stage is, else the
            first stage that is not, e.g. ``("failed", "a.jpg: file is empty (0 bytes) (ascend; later stages
            skipped): replace or remove the file")``.
        opinions, labels: the done outputs by image id.
        records: the leaderboard, best first; an image's unusual word is its best-ranked word.
    """
    return list(Tally.of(opinions, labels, top_labels).rows(refs, states, records))


def write_image_rows(folder: Path, rows: Iterable[dict]) -> str:
    """``images.csv``, written a row at a time."""
    with atomic_path(folder / IMAGES_CSV) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=IMAGE_COLUMNS, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
    return IMAGES_CSV


def _csv_text(columns: tuple[str, ...], rows: Iterable[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


class RankStage(WholeRunStage[RankConfig]):
    """Writes ``records.csv``, ``records.md``, ``longest_clip_word_records.txt`` and ``images.csv``."""

    name = "rank"
    needs = ("ascend", "decode")

    def run_all(self, ctx: StageContext[RankConfig]) -> list[str]:
        @functools.cache  # the run's latest records, images and their statuses, read once something needs them
        def states() -> tuple[Mapping, list[ImageRef], dict]:
            latest, refs = ctx.run.latest(), ctx.run.load_images()
            return latest, refs, {r.id: {stage: ctx.status(r.id, stage, latest) for stage in PER_IMAGE} for r in refs}

        digest = ctx.read_digest(self.name, lambda: states_digest(output_states(states()[2], states()[0])))
        stamp = reads_stamp(ctx.provenance.settings.get("rank"), digest)
        outputs = [RECORDS, RECORDS_MD, LONGEST, IMAGES_CSV]
        if not ctx.force and stamp_of(ctx.run, self.name) == stamp and all(ctx.run.file(p).is_file() for p in outputs):
            ctx.log.info("rank: up to date")  # nothing it reads has changed
            return outputs
        latest, refs, statuses = states()
        set_stamp(ctx.run, self.name, None)
        unreadable: dict[tuple[str, str], str] = {}
        tally = tally_run(ctx.run, Tally(), keep=lambda i, stage: statuses[i][stage].state == "done",
                          unreadable=unreadable)
        if unreadable:  # done by its record, but it does not parse: damaged, so the next run redoes it
            paths = {r.id: r.path for r in refs}
            mark_damaged(ctx.run, [{"image": i, "path": paths.get(i), "stage": st, "reason": why}
                                   for (i, st), why in unreadable.items()], ctx.session)
            for (i, st), why in unreadable.items():
                ctx.log.warning("rank: %s output of %s is damaged: %s", st, i, why)
            latest = ctx.run.latest()
            statuses = {r.id: {stage: ctx.status(r.id, stage, latest) for stage in PER_IMAGE} for r in refs}
        records = tally.records(ctx.config)
        states = {}
        for ref in refs:
            per_stage = list(statuses[ref.id].items())
            states[ref.id] = ("done", "")
            for stage, st in per_stage:
                if st.state in ("failed", "blocked"):  # its root cause, in the words the summary and status use
                    states[ref.id] = (st.state, root_line([s for _, s in per_stage]) or "")
                    break
                if st.state != "done":
                    states[ref.id] = (st.state, f"{stage}: {st.reason}" if st.reason else stage)
                    break
        written = [*write_records(ctx.run.root, records, ctx.config),
                   write_image_rows(ctx.run.root, tally.rows(refs, states, records))]
        if not unreadable:  # else the next run, which redoes the damaged outputs, ranks again
            set_stamp(ctx.run, self.name, stamp)
        return written
