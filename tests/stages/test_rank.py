"""stages.rank: the leaderboard's columns and order, with no model and no browser."""

import csv

from pipeline.run.rundir import RunDir, atomic_write_json
from pipeline.model.tokens import vocab
from stages.rank import RankConfig, Tally, rank_unusual_words, tally_run, unusualness, write_records


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
    tally = tally_run(run, Tally())
    assert tally.words == {"img1": ("sprinkorange", "red", "circle"), "img2": ("red", "bluering")}
    assert tally.summary == {"img1": ("", None, (("red", 0.21), ("sprinkorange", 0.3))), "img2": ("", None, (("red", 0.25),))}
    records = tally.records(RankConfig())
    assert records == rank_unusual_words(_opinions(), _labels(), RankConfig())  # read from files, the same
    names = write_records(tmp_path, records, RankConfig(longest_over=10))
    assert names == ["records.csv", "records.md", "longest_clip_word_records.txt"]
    with open(tmp_path / "records.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["word"] for r in rows] == [r.word for r in records] and run.records() == rows
    assert (tmp_path / "longest_clip_word_records.txt").read_text() == "sprinkorange\n"
    assert "| 1 | `sprinkorange` |" in (tmp_path / "records.md").read_text()


def test_broken_words_are_marked_and_ranked_last_unless_kept():
    opinions = {"a": {"words": {"\ufffdbarkblue": {}, "red": {}}}}
    records = rank_unusual_words(opinions, {}, RankConfig())
    assert [(r.word, r.broken) for r in records] == [("red", False), ("\ufffdbarkblue", True)]
    kept = rank_unusual_words(opinions, {}, RankConfig(keep_broken=True))
    assert kept[0].word == "\ufffdbarkblue"  # by unusualness it is first


def test_empty_files_say_why(tmp_path):
    write_records(tmp_path, [], RankConfig())
    assert "no image of this run has a finished opinion" in (tmp_path / "longest_clip_word_records.txt").read_text()
    assert "No words" in (tmp_path / "records.md").read_text()
    records = rank_unusual_words(_opinions(), _labels(), RankConfig())
    write_records(tmp_path, records, RankConfig(longest_over=40))
    assert "longer than 40 characters" in (tmp_path / "longest_clip_word_records.txt").read_text()
    assert "never a label" in (tmp_path / "records.md").read_text()  # the blank score is explained


def test_one_summary_row_per_image():
    from pipeline.run.images import ImageRef
    from stages.rank import image_rows

    refs = [ImageRef("img1", "/x/1.png", "1.png"), ImageRef("img2", "/x/2.png", "2.png"), ImageRef("img3", "/x/3.png", "3.png")]
    labels = {"img1": {"labels": [{"word": "sprinkorange", "score": 0.3}, {"word": "red", "score": 0.21}],
                       "prompts": [{"text": "a sprinkorange", "score": 0.41}]}}
    records = rank_unusual_words(_opinions(), _labels(), RankConfig())
    states = {"img1": ("done", ""), "img2": ("done", ""), "img3": ("failed", "ascend: 3.png: not an image")}
    rows = image_rows(refs, states, _opinions(), labels, records)
    assert [r["file"] for r in rows] == ["1.png", "2.png", "3.png"]
    assert rows[0]["best_prompt"] == "a sprinkorange" and rows[0]["best_prompt_score"] == "0.4100"
    assert rows[0]["labels"] == "sprinkorange 0.300; red 0.210" and rows[0]["unusual_word"] == "sprinkorange"
    assert rows[1]["unusual_word"] == "bluering" and rows[1]["labels"] == ""
    assert rows[2]["status"] == "failed" and "not an image" in rows[2]["reason"] and rows[2]["unusual_word"] == ""
