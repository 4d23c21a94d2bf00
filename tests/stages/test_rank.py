"""stages.rank: the leaderboard's columns and order, with no model and no browser."""

import csv

from pipeline.rundir import RunDir, atomic_write_json
from pipeline.tokens import vocab
from stages.rank import RankConfig, rank_unusual_words, read_run, unusualness, write_records


def _opinions():
    return {"img1": {"words": {"sprinkorange": {}, "red": {}, "circle": {}}},
            "img2": {"words": {"red": {}, "bluering": {}}}}


def _labels():
    return {"img1": {"labels": [{"word": "red", "score": 0.21}, {"word": "sprinkorange", "score": 0.3}]},
            "img2": {"labels": [{"word": "red", "score": 0.25}]}}


def test_records_have_true_counts_pieces_and_best_scores():
    records = {r.word: r for r in rank_unusual_words(_opinions(), _labels(), RankConfig())}
    assert set(records) == {"sprinkorange", "red", "circle", "bluering"}
    red = records["red"]
    assert red.images == 2 and red.known and red.pieces == 1
    assert red.score == 0.25 and red.best_image == "img2"  # the best score, and where it happened
    odd = records["sprinkorange"]
    assert odd.pieces == len(vocab().encode("sprinkorange")) > 1 and not odd.known
    assert odd.unusualness == round(unusualness(12, odd.pieces, False, 1), 4)
    assert records["circle"].score is None and records["circle"].best_image == "img1"  # never a label


def test_order_follows_sort_by_and_min_length_filters():
    by_default = rank_unusual_words(_opinions(), _labels(), RankConfig())
    scores = [r.unusualness for r in by_default]
    assert scores == sorted(scores, reverse=True) and by_default[0].word == "sprinkorange"
    by_images = rank_unusual_words(_opinions(), _labels(), RankConfig(sort_by="images"))
    assert by_images[0].word == "red"
    by_score = rank_unusual_words(_opinions(), _labels(), RankConfig(sort_by="score"))
    assert [r.word for r in by_score[:2]] == ["sprinkorange", "red"] and by_score[-1].score is None
    assert {r.word for r in rank_unusual_words(_opinions(), _labels(), RankConfig(min_length=7))} == {"sprinkorange", "bluering"}


def test_files_written_and_read_back_through_the_run_directory(tmp_path):
    run = RunDir(tmp_path)
    for image, doc in _opinions().items():
        atomic_write_json(run.opinion(image), doc)
    for image, doc in _labels().items():
        atomic_write_json(run.labels(image), doc)
    opinions, labels = read_run(run)
    assert opinions == _opinions() and labels == _labels()
    records = rank_unusual_words(opinions, labels, RankConfig())
    names = write_records(tmp_path, records, RankConfig(longest_over=10))
    assert names == ["records.csv", "records.md", "longest_clip_word_records.txt"]
    with open(tmp_path / "records.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["word"] for r in rows] == [r.word for r in records] and run.records() == rows
    assert (tmp_path / "longest_clip_word_records.txt").read_text() == "sprinkorange\n"
    assert "| 1 | `sprinkorange` |" in (tmp_path / "records.md").read_text()
