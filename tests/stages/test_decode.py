"""stages.decode: the original's frequency rule, block-lists, stock-CLIP scores and ranks."""

import torch
import torch.nn.functional as F

from stages.decode import DecodeConfig, decode_labels, label_opinions


def test_decode_rule_and_block_list():
    words = {"Circle": {"frequency": 2}, "circle": {"frequency": 2}, "red": {"frequency": 5}, "odd": {"frequency": 1}}
    assert [d["word"] for d in decode_labels(words, DecodeConfig())] == ["red"]
    assert [d["word"] for d in decode_labels(words, DecodeConfig(lowercase=True))] == ["red", "circle"]
    assert decode_labels(words, DecodeConfig(), ("RE",)) == []


def test_several_views_count_a_word_by_its_share_of_one_views_candidates():
    def view(candidates, checkins, appearances):
        return {"candidates": candidates, "checkins": checkins,
                "words": {w: {"frequency": 0, "appearances": a} for w, a in appearances.items()}}

    views = [view(8, 10, {"red": 40, "thin": 20}),  # red: half the whole image's candidates all along
             view(3, 10, {"ring": 15, "thin": 10, "Ring": 5}),  # ring: half a small region's 3
             view(3, 10, {"thin": 10, "once": 14})]  # thin: in every view, at most a third of one; once: 0.47
    words = {w: {"frequency": 1, "appearances": 0} for w in ("red", "ring", "Ring", "thin", "once")}
    assert [d["word"] for d in decode_labels(words, DecodeConfig(), views=views)] == ["red", "ring"]
    assert [d["word"] for d in decode_labels(words, DecodeConfig(lowercase=True), views=views)] == ["ring", "red"]
    assert [d["word"] for d in decode_labels(words, DecodeConfig(min_share=0.45), views=views)] == ["once", "red", "ring"]
    assert [d["word"] for d in decode_labels(words, DecodeConfig(min_share=0.25), views=views)] == [
        "once", "red", "ring", "thin"]  # thin's best is 10 / (10 * 3); Ring alone is 5 / 30
    assert decode_labels(words, DecodeConfig()) == []  # one view: the final frequency rule (1 < 3)


def _opinion(words, candidates, block=()):
    return {"words": {w: {"frequency": n} for w, n in words.items()}, "settings": {"block_words": list(block)},
            "candidates": [{"text": t} if s is None else {"text": t, "rescored": s} for t, s in candidates]}


def test_labels_are_scored_ranked_and_prompts_are_the_best_rescored():
    axes = {"red": [1.0, 0.0, 0.0], "ring": [0.0, 1.0, 0.0], "odd": [0.0, 0.0, 1.0]}
    calls = []

    def text_features(words):
        calls.append(list(words))
        return F.normalize(torch.tensor([axes[w] for w in words]), dim=-1) if words else torch.empty(0, 3)

    image = F.normalize(torch.tensor([[0.2, 0.9, 0.1], [1.0, 0.0, 0.0]]), dim=-1)
    ops = [_opinion({"red": 4, "ring": 3, "odd": 1}, [("a", 0.1), ("b", 0.3), ("c", None)]),
           _opinion({"red": 5, "ring": 9}, [("x", 0.2)], block=("rin",))]
    out = label_opinions(ops, image, text_features, DecodeConfig(prompts=2))
    assert len(calls) == 1 and set(calls[0]) == {"red", "ring"}  # one text pass for the batch, only labels
    first = out[0].labels
    assert [d["word"] for d in first] == ["ring", "red"]  # by score, not frequency
    assert [d["rank"] for d in first] == [1, 2] and first[0]["score"] == round(float(image[0, 1]), 4)
    assert [p["text"] for p in out[0].prompts] == ["b", "a"]  # best re-score first, unscored last, capped at 2
    assert [d["word"] for d in out[1].labels] == ["red"]  # the opinion's own ascend block-list applies


def test_stop_words_min_score_and_repeated_prompts():
    words = {"a": {"frequency": 9}, "The": {"frequency": 5}, "red": {"frequency": 4}, "far": {"frequency": 4}}
    assert [d["word"] for d in decode_labels(words, DecodeConfig())] == ["far", "red"]  # "a" and "The" are stop-words
    assert [d["word"] for d in decode_labels(words, DecodeConfig(stop_words=()))] == ["a", "The", "far", "red"]

    axes = {"red": [1.0, 0.0], "far": [-1.0, 0.2]}
    text = lambda ws: F.normalize(torch.tensor([axes[w] for w in ws]), dim=-1)  # noqa: E731
    image = F.normalize(torch.tensor([[1.0, 0.1]]), dim=-1)
    op = _opinion({"red": 4, "far": 4, "a": 9}, [("red  ring ", 0.3), ("red ring", 0.2), (" blue", 0.1), ("  ", 0.05)])
    out = label_opinions([op], image, text, DecodeConfig())[0]
    assert [d["word"] for d in out.labels] == ["red"]  # "far" scores below 0 (decode.min_score)
    assert [p["text"] for p in out.prompts] == ["red ring", "blue"]  # trimmed, each text once, at its best score
    assert out.prompts[0]["score"] == 0.3
    kept = label_opinions([op], image, text, DecodeConfig(min_score=None))[0]
    assert [d["word"] for d in kept.labels] == ["red", "far"] and kept.labels[1]["score"] < 0


def test_vocabulary_entries_take_synonyms_and_merge_repeats():
    from stages.decode import vocabulary_entries

    assert vocabulary_entries(("forklift: fork lift, lift truck", " pallet ", "forklift: hi-lo", ": x", "")) == [
        ("forklift", ("forklift", "fork lift", "lift truck", "hi-lo")), ("pallet", ("pallet",))]


def test_vocabulary_words_that_stand_out_are_labels_and_say_where_they_came_from():
    from stages.decode import BACKGROUND

    names = ["red", "ring", "blue", "fork", *BACKGROUND, "odd"]
    axes = {w: [float(i == k) for k in range(len(names))] for i, w in enumerate(names)}
    text_features = lambda ws: torch.tensor([axes[w] for w in ws]) if ws else torch.empty(0, 9)  # noqa: E731
    image = F.normalize(torch.tensor([[3.0, 2.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1, 1.0]]), dim=-1)
    ops = [_opinion({"red": 4, "odd": 3}, [("a", 0.1)])]
    cfg = DecodeConfig(words=("ring", "red", "blue: fork"), vocabulary_z=0.5)
    labels = label_opinions(ops, image, text_features, cfg)[0].labels
    got = {d["word"]: d for d in labels}
    assert set(got) == {"red", "odd", "ring"}  # blue (and its synonym fork) does not stand out: no label
    assert got["red"]["source"] == "both" and got["odd"]["source"] == "opinion" and got["ring"]["source"] == "vocabulary"
    assert got["ring"]["score"] == round(float(image[0, 1]), 4) and got["ring"]["z"] >= 0.5
    assert [d["rank"] for d in labels] == [1, 2, 3] and labels[0]["word"] == "red"  # one ranking, by score
    synonym = label_opinions(ops, F.normalize(torch.tensor([[0.0, 0.0, 0.0, 3.0, 0.1, 0.1, 0.1, 0.1, 1.0]]), dim=-1),
                             text_features, cfg)[0].labels
    assert [d["word"] for d in synonym if d["source"] == "vocabulary"] == ["blue"]  # found by its synonym's score


def test_vocabulary_labels_on_toy_scenes_name_the_object(toy):
    from pipeline.model.encode import encode_images
    from pipeline.model.prompts import prompt_ensemble
    from pipeline.run.images import to_tensor
    from pipeline.toy.world import COLOURS, SHAPES, SceneSpec, make_scenes
    from PIL import Image
    from stages.decode import vocabulary_labels

    scenes = make_scenes(5, 12, SceneSpec(max_objects=1))
    imgs = torch.stack([to_tensor(Image.fromarray(s.image), toy.input_resolution) for s in scenes])
    cache: dict = {}
    with torch.no_grad():
        found = vocabulary_labels(encode_images(toy, imgs), (*SHAPES, *COLOURS),
                                  lambda ws: prompt_ensemble(toy.model, ws, cache), DecodeConfig().vocabulary_z)
    colours = sum(s.objects[0].colour in {d["word"] for d in labels} for s, labels in zip(scenes, found))
    shapes = sum(s.objects[0].shape in {d["word"] for d in labels} for s, labels in zip(scenes, found))
    assert colours >= 11 and shapes >= 9, (colours, shapes)  # the toy's own style: its words stand out
    assert all(d["source"] == "vocabulary" and d["z"] >= DecodeConfig().vocabulary_z for ls in found for d in ls)
