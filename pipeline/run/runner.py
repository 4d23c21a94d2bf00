"""Runs stages over a run directory: resume, per-image failures, progress, summaries, torchrun.

``run_stages`` is the one entry: it checks the run's config, shards the images under
torchrun, runs each stage's up-front checks (``prepare``) and makes every rank agree
on them, runs the per-image stages (skipping finished work unless forced, never
letting one bad image stop the run), merges the ranks' manifests, runs the whole-run
stages (rank, report) on rank 0, and returns a ``RunOutcome`` with the exit code.

What a stage is and sees (``StageContext``) is in ``pipeline.run.stage``; how its batches are sized,
in ``pipeline.run.batching``.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
import traceback
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipeline.run import clean
from pipeline.run.config import ConfigError, to_dict
from pipeline.run.distributed import DistInfo, agree, from_main, init_distributed, shutdown
from pipeline.run.images import ImageRef
from pipeline.model.load import LoadedModel, ModelError, load_model, resolve_device
from pipeline.run.provenance import Provenance
from pipeline.run.rundir import LOG, REPORT, RunDir
from pipeline.run.shards import shard_group
from pipeline.run.batching import BatchSizer
from pipeline.run.stage import (RERUN, Finish, ItemResult, Models, PerImageStage, RunSettings, StageContext,
                                WholeRunStage)


@dataclass
class StageSummary:
    stage: str
    done: int = 0
    failed: int = 0
    skipped: int = 0
    blocked: int = 0  # an earlier stage has no current output for the image
    seconds: float = 0.0
    redone: int = 0  # of done: images whose earlier output was stale
    model_seconds: float = 0.0  # in ``process``: the model's share of the stage
    input_wait_seconds: float = 0.0  # the model idle, waiting for a batch's inputs to be read
    output_wait_seconds: float = 0.0  # the model idle, waiting for the batch before to be written


@dataclass
class RunOutcome:
    """What a run did, for the caller to print: per-stage counts, failures, the leaderboard, the exit code."""

    run: RunDir
    summaries: list[StageSummary]
    failures: list[dict]  # the latest failed manifest record of each (image, stage)
    records: list[dict]  # the leaderboard's rows (records.csv), if rank has run
    report: str | None  # the report's path, if one exists
    exit_code: int  # 0 all succeeded, 1 some image failed
    dist: DistInfo = DistInfo()


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>9}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=quiet, transient=False,
    )


def run_per_image(stage: PerImageStage, ctx: StageContext, refs: list[ImageRef], force: bool,
                  console: Console, quiet: bool = False, on_done: Callable[[], None] | None = None) -> StageSummary:
    """Run ``stage`` on every image whose output is not done with today's settings, recording each outcome.

    An image whose inputs (the ``needs`` stages' outputs) are not done is recorded as blocked,
    with the reason. ``on_done`` is called after each batch that finished an image.
    """
    summary = StageSummary(stage.name)
    latest = ctx.run.latest()
    expected = ctx.provenance.expected[stage.name]
    todo, stale, blocked = [], set(), []
    for ref in refs:
        st = ctx.status(ref.id, stage.name, latest)
        if not force and st.state == "done":
            summary.skipped += 1
            continue
        why = ctx.provenance.blocked_by(ctx.run, latest, ref.id, ref.rel, stage.name)
        if why is not None:
            blocked.append({**_record(ctx, ref, stage.name, "blocked", why.reason), "cause": why.cause,
                            "advice": why.advice})
            continue
        if st.state == "stale":
            stale.add(ref.id)
            ctx.log.info("%s: redoing %s, %s", stage.name, ref.rel, st.reason)
        todo.append(ref)
    summary.blocked = len(blocked)
    ctx.run.append_manifest(blocked)
    start = time.time()

    def record(batch: list[ImageRef], results: list[ItemResult], seconds: float) -> None:
        per_image = seconds / len(batch)
        records = []
        for ref, res in zip(batch, results):
            if res.error:
                summary.failed += 1
                ctx.log.warning("%s failed for %s: %s", stage.name, ref.rel, res.error)
                records += [_record(ctx, ref, need, "damaged", why) for need, why in res.damaged.items()]
                records.append({**_record(ctx, ref, stage.name, "failed", res.error, per_image),
                                **({"advice": res.advice} if res.advice else {})})
            else:
                made_from = {n: (latest.get((ref.id, n)) or {}).get("rid") for n in stage.needs}
                try:
                    records.append(_record(ctx, ref, stage.name, "done", None, per_image, res.outputs, expected,
                                           made_from))
                except OSError as err:  # an output it named cannot be read back for its checksum
                    summary.failed += 1
                    records.append({**_record(ctx, ref, stage.name, "failed", f"{ref.rel}: an output could not be "
                                              f"read back: {err}", per_image), "advice": RERUN})
                    continue
                summary.done += 1
                summary.redone += ref.id in stale
        ctx.run.append_manifest(records)
        if on_done is not None and any(r["status"] == "done" for r in records):
            on_done()

    def failed(batch: list[ImageRef], what: str, err: Exception) -> list[ItemResult]:
        # a bug or resource failure in one batch must not end the run
        ctx.log.error("%s failed %s a batch of %d:\n%s", stage.name, what, len(batch),
                      "".join(traceback.format_exception(err)))
        return [ItemResult(error=f"{ref.rel}: {type(err).__name__}: {err}", advice=RERUN) for ref in batch]

    def load(batch: list[ImageRef]) -> tuple[Any, Exception | None, float]:
        t = time.time()
        try:
            return stage.load(ctx, batch), None, time.time() - t
        except Exception as err:
            return None, err, time.time() - t

    def finish(batch: list[ImageRef], done: Finish, seconds: float) -> tuple[list[ItemResult], float]:
        t = time.time()
        try:
            results = done()
        except Exception as err:
            results = failed(batch, "writing", err)
        return results, seconds + time.time() - t

    # One batch ahead is read and one behind is written while a batch is on the model: the model waits
    # only when reading or writing a batch takes longer than the model does.
    with _progress(console, quiet) as progress, ThreadPoolExecutor(2, thread_name_prefix=f"{stage.name}-io") as io:
        task = progress.add_task(stage.name, total=len(todo), rate="")
        recorded = 0
        writing: tuple[list[ImageRef], Future] | None = None

        def collect() -> None:
            nonlocal writing, recorded
            if writing is None:
                return
            batch, future = writing
            t = time.time()
            results, seconds = future.result()
            summary.output_wait_seconds += time.time() - t
            writing = None
            record(batch, results, seconds)
            recorded += len(batch)
            elapsed = time.time() - start
            progress.update(task, rate=f"{recorded / elapsed:.2f} img/s" if elapsed > 0 else "")

        def cut(i: int) -> list[ImageRef]:  # cut before the batch ahead runs; ``BatchSizer.run`` splits it if it backs off
            return todo[i : i + max(1, stage.batch_size(ctx))] if i < len(todo) else []  # no model loaded for none

        i, batch = 0, cut(0)
        reading = io.submit(load, batch) if batch else None
        try:
            while batch:
                t = time.time()
                loaded, err, seconds = reading.result()
                summary.input_wait_seconds += time.time() - t
                if isinstance(err, ModelError):  # the run's model, not this batch: the run stops as at start-up
                    raise err
                after = cut(i + len(batch))
                reading = io.submit(load, after) if after else None
                t = time.time()
                ctx.progress = _within(progress, task, i, len(batch))
                if err is not None:
                    done: Finish = functools.partial(failed, batch, "reading", err)
                else:
                    try:
                        done = stage.process(ctx, batch, loaded)
                    except ModelError:
                        raise
                    except Exception as err:
                        done = functools.partial(failed, batch, "on", err)
                took = time.time() - t
                summary.model_seconds += took
                progress.update(task, completed=i + len(batch))  # the bar counts what the model has done
                collect()
                writing = (batch, io.submit(finish, batch, done, seconds + took))
                i, batch = i + len(batch), after
        finally:  # on an interrupt too: the batch already on its way to disk is recorded
            collect()
    summary.seconds = time.time() - start
    return summary


def _within(progress: Progress, task: Any, done: int, size: int) -> Callable[[float], None]:
    """Moves the bar to ``done`` images plus the given fraction of a batch of ``size``, never backwards."""
    furthest = 0.0

    def update(fraction: float) -> None:
        nonlocal furthest
        furthest = max(furthest, min(1.0, fraction))
        progress.update(task, completed=done + furthest * size)

    return update


def _record(ctx: StageContext, ref: ImageRef, stage: str, status: str, error: str | None, seconds: float = 0.0,
            outputs: list[str] | None = None, provenance: str | None = None, upstream: dict | None = None) -> dict:
    """One manifest record. A done record names its outputs with each one's size and checksum (``sums``), the
    fingerprint it was made with, its own id (``rid``) and the ids of the upstream records it read (``upstream``)."""
    rec = {"image": ref.id, "path": ref.path, "stage": stage, "status": status, "error": error,
           "seconds": round(seconds, 4), "outputs": outputs or []}
    if status == "done":
        rec["sums"] = ctx.run.output_sums(rec["outputs"])
        rec["rid"] = uuid.uuid4().hex[:16]
        if upstream:
            rec["upstream"] = upstream
    if provenance is not None:
        rec["provenance"] = provenance
    if ctx.run.shard is not None:
        rec["rank"] = ctx.run.shard
    if ctx.session:
        rec["session"] = ctx.session
    return rec


def run_whole(stage: WholeRunStage, ctx: StageContext) -> StageSummary:
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
    sums = {}
    if not error:
        try:
            sums = {"sums": ctx.run.output_sums(outputs)}
        except OSError as err:  # an output gone already: the record says so instead
            outputs, error, summary.done, summary.failed = [], f"{type(err).__name__}: {err}", 0, 1
    ctx.run.append_manifest([{"image": None, "path": None, "stage": stage.name,
                              "status": "failed" if error else "done", "error": error,
                              "seconds": round(summary.seconds, 4), "outputs": outputs, **sums,
                              **({"session": ctx.session} if ctx.session else {})}])
    return summary


def run_logger(run: RunDir) -> logging.Logger:
    """The run's ``run.log``, one handler per run directory however often it is asked for."""
    log = logging.getLogger(f"clipsight.{run.root}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        run.root.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run.file(LOG), encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    return log


def _settings(config: Any) -> RunSettings:
    return RunSettings(model=config.model, seed=config.seed, max_side=config.max_side,
                       encode_batch_size=config.encode_batch_size, config=to_dict(config))


def run_stages(
    config: Any,
    run: RunDir,
    stages: Mapping[str, PerImageStage | WholeRunStage],
    names: list[str],
    result_keys: Mapping[str, tuple[str, ...]],
    *,
    images: list[ImageRef] | None = None,
    force: bool = False,
    quiet: bool = False,
    console: Console | None = None,
) -> RunOutcome:
    """Run the named stages over a run directory, under torchrun or in one process.

    Each image's output of a stage is redone when it is not done with today's settings
    (``pipeline.run.provenance``): changed settings of a stage redo that stage and, through the
    chained fingerprints, every stage after it, and nothing before it. ``run.yaml`` is written
    once a per-image stage has finished an image with this config. One process at a time holds
    the run directory's lock (rank 0 for all ranks under torchrun). A run that fails before
    producing anything leaves no directory behind if it made one.

    Args:
        config: the resolved run config (``stages.RunConfig``); each stage gets the section
            named like it, e.g. ``config.ascend``.
        run: the run directory.
        stages: every stage by name, in run order.
        names: the stages to run.
        result_keys: for each stage, the config keys that change its results.
        images: a new run's images (from ``--input``), saved as the run's image list; ``None``
            reruns stages of an existing run on its saved list.
        force: redo finished work.
        quiet: no progress bars.
        console: where progress goes.

    Returns:
        The outcome; ranks other than 0 return exit code 0 and no summaries, since their
        failures are in the manifest and rank 0's outcome covers the whole run.

    Raises:
        ConfigError, ModelError: a problem found before any image was processed (another
            process holds the run, a missing SAM checkpoint, model weights that cannot be loaded).
    """
    console = console or Console(stderr=True)
    info = init_distributed(config.device)
    created = info.is_main and not run.root.exists()
    try:
        with run.lock(info.is_main):
            if info.is_main:
                run.merge_manifest_shards()  # a killed distributed run may have left some
                if images is not None:
                    run.save_images(images)
            info.barrier()
            return _execute(config, run, stages, names, result_keys, force, quiet, console, info)
    except (ModelError, ConfigError):
        if created and not any(r["status"] == "done" for r in run.manifest_records()):
            shutil.rmtree(run.root, ignore_errors=True)  # a failed start leaves nothing behind
        raise
    finally:
        shutdown(info)


def _execute(config: Any, run: RunDir, stages: Mapping[str, PerImageStage | WholeRunStage], names: list[str],
             result_keys: Mapping[str, tuple[str, ...]], force: bool, quiet: bool, console: Console,
             info: DistInfo) -> RunOutcome:
    shard = RunDir(run.root, shard=info.rank) if info.enabled else run
    log = run_logger(run)

    def load() -> LoadedModel:
        device = info.device(resolve_device(config.device))
        cache = Path(config.model_cache).expanduser() if config.model_cache else None
        return load_model(config.model, device, config.precision, cache, config.seed)

    models = Models(load, shard, log)
    batches = BatchSizer(models, log)
    settings = _settings(config)
    provenance = Provenance(settings.config, result_keys, {n: s.needs for n, s in stages.items()})
    provenance.check_once()  # the lock is held: each output is checked on disk once, not once per stage that reads it

    session = from_main(info, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # one id for all ranks
    # as the last clean finish left it: no image has anything to do, and no manifest is held to find that out
    unchanged = None if force or info.enabled else clean.unchanged(run, settings.config, names, log)
    reads: dict[str, str] = {}

    def context(name: str, where: RunDir) -> StageContext:
        return StageContext(getattr(config, name), settings, where, log, models, batches, provenance, session=session,
                            force=force, reads=reads, unchanged=unchanged["reads"] if unchanged else None)

    saved = False

    def produced() -> None:  # results now exist that were made with this config: record it
        nonlocal saved
        if info.is_main and not saved:
            run.save_config(settings.config)
            provenance.record(run)
            saved = True

    refs = [] if unchanged else info.shard(run.load_images(), group=lambda ref: shard_group(ref.path))
    count = unchanged["images"] if unchanged else len(refs)
    log.info("run %s: %d images%s%s, stages %s", run.root, count, " (unchanged since its last clean finish)" if unchanged else "",
             f" (rank {info.rank} of {info.world_size})" if info.enabled else "", ",".join(names))
    error: Exception | None = None
    try:
        for name in names:  # fail before any work on what can be checked up front (e.g. a missing SAM checkpoint)
            stages[name].prepare(context(name, shard))
    except (ModelError, ConfigError) as err:
        error = err
    if not agree(info, error is None):
        if error is not None:
            log.error("%s", error)
            raise error
        raise ConfigError("another rank failed its start-up checks; its error is above and in run.log")
    quiet = quiet or not info.is_main
    summaries: list[StageSummary] = []
    try:
        for name in names:
            stage = stages[name]
            if unchanged and isinstance(stage, PerImageStage):
                summaries.append(StageSummary(name, skipped=count))
            elif isinstance(stage, PerImageStage):
                summaries.append(run_per_image(stage, context(name, shard), refs, force, console, quiet, produced))
        info.barrier()
        if not info.is_main:
            return RunOutcome(run, [], [], [], None, 0, info)
        run.merge_manifest_shards()
        if unchanged.get("produced") if unchanged else any(r.get("provenance") in provenance.expected.values()
                                                           for r in run.latest().values()):
            produced()  # another rank's results, or the clean finish's
        for name in names:
            stage = stages[name]
            if isinstance(stage, WholeRunStage):
                summaries.append(run_whole(stage, context(name, run)))
    except (ModelError, ConfigError) as err:
        log.error("%s", err)
        raise
    except KeyboardInterrupt:
        log.warning("interrupted: finished images are kept; rerun the same command to resume")
        raise
    failed = any(s.failed or s.blocked for s in summaries)
    kept = bool(unchanged) and not failed and not clean.appended_per_image(run, unchanged["key"]["manifest"][0])
    if kept:  # still as the clean finish left it
        failures = []
    else:
        latest = run.latest()
        failures = [r for r in latest.values() if r["status"] in ("failed", "blocked")]
    if not info.enabled:
        per_image = [n for n in names if isinstance(stages[n], PerImageStage)]
        if kept:
            clean.record_clean(run, settings.config, names, count, reads, saved, unchanged["lines"])
        elif not failed and not failures and clean.all_done(latest, (r.id for r in refs or run.load_images()), per_image):
            clean.record_clean(run, settings.config, names, count, reads, saved, clean.latest_lines(run, latest))
        else:
            clean.forget_clean(run)
    if info.enabled:  # rank 0 cannot see the other ranks' summaries: the merged manifest speaks for them
        code = 1 if failures else 0
    else:
        code = 1 if failed else 0
    report = run.file(REPORT)
    return RunOutcome(run, summaries, failures, run.records(), str(report) if report.is_file() else None, code, info)
