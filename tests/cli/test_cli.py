import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.model.load import TOY_CHECKPOINT
from pipeline.toy.world import write_scenes
from runall import app
from stages.report import load_report
from tests.conftest import fast_args

FAST = fast_args()


def _run(*args):
    return CliRunner().invoke(app, [*args], catch_exceptions=False)


def _manifest(run):
    return [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]


def test_full_run_writes_documented_files_and_resumes(tmp_path, images, monkeypatch):
    out = tmp_path / "out"
    r = _run("--input", str(images), "--model", "random:tiny", "--output", str(out), "--run-name", "r", "--quiet", *FAST)
    assert r.exit_code == 0, r.output
    run = out / "r"
    for name in ["run.yaml", "manifest.jsonl", "images.jsonl", "run.log", "records.csv", "records.md",
                 "longest_clip_word_records.txt", "images.csv", "report.html"]:
        assert (run / name).is_file(), name
    recs = _manifest(run)
    ids = [json.loads(x)["id"] for x in (run / "images.jsonl").read_text().splitlines()]
    for stage in ("ascend", "decode", "surgery"):
        assert sorted(x["image"] for x in recs if x["stage"] == stage) == sorted(ids)
    mapped = 0
    for i in ids:
        assert (run / "ascend" / f"{i}.json").is_file() and (run / "ascend" / f"{i}.csv").is_file()
        opinion = json.loads((run / "ascend" / f"{i}.json").read_text())
        cands = opinion["candidates"]  # the whole image's 4, and 3 for each of its 1 to 4 regions (discover: regions)
        kinds = [v["kind"] for v in opinion["views"]]
        assert kinds[0] == "image" and 1 <= len(kinds) - 1 <= 4 and set(kinds[1:]) == {"region"}
        assert len(cands) == 4 + 3 * (len(kinds) - 1) and all(-1 <= c["rescored"] <= 1 and len(c["ids"]) == 5 for c in cands)
        assert sorted({c["view"] for c in cands}) == list(range(len(kinds)))
        lab = json.loads((run / "labels" / f"{i}.json").read_text())
        assert set(lab) >= {"labels", "prompts"} and all({"word", "frequency", "score"} <= set(d) for d in lab["labels"])
        _check_surgery_outputs(run, i, [d["word"] for d in lab["labels"]])
        mapped += len(lab["labels"])
    assert mapped > 0  # the surgery checks above saw real labels
    header = (run / "records.csv").read_text().splitlines()[0].split(",")
    assert {"word", "length", "pieces", "images", "score", "unusualness"} <= set(header)
    assert all(x["status"] == "done" and "seconds" in x and "path" in x for x in recs)

    n = len(recs)
    made = {name: (run / name).stat().st_mtime_ns for name in ("records.csv", "images.csv", "report.html")}
    listed = (run / "images.jsonl").stat().st_ino

    def no_model(*args, **kwargs):
        raise AssertionError("a rerun with nothing to do loaded the model")

    with monkeypatch.context() as m:
        m.setattr("pipeline.run.runner.load_model", no_model)
        r = _run("--input", str(images), "--model", "random:tiny", "--output", str(out), "--run-name", "r", "--quiet",
                 *FAST)
    assert r.exit_code == 0
    assert (run / "images.jsonl").stat().st_ino == listed  # the same image list is not written again
    new = _manifest(run)[n:]
    assert {x["stage"] for x in new} == {"rank", "export", "report"}  # per-image work was skipped
    assert {name: (run / name).stat().st_mtime_ns for name in made} == made  # and rank and report: nothing changed
    log = (run / "run.log").read_text()
    assert "rank: up to date" in log and "report: up to date" in log
    r = _run("--input", str(images), "--model", "random:tiny", "--output", str(out), "--run-name", "r", "--quiet", *FAST,
             "--set", "rank.min_length=2")
    assert r.exit_code == 0
    remade = {name: (run / name).stat().st_mtime_ns for name in made}
    assert all(remade[name] != made[name] for name in made)  # a rank setting changed: rank, then the report, again

    r = _run("decode", "--run", str(run), "--force", "--quiet")
    assert r.exit_code == 0
    assert sum(x["stage"] == "decode" for x in _manifest(run)) == 2 * len(ids)


def _check_surgery_outputs(run, image_id, words):
    meta = json.loads((run / "surgery" / f"{image_id}.json").read_text())
    assert [d["word"] for d in meta["labels"]] == words
    with np.load(run / "surgery" / f"{image_id}.npz") as npz:
        assert set(npz.files) == {"image_size"} | {f"{m}/{w}" for m in ("raw", "surgery", "single") for w in words}
        assert tuple(npz["image_size"]) == (64, 64)
        for w in words:
            assert npz[f"raw/{w}"].shape == (4, 4) and npz[f"single/{w}"].shape == (8, 8)  # grid resolution
            assert npz[f"raw/{w}"].dtype == np.float16 and 0 <= npz[f"raw/{w}"].min() <= npz[f"raw/{w}"].max() <= 1
    for d in meta["labels"]:
        assert set(d["overlays"]) == {"raw", "surgery", "single"}
        for rel in d["overlays"].values():
            path = run / rel
            assert path.is_file() and path.parent == run / "surgery" / image_id
            assert path.name == f"{image_id}__{d['slug']}__{rel.rsplit('__', 1)[1]}"
            assert Image.open(path).size == (64, 64)
        assert len(d["points"]) == len(d["point_labels"]) and len(d["points"]) % 2 == 0
    assert (run / meta["sheet"]).is_file()


def test_bad_image_is_recorded_and_the_run_goes_on(tmp_path, images):
    (images / "broken.png").write_bytes(b"not a png")
    (images / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    r = _run("--input", str(images), "--model", "random:tiny", "--output", str(out), "--run-name", "r", "--quiet", *FAST)
    assert r.exit_code == 1
    recs = _manifest(out / "r")
    failed = {x["path"].split("/")[-1]: x["error"] for x in recs if x["status"] == "failed"}
    assert set(failed) == {"broken.png", "empty.jpg"}
    assert "not an image" in failed["broken.png"] and "empty" in failed["empty.jpg"]
    assert sum(x["status"] == "done" and x["stage"] == "decode" for x in recs) == 3
    assert "broken.png" in (out / "r" / "report.html").read_text()


def test_a_decoder_plugin_that_raises_fails_only_its_own_image(tmp_path, images, monkeypatch):
    """Some libraries patch ``Image.open`` (one retries an unknown file through an optional plugin and raises
    ``ModuleNotFoundError`` when it is missing): the bad file still fails alone, not its batch or the report."""
    import PIL.Image

    real = PIL.Image.open

    def plugin_open(fp, *args, **kwargs):
        try:
            return real(fp, *args, **kwargs)
        except PIL.Image.UnidentifiedImageError:
            raise ModuleNotFoundError("No module named 'some_plugin'") from None

    monkeypatch.setattr(PIL.Image, "open", plugin_open)
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    r = _run("--input", str(images), "--model", "random:tiny", "--output", str(out), "--run-name", "r", "--quiet", *FAST,
             "--set", "ascend.batch_size=4")
    assert r.exit_code == 1
    recs = _manifest(out / "r")
    failed = {x["path"].split("/")[-1]: x["error"] for x in recs if x["status"] == "failed"}
    assert set(failed) == {"broken.png"} and "some_plugin" in failed["broken.png"]
    assert sum(x["status"] == "done" and x["stage"] == "surgery" for x in recs) == 3
    assert "broken.png" in (out / "r" / "report.html").read_text()


def test_usage_errors_exit_2(tmp_path, images):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ascend:\n  nope: 1\n")
    r = _run("--input", str(images), "--config", str(bad), "--output", str(tmp_path))
    assert r.exit_code == 2 and "nope" in r.output
    r = _run("--input", str(images), "--stages", "ascend,paint", "--output", str(tmp_path))
    assert r.exit_code == 2 and "paint" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run("--input", str(empty), "--output", str(tmp_path))
    assert r.exit_code == 2 and "no images found" in r.output
    r = _run("--input", str(tmp_path / "missing"), "--output", str(tmp_path))
    assert r.exit_code == 2 and "input not found" in r.output


def test_models_and_toy_scenes_commands(tmp_path):
    r = _run("models", "--cache", str(tmp_path))
    assert r.exit_code == 0 and "ViT-B/16" in r.output and "toy" in r.output and "not cached" in r.output
    r = _run("toy", "scenes", "--out", str(tmp_path / "s"), "--count", "2")
    assert r.exit_code == 0 and len(list((tmp_path / "s").glob("*.png"))) == 2


def test_toy_train_writes_a_checkpoint_stock_clip_loads(tmp_path):
    import torch
    from clip.model import build_model

    from pipeline.toy.train import RECIPES

    out = tmp_path / "t.pt"
    r = _run("toy", "train", "--out", str(out), "--steps", "2", "--batch-size", "8", "--device", "cpu")
    assert r.exit_code == 0, r.output
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["recipe"]["name"] == "fine-cpu"  # auto picks the CPU recipe without CUDA
    assert card["recipe"]["lr"] == RECIPES["fine-cpu"].lr and card["recipe"]["steps"] == 2 and card["recipe"]["batch_size"] == 8
    assert card["device"].startswith("cpu") and set(card["history"][-1]) >= {"joint36", "colour", "shape"}
    state = torch.load(out)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    model = build_model(state)
    assert model.visual.input_resolution == 64 and model.visual.conv1.kernel_size == (4, 4)  # a 16x16 grid
    r = _run("toy", "train", "--out", str(out), "--steps", "1", "--batch-size", "4", "--recipe", "gpu", "--device", "cpu")
    assert r.exit_code == 0 and json.loads(out.with_suffix(".json").read_text())["recipe"]["lr"] == RECIPES["gpu"].lr
    r = _run("toy", "train", "--out", str(tmp_path / "m.pt"), "--steps", "1", "--batch-size", "4", "--recipe", "mixed-cpu",
             "--start-from", str(TOY_CHECKPOINT), "--lr", "0.001", "--class-weight", "4", "--train-text", "--device", "cpu")
    assert r.exit_code == 0, r.output
    recipe = json.loads((tmp_path / "m.json").read_text())["recipe"]
    assert (recipe["lr"], recipe["class_weight"], recipe["freeze_text"]) == (0.001, 4.0, False)  # the recipe's are 3e-4, 1, frozen
    r = _run("toy", "train", "--out", str(out), "--steps", "2", "--recipe", "cpu", "--resume", "--device", "cpu")
    assert r.exit_code == 2 and "another recipe" in r.output  # the checkpoint beside --out is the gpu recipe's
    assert _run("toy", "train", "--out", str(out), "--recipe", "laptop").exit_code == 2


def test_doctor_explains_the_environment(tmp_path):
    fake = tmp_path / "cache"
    fake.mkdir()
    (fake / "ViT-B-16.pt").write_bytes(b"x")
    r = _run("doctor", "--cache", str(fake), "--output", str(tmp_path))
    assert r.exit_code == 0, r.output
    for check in ("python", "torch", "CUDA", "openai-clip", "weights cache", "toy model", "free disk", "extra: sam"):
        assert check in r.output
    assert "ViT-B/16" in r.output  # the cached checkpoint is found


@pytest.mark.parametrize("cmd, options, words", [
    ("ascend", ["--run", "--run-dir", "--set", "--force"], "only the ascend stage"),
    ("decode", ["--run", "--config", "--model"], "only the decode stage"),
    ("surgery", ["--run", "--device", "--quiet"], "only the surgery stage"),
    ("report", ["--run", "--set"], "only the report stage"),
    ("rank", ["--run", "--runs", "--out"], "merge several"),
    ("models", ["--cache"], "cache"),
    ("doctor", ["--cache", "--output"], "environment"),
    ("toy", ["scenes", "train"], "toy world"),
])
def test_every_command_has_help(cmd, options, words):
    r = _run(cmd, "--help")
    assert r.exit_code == 0 and f" {cmd} [OPTIONS]" in r.output
    text = " ".join(r.output.split())  # help text is wrapped to the terminal
    assert words in text and all(o in r.output for o in options), r.output
    assert cmd in {"rank", "models", "doctor", "toy"} or "--runs" not in r.output  # a stage lists only its own options


def test_images_without_labels_still_finish_surgery(tmp_path, images):
    out = tmp_path / "out"
    r = _run("--input", str(images), "--model", "random:tiny", "--output", str(out), "--run-name", "r", "--quiet",
             *FAST, "--set", "decode.min_frequency=1000", "--set", "decode.min_share=1000")
    assert r.exit_code == 0, r.output
    for meta in (out / "r" / "surgery").glob("*.json"):
        doc = json.loads(meta.read_text())
        assert doc["labels"] == [] and (out / "r" / doc["sheet"]).is_file()
    assert len(list((out / "r" / "surgery").glob("*.npz"))) == 3


def test_rank_merges_runs(tmp_path, images):
    out = tmp_path / "out"
    for name in ("a", "b"):  # the same images and seed: identical opinions in both runs
        r = _run("--input", str(images), "--model", "random:tiny", "--output", str(out), "--run-name", name, "--quiet",
                 "--stages", "ascend,decode,rank", *FAST)
        assert r.exit_code == 0, r.output
    r = _run("rank", "--runs", str(out / "a"), str(out / "b"), "--out", str(out / "m"))
    assert r.exit_code == 0, r.output
    assert "most unusual words" in r.output

    def read(path):
        import csv
        with open(path, encoding="utf-8") as f:
            return {row["word"]: row for row in csv.DictReader(f)}

    single, merged = read(out / "a" / "records.csv"), read(out / "m" / "records.csv")
    assert single and set(merged) == set(single)
    for word, row in merged.items():
        assert int(row["images"]) == 2 * int(single[word]["images"])
        assert row["best_image"].split("/")[0] in ("a", "b")
    assert (out / "m" / "records.md").is_file() and (out / "m" / "longest_clip_word_records.txt").is_file()
    data = load_report(out / "m" / "leaderboard.html")  # the merged leaderboard gets the report's page
    assert [row["word"] for row in data["records"]] == list(merged)[: len(data["records"])] and data["total"] == 0
    assert "leaderboard.html" in r.stdout
    assert _run("rank", "--runs", "--out", str(out / "m")).exit_code == 2
    assert _run("rank", "--runs", str(tmp_path)).exit_code == 2


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    write_scenes(root / "imgs", 0, 2)
    (root / "imgs" / "truth.json").unlink()
    r = _run("--input", str(root / "imgs"), "--model", "random:tiny", "--output", str(root / "out"), "--run-name", "r",
             "--quiet", *FAST)
    assert r.exit_code == 0, r.output
    return root / "out" / "r"


@pytest.mark.parametrize("stage, files", [
    ("ascend", ["ascend/{id}.json", "ascend/{id}.csv"]),
    ("decode", ["labels/{id}.json"]),
    ("surgery", ["surgery/{id}.json", "surgery/{id}.npz", "surgery/{id}__sheet.png"]),
    ("rank", ["records.csv", "records.md", "longest_clip_word_records.txt", "images.csv"]),
    ("report", ["report.html"]),
])
def test_every_stage_command_reruns_its_stage_in_process(small_run, stage, files):
    ids = [json.loads(x)["id"] for x in (small_run / "images.jsonl").read_text().splitlines()]
    paths = [small_run / f.format(id=i) for f in files for i in (ids if "{id}" in f else [None])]
    for p in paths:
        p.unlink()
    before = len(_manifest(small_run))
    args = [stage, "--run", str(small_run), "--quiet"] + (["--force"] if stage != "rank" else [])
    r = _run(*args)
    assert r.exit_code == 0, r.output
    assert all(p.is_file() for p in paths), [str(p) for p in paths if not p.is_file()]
    new = _manifest(small_run)[before:]
    assert {x["stage"] for x in new} == {stage} and all(x["status"] == "done" for x in new)
    assert len(new) == (len(ids) if stage in ("ascend", "decode", "surgery") else 1)


def test_every_heatmap_method_through_the_cli(tmp_path, images):
    from pipeline.heatmaps import names

    from pipeline.model.load import TOY_CHECKPOINT

    methods = list(names())
    arch = json.loads(TOY_CHECKPOINT.with_suffix(".json").read_text())["arch"]
    cells = arch["image_resolution"] // arch["vision_patch_size"]
    out = tmp_path / "out"
    r = _run("--input", str(images), "--model", "toy", "--output", str(out), "--run-name", "r", "--quiet", *FAST,
             "--set", f"surgery.methods=[{','.join(methods)}]", "--set", "surgery.surgery_depth=2")
    assert r.exit_code == 0, r.output
    run = out / "r"
    for meta_path in (run / "surgery").glob("*.json"):
        meta = json.loads(meta_path.read_text())
        words = [d["word"] for d in meta["labels"]]
        assert meta["methods"] == methods and words
        with np.load(run / "surgery" / f"{meta['image']}.npz") as npz:
            assert set(npz.files) == {"image_size"} | {f"{m}/{w}" for m in methods for w in words}
            for m in methods:
                grid = npz[f"{m}/{words[0]}"]
                assert grid.shape == (cells, cells) and 0 <= grid.min() <= grid.max() <= 1, m  # the toy's grid, at 64 px
        assert all(set(d["overlays"]) == set(methods) and all((run / p).is_file() for p in d["overlays"].values())
                   for d in meta["labels"])
    assert '"methods": ["raw", "surgery", "single", "maskclip"' in (run / "report.html").read_text()


def test_a_vit_only_method_on_a_resnet_is_a_config_error(tmp_path, images):
    r = _run("--input", str(images), "--model", "random:tiny-rn", "--output", str(tmp_path / "out"), "--quiet", *FAST,
             "--set", "surgery.methods=[raw,naclip]")
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "'naclip' has no ResNet form" in said and "random:tiny-rn" in said, said


@pytest.mark.parametrize("model, methods", [("random:openclip:ViT-S-32", None), ("random:openclip:RN50", ("raw", "surgery", "maskclip"))])
def test_whole_pipeline_on_openclip_models(tmp_path, images, model, methods):
    """An OpenCLIP model runs every stage from the CLI; a ViT writes every method's maps, a ResNet its three."""
    pytest.importorskip("open_clip")
    from pipeline.heatmaps import names

    methods = list(methods or names())
    out = tmp_path / "out"
    # two candidates of two tokens: few words, as the 85-template text features of each cost a 12-block text tower
    r = _run("--input", str(images), "--model", model, "--output", str(out), "--run-name", "r", "--quiet",
             *fast_args(ascend__candidates=2, ascend__tokens=2), "--set", f"surgery.methods=[{','.join(methods)}]",
             "--set", "surgery.overlays=false")
    assert r.exit_code == 0, r.output
    run = out / "r"
    metas = [json.loads(p.read_text()) for p in (run / "surgery").glob("*.json")]
    assert len(metas) == 3 and all(m["labels"] for m in metas), "a random model's ascent still yields words"
    for meta in metas:
        words = [d["word"] for d in meta["labels"]]
        with np.load(run / "surgery" / f"{meta['image']}.npz") as npz:
            assert set(npz.files) == {"image_size"} | {f"{m}/{w}" for m in methods for w in words}
            # 224 px in 32 px patches, or the ResNet's stride of 32: a 7x7 grid either way; single-text at 64 px
            assert all(npz[f"{m}/{words[0]}"].shape == ((2, 2) if m == "single" else (7, 7)) for m in methods)
    assert (run / "report.html").is_file() and (run / "records.csv").is_file()
    assert f"model: {model}" in (run / "run.yaml").read_text()


def test_openclip_names_offline_and_refused_exit_2_with_the_reason(tmp_path, images, monkeypatch):
    """An uncached pretrained OpenCLIP name offline stops within seconds, naming the file and the cache; a SigLIP or
    CoCa name is refused with its reason; neither leaves a run directory behind."""
    pytest.importorskip("open_clip")
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    t = time.time()
    r = _run("--input", str(images), "--model", "openclip:ViT-B-32/laion2b_s34b_b79k", "--output", str(out),
             "--quiet", "--set", f"model_cache={tmp_path / 'cache'}")
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and time.time() - t < 30, said
    assert "open_clip_pytorch_model.bin" in said and str(tmp_path / "cache") in said, said
    for name, reason in (("openclip:ViT-B-16-SigLIP/webli", "SigLIP: last-token text pooling"),
                         ("openclip:coca_ViT-B-32/laion2b_s13b_b90k", "CoCa: a captioning model")):
        r = _run("--input", str(images), "--model", name, "--output", str(out), "--quiet")
        said = " ".join(r.output.split())
        assert r.exit_code == 2 and "refused" in said and reason in said, said
    assert not (out / "imgs").exists()
