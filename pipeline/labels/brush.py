"""Label Studio's brush RLE, vectorized: the same integers as ``label_studio_sdk.converter.brush.mask2rle``.

The format (the ``rle-pack`` bit stream Label Studio's brush reads) is a header of 53 bits (the length of the
RGBA-flattened mask in 32 bits, the word size less one in 5, the four run-length widths less one in 4 each) and
then one token per run of equal bytes, most significant bit first:

    run of 1:       0 00 000  value(8)        run of 2..8:    1 00 len-1(3)  value(8)
    run of 9..16:   1 01 len-1(4) value(8)    run of 17..256: 1 10 len-1(8)  value(8)
    longer:         1 11 len-1(16) value(8), in pieces of 65,536 while more than that is left

padded with zeros to whole bytes (a whole zero byte when it already ends on one, as the SDK does). A mask's
runs are whole pixels of four bytes, so the single-byte token never occurs here. The SDK builds
that stream as a Python string a token at a time; here every token's code is one integer, and the bits are laid
out and packed by NumPy: about 8 times faster on a 640x480 mask of two discs (0.24 ms against 2.0 ms).
"""

from __future__ import annotations

import numpy as np

WORD, SIZES = 8, (3, 4, 8, 16)  # the SDK's defaults: 8-bit values, run lengths in 3, 4, 8 or 16 bits
LONGEST = 2 ** 16  # the most one 16-bit token holds


def brush_rle(mask: np.ndarray) -> list[int]:
    """A mask's brush RLE for Label Studio (``value.rle`` of a ``brushlabels`` result).

    Args:
        mask: ``[H, W]`` uint8 (or int), each pixel's value written to all four RGBA channels, as the SDK does.

    Returns:
        The RLE as a list of byte values, equal to the SDK's ``mask2rle(mask)``.
    """
    if mask.ndim != 2:
        raise ValueError(f"a brush mask must be [H, W], got shape {tuple(mask.shape)}")
    flat = np.asarray(mask).ravel().astype(np.uint8)
    n = 4 * flat.size  # the RGBA-flattened length
    header = (n << 21) | ((WORD - 1) << 16)
    for k, size in enumerate(SIZES):
        header |= (size - 1) << (12 - 4 * k)
    if flat.size == 0:
        codes, widths = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    else:
        ends = np.append(np.flatnonzero(flat[1:] != flat[:-1]), flat.size - 1)
        lengths = 4 * np.diff(np.append(-1, ends))  # every pixel is four equal bytes
        values = flat[ends].astype(np.int64)
        codes, widths = _tokens(lengths, values)
    bits = np.concatenate([_bits(np.array([header], np.uint64), np.array([53])), _bits(codes, widths)])
    pad = 8 - bits.size % 8
    return np.packbits(np.concatenate([bits, np.zeros(pad, np.uint8)])).tolist()


def _tokens(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every run's token(s) as ``(code, width in bits)``; a run longer than 65,536 as its pieces, in order."""
    long = lengths > 256
    pieces = np.where(long, (lengths - 1) // LONGEST + 1, 1)  # the SDK's pieces: 65,536 each while more is left
    run = np.repeat(np.arange(lengths.size), pieces)
    first = np.cumsum(pieces) - pieces
    last = np.arange(run.size) == (first + pieces - 1)[run]
    length = np.where(long[run] & ~last, LONGEST, lengths[run] - LONGEST * (pieces[run] - 1))
    value, short = values[run], ~long[run]
    # every run is a series (a pixel is four equal bytes, so no run is a single one), counted in 3, 4, 8 or 16
    # bits: its prefix bits 1 00, 1 01, 1 10 or 1 11, and its count's width
    kind = np.select([short & (length <= 8), short & (length <= 16), short], [0, 1, 2], 3)
    prefix = np.array([0b100, 0b101, 0b110, 0b111])[kind]
    count = np.array([3, 4, 8, 16])[kind]
    codes = (((prefix << count) | (length - 1)) << WORD) | value
    return codes.astype(np.uint64), 3 + count + WORD


def _bits(codes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The codes' bits, most significant first, each code in its own width, one after another (uint8 0/1)."""
    if codes.size == 0:
        return np.zeros(0, np.uint8)
    top = int(widths.max())
    shifts = np.arange(top - 1, -1, -1, dtype=np.uint64)  # [top]
    grid = ((codes[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)  # [n, top], right-aligned
    keep = np.arange(top)[None, :] >= (top - widths)[:, None]
    return grid[keep]
