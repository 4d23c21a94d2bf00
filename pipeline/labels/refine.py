"""Refining a coarse map with its picture, so a region follows the object's edges: two refiners, by name in
``REFINERS`` (``export.refine``), each built once per picture and then called on any number of that picture's maps.

**PAMR** (pixel-adaptive mask refinement, Araslanov & Roth, CVPR 2020). Each pixel ``i`` has neighbours ``j`` on a 3x3 ring at each of several dilations. Their affinity comes from the
image's local colour differences, scaled by the local spread of colour:

    k(i, j) = -mean_c |I_c(i) - I_c(j)| / (eps + 0.1 * sigma_c(i)),    a(i, .) = softmax_j k(i, j)

and the map is propagated ``iterations`` times, ``m(i) <- sum_j a(i, j) m(j)``, so a map flows along regions of
like colour and stops at edges: a blob that spills over an object's border is pulled back to it. Written from the
paper's equations, in NumPy: one picture's affinities once, then every map of that picture.

**Guided filter** (He, Sun & Tang, ECCV 2010; TPAMI 2013), with the colour picture as the guide. In each window
``w_k`` of radius ``r`` the output is a linear function of the guide, ``q = a_k . I + b_k``, fitted to the map ``p``
by ridge regression:

    a_k = (Sigma_k + eps U)^-1 cov_k(I, p),    b_k = mean_k(p) - a_k . mean_k(I)

and each pixel averages the ``(a, b)`` of the windows that hold it. Edges of the picture become edges of the map at
the cost of a few box filters: the per-pixel ``(Sigma + eps U)^-1`` is the picture's, computed once.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

DILATIONS: tuple[int, ...] = (1, 2, 4, 8)  # pixels at the working size; 12 as well measured worse on the tuning scenes
ITERATIONS = 20


class Pamr:
    """PAMR for one picture: its affinities are computed once, then any number of maps of that picture are refined
    by them (``refiner(maps)``). NumPy only, so an export's reading processes need no torch.

    A neighbour at offset ``(dy, dx)`` of every pixel is one slice of the picture (or map) padded by the largest
    dilation with its edge replicated, so each step is a sum of shifted, weighted copies of the maps: contiguous
    arithmetic, with no gathering of each pixel's neighbours by index.

    Args:
        image: the picture at the maps' size, ``[H, W, 3]`` uint8 (or float in [0, 1]).
    """

    def __init__(self, image: np.ndarray, iterations: int = ITERATIONS, dilations: tuple[int, ...] = DILATIONS):
        x = np.asarray(image, dtype=np.float32)
        if np.asarray(image).dtype == np.uint8:
            x = x / 255.0
        h, w = x.shape[:2]
        self.shape, self.iterations, self.pad = (h, w), iterations, max(dilations)
        p = self.pad
        self.offsets = [(p + dy * d, p + dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                        if (dy, dx) != (0, 0)]
        padded = np.pad(x.transpose(2, 0, 1), ((0, 0), (p, p), (p, p)), mode="edge")  # [3, H+2p, W+2p]
        near = np.stack([padded[:, y:y + h, x0:x0 + w] for y, x0 in self.offsets], 1)  # [3, N, H, W]
        here = x.transpose(2, 0, 1)[:, None]
        spread = np.concatenate([near, here], 1).std(1, ddof=1, keepdims=True)
        k = (-np.abs(near - here) / (1e-8 + 0.1 * spread)).mean(0)  # [N, H, W]
        k = np.exp(k - k.max(0, keepdims=True))
        self.affinity = (k / k.sum(0, keepdims=True)).astype(np.float32)

    def __call__(self, maps: np.ndarray) -> np.ndarray:
        """``[K, H, W]`` (or one ``[H, W]``) maps in [0, 1], refined; the same shape, float32."""
        (h, w), p = self.shape, self.pad
        m = np.asarray(maps, dtype=np.float32).reshape(-1, h, w)
        padded = np.empty((m.shape[0], h + 2 * p, w + 2 * p), np.float32)
        step = np.empty_like(m)
        for _ in range(self.iterations):
            padded[:, p:p + h, p:p + w] = m
            padded[:, :p, p:p + w] = m[:, :1]  # the edges replicated, as np.pad's "edge" does, without a new array
            padded[:, p + h:, p:p + w] = m[:, -1:]
            padded[:, :, :p] = padded[:, :, p:p + 1]
            padded[:, :, p + w:] = padded[:, :, p + w - 1:p + w]
            out = np.zeros_like(m)
            for (y, x), a in zip(self.offsets, self.affinity):
                np.multiply(padded[:, y:y + h, x:x + w], a, out=step)  # in place: no new array per neighbour
                out += step
            m = out
        return m.reshape(np.shape(maps))


def pamr(image: np.ndarray, maps: np.ndarray, iterations: int = ITERATIONS,
         dilations: tuple[int, ...] = DILATIONS) -> np.ndarray:
    """Maps (``[K, H, W]`` or ``[H, W]``, in [0, 1]) refined with ``image``'s local affinities (``Pamr``)."""
    return Pamr(image, iterations, dilations)(maps)


GUIDED_RADIUS = 1 / 8  # the window's radius, as a fraction of the picture's longer side (8 px on the toy's 64)
GUIDED_EPS = 1e-3  # the ridge term, on colours in [0, 1]: larger smooths more, smaller follows every edge


class GuidedFilter:
    """The colour guided filter of one picture: its window means and per-pixel inverse covariances are computed
    once, then any number of maps of that picture are filtered by them (``refiner(maps)``). NumPy and OpenCV's box
    filter only.

    Args:
        image: the picture at the maps' size, ``[H, W, 3]`` uint8 (or float in [0, 1]).
        radius: the window's radius as a fraction of the longer side (at least 1 pixel).
        eps: the ridge term.
    """

    def __init__(self, image: np.ndarray, radius: float = GUIDED_RADIUS, eps: float = GUIDED_EPS):
        x = np.asarray(image, dtype=np.float32)
        if np.asarray(image).dtype == np.uint8:
            x = x / 255.0
        self.shape = x.shape[:2]
        self.r = max(1, round(radius * max(self.shape)))
        self.guide = x
        self.mean = self._box(x)  # [H, W, 3]
        pairs = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]  # the symmetric covariance's six entries
        outer = np.stack([x[..., i] * x[..., j] for i, j in pairs], axis=2)
        c = self._box(outer) - np.stack([self.mean[..., i] * self.mean[..., j] for i, j in pairs], axis=2)
        c[..., [0, 3, 5]] += eps
        self.inverse = _inverse3(c)  # [H, W, 3, 3]

    def _box(self, x: np.ndarray) -> np.ndarray:
        """The mean over each pixel's window, channel by channel (``[H, W]`` or ``[H, W, C]``)."""
        k = 2 * self.r + 1
        if x.ndim == 3 and x.shape[2] > 4:  # OpenCV's filters take at most 4 channels at once here
            return np.concatenate([self._box(x[..., i : i + 4]) for i in range(0, x.shape[2], 4)], axis=2)
        out = cv2.blur(x, (k, k), borderType=cv2.BORDER_REFLECT)
        return out.reshape(x.shape)

    def __call__(self, maps: np.ndarray) -> np.ndarray:
        """``[K, H, W]`` (or one ``[H, W]``) maps in [0, 1], filtered; the same shape, float32, clipped to [0, 1]."""
        shape = np.shape(maps)
        p = np.asarray(maps, dtype=np.float32).reshape(-1, *self.shape)
        out = np.empty_like(p)
        for i, m in enumerate(p):
            mp = self._box(m)
            cov = self._box(self.guide * m[..., None]) - self.mean * mp[..., None]  # [H, W, 3]
            a = np.einsum("hwij,hwj->hwi", self.inverse, cov)
            b = mp - (a * self.mean).sum(-1)
            out[i] = (self._box(a) * self.guide).sum(-1) + self._box(b)
        return np.clip(out, 0.0, 1.0).reshape(shape)


def _inverse3(c: np.ndarray) -> np.ndarray:
    """The inverses of symmetric 3x3 matrices given by their entries ``[..., (00, 01, 02, 11, 12, 22)]``, by the
    adjugate (far faster than a batched ``np.linalg.inv`` over every pixel)."""
    a, b, d, e, f, g = (c[..., i] for i in range(6))  # [[a b d] [b e f] [d f g]]
    i00, i01, i02 = e * g - f * f, d * f - b * g, b * f - d * e
    i11, i12, i22 = a * g - d * d, b * d - a * f, a * e - b * b
    det = a * i00 + b * i01 + d * i02
    inv = np.stack([i00, i01, i02, i01, i11, i12, i02, i12, i22], axis=-1) / det[..., None]
    return inv.reshape(*c.shape[:-1], 3, 3).astype(np.float32)


REFINERS: dict[str, Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {"pamr": Pamr, "guided": GuidedFilter}
"""``export.refine``'s refiners by name: each takes the picture at the maps' size and gives the refiner of its maps
(``none``, the other choice, refines nothing)."""


def refiner_for(name: str, picture: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
    """The refiner ``name`` of ``picture`` (``[H, W, 3]``), or ``None`` for ``none``.

    Raises:
        KeyError: an unknown name (the config checks it first).
    """
    return None if name == "none" else REFINERS[name](picture)
