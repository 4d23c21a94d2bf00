"""The runner's CUDA out-of-memory back-off, simulated on the CPU."""

import pytest
import torch

from pipeline.runner import split_on_oom


def test_batches_halve_on_out_of_memory_and_keep_order():
    fitted, sizes = [], []

    def fn(a, b):
        if b - a > 2:
            raise torch.OutOfMemoryError("simulated")
        fitted.append((a, b))
        return [i * 10 for i in range(a, b)]

    assert split_on_oom(fn, 0, 7, sizes.append) == [i * 10 for i in range(7)]  # every item once, in order
    assert [i for a, b in fitted for i in range(a, b)] == list(range(7)) and all(b - a <= 2 for a, b in fitted)
    assert sizes and min(sizes) <= 2  # the stage is told the size that fits


def test_one_image_that_does_not_fit_is_re_raised():
    def fn(a, b):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(torch.OutOfMemoryError):
        split_on_oom(fn, 0, 4)


def test_batch_size_keeps_what_fitted_after_a_back_off():
    import logging
    from types import SimpleNamespace

    from pipeline.runner import batch_size_for, remember_batch_size

    ctx = SimpleNamespace(cache={}, model=SimpleNamespace(device=torch.device("cpu")), log=logging.getLogger("t"))
    assert batch_size_for(ctx, "ascend", 0, cuda=64, cpu=4) == 4
    assert batch_size_for(ctx, "ascend", 16, cuda=64, cpu=4) == 16
    remember_batch_size(ctx, "ascend")(8)
    assert batch_size_for(ctx, "ascend", 16, cuda=64, cpu=4) == 8  # even a configured size gives way
    assert batch_size_for(ctx, "surgery", 0, cuda=32, cpu=8) == 8  # per stage
