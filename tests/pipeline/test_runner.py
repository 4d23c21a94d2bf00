"""The runner's CUDA out-of-memory back-off, simulated on the CPU."""

import pytest
import torch

from pipeline.run.batching import split_on_oom


def test_batches_halve_on_out_of_memory_and_keep_order():
    fitted, sizes, ooms = [], [], []

    def fn(a, b):
        if b - a > 2:
            ooms.append((a, b))
            raise torch.OutOfMemoryError("simulated")
        fitted.append((a, b))
        return [i * 10 for i in range(a, b)]

    assert split_on_oom(fn, 0, 7, sizes.append) == [i * 10 for i in range(7)]  # every item once, in order
    assert [i for a, b in fitted for i in range(a, b)] == list(range(7)) and all(b - a <= 2 for a, b in fitted)
    assert sizes == [4, 2]  # the stage is told each smaller size
    assert ooms == [(0, 7), (0, 4)]  # the rest of the range runs at the size that fitted, without failing first


def test_a_failed_attempts_tensors_are_freed_before_the_halves_run():
    import weakref

    held: list[weakref.ref] = []
    alive_at_retry = []

    def fn(a, b):
        alive_at_retry.extend(r() is not None for r in held)
        if b - a > 2:
            work = torch.zeros(1000)  # what the attempt had allocated when memory ran out
            held.append(weakref.ref(work))
            raise torch.OutOfMemoryError("simulated")
        return list(range(a, b))

    assert split_on_oom(fn, 0, 4) == [0, 1, 2, 3]
    assert held and alive_at_retry and not any(alive_at_retry)  # the traceback no longer holds them


def test_one_image_that_does_not_fit_is_re_raised():
    def fn(a, b):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(torch.OutOfMemoryError):
        split_on_oom(fn, 0, 4)


def test_batch_size_keeps_what_fitted_after_a_back_off():
    import logging
    from types import SimpleNamespace

    from pipeline.run.batching import BatchSizer

    sizer = BatchSizer(SimpleNamespace(clip=SimpleNamespace(device=torch.device("cpu"))), logging.getLogger("t"))
    assert sizer.size("ascend", 0, cuda=64, cpu=4) == 4
    assert sizer.size("ascend", 16, cuda=64, cpu=4) == 16
    sizer.on_split("ascend")(8)
    assert sizer.size("ascend", 16, cuda=64, cpu=4) == 8  # even a configured size gives way
    assert sizer.size("surgery", 0, cuda=32, cpu=8) == 8  # per stage


def test_a_batch_cut_before_the_back_off_runs_at_the_settled_size_without_failing_again():
    import logging
    from types import SimpleNamespace

    from pipeline.run.batching import BatchSizer

    sizer = BatchSizer(SimpleNamespace(clip=SimpleNamespace(device=torch.device("cuda", 0))), logging.getLogger("t"))
    calls, ooms = [], []

    def fn(a, b):
        calls.append((a, b))
        if b - a > 3:
            ooms.append((a, b))
            raise torch.OutOfMemoryError("simulated")
        return [i * 10 for i in range(a, b)]

    assert sizer.run("surgery", fn, 8) == [i * 10 for i in range(8)]  # 8 fails, then 4, then 2 fits
    assert ooms == [(0, 8), (0, 4)] and sizer.settled == {"surgery": 2}  # (4, 8) runs at 2 at once
    calls.clear(), ooms.clear()
    assert sizer.run("surgery", fn, 7) == [i * 10 for i in range(7)]  # the next batch, cut at the old size
    assert ooms == [] and calls == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert sizer.run("ascend", fn, 3) == [0, 10, 20] and calls[-1] == (0, 3)  # per stage


def test_automatic_cuda_batch_fits_the_free_memory(monkeypatch):
    import logging
    from types import SimpleNamespace

    from pipeline.run.batching import BatchSizer, fit_batch
    from stages.ascend import AscentConfig, ascent_bytes_per_image

    assert fit_batch(10_000, 100, cap=64) == 50  # half of the free memory
    assert fit_batch(10**12, 100, cap=64) == 64
    assert fit_batch(50, 100, cap=64) == 1  # one image is always tried; the back-off handles the rest

    from pipeline.model.tokens import vocab

    size = vocab().size
    # the whole image's 16 candidates, and with regions (the default) 3 more for each of up to 4 regions
    assert ascent_bytes_per_image(AscentConfig(), size) == 7 * (16 + 4 * 3) * 5 * size * 4
    assert ascent_bytes_per_image(AscentConfig(discover="tiles", tiles=3), size) == 7 * (16 + 9 * 3) * 5 * size * 4
    per = ascent_bytes_per_image(AscentConfig(discover="whole"), size)
    assert per == 7 * 16 * 5 * size * 4
    assert ascent_bytes_per_image(AscentConfig(method="pez"), size) < per
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (4 * gib, 8 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 0)
    sizer = BatchSizer(SimpleNamespace(clip=SimpleNamespace(device=torch.device("cuda", 0))), logging.getLogger("t"))
    small = sizer.size("ascend", 0, cuda=64, cpu=4, bytes_per_image=per)
    assert small == (2 * gib) // per == 19  # a GPU with 4 GiB free starts below 64
    assert sizer.size("ascend", 48, cuda=64, cpu=4, bytes_per_image=per) == 48  # a configured size is kept
    # blocks the allocator keeps from the last batch count as free: the size does not shrink batch by batch
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (1 * gib, 8 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 4 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 1 * gib)
    assert sizer.size("ascend", 0, cuda=64, cpu=4, bytes_per_image=per) == small
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (70 * gib, 80 * gib))
    assert sizer.size("ascend", 0, cuda=64, cpu=4, bytes_per_image=per) == 64


def test_progress_within_a_batch_moves_forward_only():
    from rich.progress import Progress

    from pipeline.run.runner import _within

    with Progress(disable=True) as progress:
        task = progress.add_task("ascend", total=10)
        update = _within(progress, task, done=4, size=4)
        update(0.5)
        assert progress.tasks[0].completed == 6
        update(0.25)  # a batch split after an out-of-memory starts over: the bar stays
        assert progress.tasks[0].completed == 6
        update(1.0)
        assert progress.tasks[0].completed == 8
