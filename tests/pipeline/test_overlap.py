"""The runner overlaps a stage's reading and writing with the model's work, and loses nothing doing so.

A stand-in stage records when each step of each batch runs. Where the runner should
overlap two steps, one of them waits (a short while) for the other to have started: a
runner that ran the steps one after another would let the wait time out, and the test
would see it.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from pipeline.run.images import discover_images
from pipeline.run.rundir import RunDir, atomic_write_text
from pipeline.run.runner import run_stages
from pipeline.run.stage import ItemResult, PerImageStage
from stages import RESULT_KEYS, RunConfig

WAIT = 3.0  # seconds a step waits for the step it should overlap


class Stand(PerImageStage):
    """Batches of two; ``process`` waits for the next batch's ``load``, ``Finish`` for the next ``process``."""

    name = "ascend"

    def __init__(self, batches: int, bad_load: str | None = None, bad_write: str | None = None,
                 interrupt_at: int | None = None):
        self.batches, self.bad_load, self.bad_write, self.interrupt_at = batches, bad_load, bad_write, interrupt_at
        self.loading = [threading.Event() for _ in range(batches)]
        self.processing = [threading.Event() for _ in range(batches)]
        self.overlapped: dict[str, list[bool]] = {"read": [], "write": []}
        self.threads: dict[str, set[str]] = {"load": set(), "process": set(), "finish": set()}

    def batch_size(self, ctx) -> int:
        return 2

    def _index(self, refs) -> int:
        return int(refs[0].rel.split(".")[0]) // 2

    def load(self, ctx, refs):
        k = self._index(refs)
        self.threads["load"].add(threading.current_thread().name)
        self.loading[k].set()
        if self.bad_load in [r.rel for r in refs]:
            raise OSError(f"cannot read {self.bad_load}")
        return [r.rel for r in refs]

    def process(self, ctx, refs, loaded):
        k = self._index(refs)
        self.threads["process"].add(threading.current_thread().name)
        self.processing[k].set()
        assert loaded == [r.rel for r in refs]  # what load read for this very batch
        if k == self.interrupt_at:
            raise KeyboardInterrupt
        if k + 1 < self.batches:
            self.overlapped["read"].append(self.loading[k + 1].wait(WAIT))

        def finish() -> list[ItemResult]:
            self.threads["finish"].add(threading.current_thread().name)
            if k + 1 < self.batches and k + 1 != self.interrupt_at:
                self.overlapped["write"].append(self.processing[k + 1].wait(WAIT))
            if self.bad_write in [r.rel for r in refs]:
                raise OSError(f"disk full writing {self.bad_write}")
            out = []
            for r in refs:
                path = ctx.run.opinion(r.id)
                atomic_write_text(path, f"{r.rel}\n")
                out.append(ItemResult(outputs=[ctx.run.rel(path)]))
            return out

        return finish


@pytest.fixture
def images(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(7):
        Image.fromarray(np.full((8, 8, 3), i * 30, np.uint8)).save(src / f"{i}.png")
    return discover_images(src)


def _run(tmp_path, images, stage):
    run = RunDir(tmp_path / "run")
    outcome = run_stages(RunConfig(model="toy", device="cpu"), run, {"ascend": stage}, ["ascend"], RESULT_KEYS,
                         images=images, quiet=True)
    return run, outcome


def _status(run) -> dict[str, str]:
    return {r["image"]: r["status"] for r in run.manifest_records() if r["stage"] == "ascend"}


def test_reading_and_writing_run_beside_the_model_and_every_image_is_recorded(tmp_path, images):
    stage = Stand(batches=4)
    run, outcome = _run(tmp_path, images, stage)
    assert stage.overlapped == {"read": [True] * 3, "write": [True] * 3}
    assert stage.threads["process"] == {threading.main_thread().name}
    assert threading.main_thread().name not in stage.threads["load"] | stage.threads["finish"]
    assert _status(run) == {ref.id: "done" for ref in images}
    for ref in images:
        assert run.opinion(ref.id).read_text() == f"{ref.rel}\n"
    (summary,) = outcome.summaries
    assert summary.done == 7 and summary.failed == 0
    assert summary.model_seconds > 0 and summary.input_wait_seconds >= 0 and summary.output_wait_seconds >= 0
    assert summary.model_seconds + summary.input_wait_seconds + summary.output_wait_seconds <= summary.seconds + 0.01


def test_a_batch_that_cannot_be_read_or_written_fails_alone(tmp_path, images):
    stage = Stand(batches=4, bad_load="2.png", bad_write="5.png")
    run, outcome = _run(tmp_path, images, stage)
    ids = {ref.rel: ref.id for ref in images}
    status = _status(run)
    failed = {rel for rel, i in ids.items() if status[i] == "failed"}
    assert failed == {"2.png", "3.png", "4.png", "5.png"}  # batches 1 and 2; 0 and 3 are done
    errors = {r["image"]: r["error"] for r in run.manifest_records() if r["status"] == "failed"}
    assert "cannot read 2.png" in errors[ids["3.png"]] and "disk full writing 5.png" in errors[ids["4.png"]]
    assert outcome.exit_code == 1


def test_an_interrupt_keeps_the_batch_already_on_its_way_to_disk(tmp_path, images):
    stage = Stand(batches=4, interrupt_at=1)
    run = RunDir(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run_stages(RunConfig(model="toy", device="cpu"), run, {"ascend": stage}, ["ascend"], RESULT_KEYS,
                   images=images, quiet=True)
    assert _status(run) == {images[0].id: "done", images[1].id: "done"}  # batch 0 was computed: it is kept


def test_a_model_that_cannot_load_stops_the_run_instead_of_failing_every_batch(tmp_path, images):
    from pipeline.model.load import ModelError

    class NoModel(Stand):
        def load(self, ctx, refs):
            raise ModelError("no weights for 'toy' here")

    run = RunDir(tmp_path / "run")
    with pytest.raises(ModelError, match="no weights"):
        run_stages(RunConfig(model="toy", device="cpu"), run, {"ascend": NoModel(batches=4)}, ["ascend"], RESULT_KEYS,
                   images=images, quiet=True)
    assert not run.root.exists()  # a failed start leaves nothing behind
