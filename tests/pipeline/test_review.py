"""pipeline.labels.review: Label Studio tasks read as human labels, each problem naming its task."""

from pipeline.labels.review import config_labels, read_review
from pipeline.run.images import ImageRef

REFS = [ImageRef("a-1", "/x/a.png", "a.png"), ImageRef("b-2", "/x/sub/b.png", "sub/b.png")]


def _rect(label, x, y, w, h):
    return {"type": "rectanglelabels", "original_width": 200, "original_height": 100,
            "value": {"x": x, "y": y, "width": w, "height": h, "rectanglelabels": [label]}}


def test_an_edited_tasks_file_gives_every_task_its_labels_and_boxes_in_pixels():
    tasks = [{"id": 1, "data": {"clipsight_id": "a-1"}, "predictions": [{"result": [
                 {"type": "choices", "value": {"choices": ["red", "ring"]}}, _rect("ring", 10, 20, 50, 40)]}]},
             {"id": 2, "data": {"image": "/data/local-files/?d=photos/sub/b.png"},  # found by its file name
              "predictions": [{"result": [{"type": "choices", "value": {"choices": ["cross"]}}]}]}]
    reviews, problems = read_review(tasks, REFS, {})
    assert problems == []
    a, b = reviews
    assert (a.image, b.image) == ("a-1", "b-2")
    assert [(d["word"], d["boxes"], d["source"]) for d in a.labels] == [("red", [], "human"),
                                                                         ("ring", [[20.0, 20.0, 100.0, 40.0]], "human")]
    assert [d["word"] for d in b.labels] == ["cross"] and b.annotation is None


def test_a_label_studio_export_reads_annotations_only_and_names_each_problem():
    config = '<View><Choices name="labels"><Choice value="red"/><Choice value="ring"/></Choices></View>'
    tasks = [{"id": 5, "data": {"clipsight_id": "a-1"},
              "annotations": [{"id": 1, "was_cancelled": True, "result": []},
                              {"id": 2, "result": [{"type": "choices", "value": {"choices": ["ring", "zebra"]}}]}]},
             {"id": 6, "data": {"clipsight_id": "b-2"}, "annotations": [],
              "predictions": [{"result": [{"type": "choices", "value": {"choices": ["red"]}}]}]},
             {"id": 7, "data": {"image": "s3://bucket/other.png"}, "annotations": [{"id": 3, "result": []}]},
             "junk"]
    reviews, problems = read_review(tasks, REFS, {}, config_labels(config))
    assert [(r.image, r.annotation, [d["word"] for d in r.labels]) for r in reviews] == [("a-1", "2", ["ring"])]
    assert problems == ["task 5 (a.png): label 'zebra' is not in the run's label config; left out",
                        "task 7: its image 's3://bucket/other.png' is not in this run; skipped",
                        "task 4: not a task (a JSON object); skipped"]
    assert read_review({"not": "a list"}, REFS, {})[0] == [] and "not a list" in read_review({}, REFS, {})[1][0]
