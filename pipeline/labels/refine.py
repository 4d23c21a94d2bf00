"""Refining a coarse map with the image: PAMR (pixel-adaptive mask refinement, Araslanov & Roth, CVPR 2020).

Each pixel ``i`` has neighbours ``j`` on a 3x3 ring at each of several dilations. Their affinity comes from the
image's local colour differences, scaled by the local spread of colour:

    k(i, j) = -mean_c |I_c(i) - I_c(j)| / (eps + 0.1 * sigma_c(i)),    a(i, .) = softmax_j k(i, j)

and the map is propagated ``iterations`` times, ``m(i) <- sum_j a(i, j) m(j)``, so a map flows along regions of
like colour and stops at edges: a blob that spills over an object's border is pulled back to it. Written from the
paper's equations, in NumPy: one picture's affinities once, then every map of that picture.
"""

from __future__ import annotations

import numpy as np

DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12)
ITERATIONS = 20


class Pamr:
    """PAMR for one picture: its neighbours' indices and affinities are computed once, then any number of maps of
    that picture are refined by them (``refiner(maps)``). NumPy only, so an export's reading processes need no torch.

    Args:
        image: the picture at the maps' size, ``[H, W, 3]`` uint8 (or float in [0, 1]).
    """

    def __init__(self, image: np.ndarray, iterations: int = ITERATIONS, dilations: tuple[int, ...] = DILATIONS):
        x = np.asarray(image, dtype=np.float32)
        if np.asarray(image).dtype == np.uint8:
            x = x / 255.0
        h, w = x.shape[:2]
        self.shape, self.iterations = (h, w), iterations
        ys, xs = np.mgrid[0:h, 0:w]
        idx = [np.clip(ys + dy * d, 0, h - 1) * w + np.clip(xs + dx * d, 0, w - 1)  # edges replicated
               for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
        self.index = np.stack(idx).reshape(len(idx), h * w)  # [N, HW]: each pixel's neighbours
        flat = x.reshape(h * w, 3).T  # [3, HW]
        near = flat[:, self.index]  # [3, N, HW]
        spread = np.concatenate([near, flat[:, None]], 1).std(1, ddof=1, keepdims=True)
        k = (-np.abs(near - flat[:, None]) / (1e-8 + 0.1 * spread)).mean(0)  # [N, HW]
        k = np.exp(k - k.max(0, keepdims=True))
        self.affinity = (k / k.sum(0, keepdims=True)).astype(np.float32)

    def __call__(self, maps: np.ndarray) -> np.ndarray:
        """``[K, H, W]`` (or one ``[H, W]``) maps in [0, 1], refined; the same shape, float32."""
        m = np.asarray(maps, dtype=np.float32).reshape(-1, self.shape[0] * self.shape[1])
        for _ in range(self.iterations):
            m = np.einsum("knp,np->kp", m[:, self.index], self.affinity)
        return m.reshape(np.shape(maps))


def pamr(image: np.ndarray, maps: np.ndarray, iterations: int = ITERATIONS,
         dilations: tuple[int, ...] = DILATIONS) -> np.ndarray:
    """Maps (``[K, H, W]`` or ``[H, W]``, in [0, 1]) refined with ``image``'s local affinities (``Pamr``)."""
    return Pamr(image, iterations, dilations)(maps)
