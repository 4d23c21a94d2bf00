"""Runs stages over a run directory: resume, per-image failures, progress, summaries.

A per-image stage processes batches of images and returns one ``ItemResult`` per
image; a whole-run stage (rank, report) runs once over everything. The runner
records each outcome in the manifest, skips finished work unless forced, and never
lets one bad image stop the run.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipeline.images import ImageRef
from pipeline.models import LoadedModel
from pipeline.prompts import TextFeatureStore
from pipeline.rundir import RunDir


@dataclass
class ItemResult:
    """What a stage did for one image: the files it wrote (relative to the run), or why it failed."""

    outputs: list[str] = field(default_factory=list)
    error: str | None = None


class PerImageStage(Protocol):
    name: str
    needs: tuple[str, ...]

    def batch_size(self, ctx: "RunContext") -> int: ...

    def process(self, ctx: "RunContext", refs: list[ImageRef]) -> list[ItemResult]: ...


class WholeRunStage(Protocol):
    name: str

    def run_all(self, ctx: "RunContext") -> list[str]: ...


@dataclass
class StageSummary:
    stage: str
    done: int = 0
    failed: int = 0
    skipped: int = 0
    blocked: int = 0  # an earlier stage has no output for the image
    seconds: float = 0.0


class RunContext:
    """What every stage gets: the config, the run directory, the device, the model (loaded once, lazily)."""

    def __init__(self, config: Any, run: RunDir, log: logging.Logger, load: Callable[[], LoadedModel],
                 console: Console, quiet: bool = False):
        self.config = config
        self.run = run
        self.log = log
        self.console = console
        self.quiet = quiet
        self._load = load
        self._model: LoadedModel | None = None
        self._text: TextFeatureStore | None = None
        self.cache: dict[str, Any] = {}  # shared across stages in one process

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            t = time.time()
            self._model = self._load()
            self.log.info("loaded model %s on %s (%s) in %.1fs", self._model.name, self._model.device,
                          self._model.dtype, time.time() - t)
        return self._model

    @property
    def text_features(self) -> TextFeatureStore:
        """Prompt-ensemble features per word, shared by the stages and kept on disk in the run's ``cache/``."""
        if self._text is None:
            self._text = TextFeatureStore(self.model.model, self.run.file("cache", "text"))
            if self._text.loaded_from_disk:
                self.log.info("loaded %d cached text features", self._text.loaded_from_disk)
        return self._text


def batch_size_for(ctx: RunContext, stage: str, configured: int, cuda: int, cpu: int,
                   bytes_per_image: int | None = None) -> int:
    """A stage's batch size: the size an out-of-memory back-off settled on, else the configured one,
    else a default for the device (``configured == 0`` means automatic).

    On CUDA the automatic size is also capped by ``fit_batch`` when the stage can estimate its
    memory per image, so a small GPU starts at a size that fits instead of at an out-of-memory.
    """
    fixed = ctx.cache.get(f"{stage}_batch") or configured
    if fixed:
        return fixed
    dev = ctx.model.device
    if dev.type != "cuda":
        return cpu
    if bytes_per_image:
        free, _total = torch.cuda.mem_get_info(dev)
        free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)  # the last batch's cached blocks are free to reuse
        return fit_batch(free, bytes_per_image, cuda)
    return cuda


def fit_batch(free_bytes: int, bytes_per_image: int, cap: int, share: float = 0.5) -> int:
    """The largest batch, at most ``cap``, whose estimated memory fits in ``share`` of the free memory.

    The rest of the free memory is left for what the estimate leaves out (activations,
    the allocator's slack); the out-of-memory back-off still guards the estimate.
    """
    return max(1, min(cap, int(free_bytes * share) // max(1, bytes_per_image)))


def remember_batch_size(ctx: RunContext, stage: str) -> Callable[[int], None]:
    """The ``on_split`` for ``split_on_oom``: later batches of ``stage`` use the size that fitted."""
    def remember(size: int) -> None:
        ctx.cache[f"{stage}_batch"] = size
        ctx.log.warning("%s: CUDA out of memory; retrying with batches of %d", stage, size)

    return remember


def split_on_oom(fn: Callable[[int, int], list], start: int, end: int,
                 on_split: Callable[[int], None] | None = None) -> list:
    """``fn(start, end)`` over a batch's index range; on CUDA out-of-memory, halve the range and retry.

    ``fn`` returns one result per index. ``on_split`` is told the smaller size, so a
    stage can use it for later batches. A single item that does not fit re-raises.
    """
    try:
        return fn(start, end)
    except torch.OutOfMemoryError:
        if end - start <= 1:
            raise
        torch.cuda.empty_cache()
        mid = (start + end) // 2
        if on_split is not None:
            on_split(mid - start)
        return split_on_oom(fn, start, mid, on_split) + split_on_oom(fn, mid, end, on_split)


def _progress(ctx: RunContext) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>9}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=ctx.console, disable=ctx.quiet, transient=False,
    )


def run_per_image(stage: PerImageStage, ctx: RunContext, refs: list[ImageRef], force: bool) -> StageSummary:
    """Run ``stage`` on every image that needs it, recording each outcome in the manifest."""
    summary = StageSummary(stage.name)
    latest = ctx.run.latest()
    todo = []
    for ref in refs:
        if not force and ctx.run.is_done(latest.get((ref.id, stage.name))):
            summary.skipped += 1
        elif not all(ctx.run.is_done(latest.get((ref.id, need))) for need in stage.needs):
            summary.blocked += 1
        else:
            todo.append(ref)
    if summary.blocked:
        ctx.log.info("%s: %d images have no output from %s", stage.name, summary.blocked, "/".join(stage.needs))
    start = time.time()
    with _progress(ctx) as progress:
        task = progress.add_task(stage.name, total=len(todo), rate="")
        i = 0
        while i < len(todo):
            batch = todo[i : i + max(1, stage.batch_size(ctx))]
            t = time.time()
            try:
                results = stage.process(ctx, batch)
            except Exception as err:  # a bug or resource failure in one batch must not end the run
                ctx.log.error("%s failed on a batch of %d:\n%s", stage.name, len(batch), traceback.format_exc())
                results = [ItemResult(error=f"{type(err).__name__}: {err}") for _ in batch]
            per_image = (time.time() - t) / len(batch)
            records = []
            for ref, res in zip(batch, results):
                rec = {"image": ref.id, "path": ref.path, "stage": stage.name,
                       "status": "failed" if res.error else "done", "error": res.error,
                       "seconds": round(per_image, 4), "outputs": res.outputs}
                if ctx.run.shard is not None:
                    rec["rank"] = ctx.run.shard
                records.append(rec)
                if res.error:
                    summary.failed += 1
                    ctx.log.warning("%s failed for %s: %s", stage.name, ref.rel, res.error)
                else:
                    summary.done += 1
            ctx.run.append_manifest(records)
            i += len(batch)
            elapsed = time.time() - start
            progress.update(task, advance=len(batch), rate=f"{i / elapsed:.2f} img/s" if elapsed > 0 else "")
    summary.seconds = time.time() - start
    return summary


def run_whole(stage: WholeRunStage, ctx: RunContext) -> StageSummary:
    """Run a whole-run stage once; its record has ``image: null``."""
    summary = StageSummary(stage.name)
    t = time.time()
    try:
        outputs, error = stage.run_all(ctx), None
        summary.done = 1
    except Exception as err:
        ctx.log.error("%s failed:\n%s", stage.name, traceback.format_exc())
        outputs, error = [], f"{type(err).__name__}: {err}"
        summary.failed = 1
    summary.seconds = time.time() - t
    ctx.run.append_manifest([{"image": None, "path": None, "stage": stage.name,
                              "status": "failed" if error else "done", "error": error,
                              "seconds": round(summary.seconds, 4), "outputs": outputs}])
    return summary
