"""Label Studio's brush RLE, vectorized: the SDK's own encoder and decoder are the reference."""

import numpy as np
import pytest

from pipeline.labels.brush import brush_rle


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    big = np.zeros((480, 640), np.uint8)
    big[100:300, 50:400] = 255  # runs of every token width, and runs longer than 65,536 bytes
    out = [np.zeros((1, 1), np.uint8), np.full((300, 300), 255, np.uint8), np.zeros((200, 400), np.uint8), big]
    for _ in range(60):
        h, w = rng.integers(1, 50, 2)
        out.append((rng.random((h, w)) < rng.random()).astype(np.uint8) * 255)
        out.append(rng.integers(0, 256, (h, w)).astype(np.uint8))  # short runs (4 bytes a pixel), any value
    return out


def test_brush_rle_is_the_sdks_mask2rle():
    from label_studio_sdk.converter.brush import mask2rle

    for mask in _masks():
        assert brush_rle(mask) == [int(v) for v in mask2rle(mask)], mask.shape


def test_brush_rle_decodes_to_its_mask_in_the_sdk():
    from label_studio_sdk.converter.brush import decode_rle

    for mask in _masks()[:10]:
        rgba = np.reshape(decode_rle(brush_rle(mask)), (*mask.shape, 4))
        assert (rgba == mask[..., None]).all()


def test_brush_rle_wants_a_2d_mask():
    with pytest.raises(ValueError, match=r"\[H, W\].*\(2, 3, 4\)"):
        brush_rle(np.zeros((2, 3, 4), np.uint8))
