"""SAM for the surgery stage: its settings, loading a checkpoint with an error that says what to do, and the
best mask for each label's point prompts.

segment-anything is an optional extra (``pip install -e '.[sam]'``), imported only when a checkpoint is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.lazy import lazy_module
from pipeline.run.config import ConfigError

torch = lazy_module("torch")

SAM_TYPES = ("vit_h", "vit_l", "vit_b")


@dataclass(frozen=True)
class SamConfig:
    checkpoint: str | None = None  # a SAM checkpoint file; unset = no masks
    model_type: Literal["vit_h", "vit_l", "vit_b"] = "vit_h"  # must match the checkpoint


def load_sam(cfg: SamConfig, device: torch.device) -> Any:
    """A ``SamPredictor`` for the configured checkpoint; a ``ConfigError`` that says what to do otherwise."""
    try:
        from segment_anything import SamPredictor, sam_model_registry
    except ImportError:
        raise ConfigError("surgery.sam.checkpoint is set, but segment-anything is not installed. "
                          "Install the extra with: pip install -e '.[sam]'") from None
    path = Path(cfg.checkpoint or "").expanduser()
    if not path.is_file():
        raise ConfigError(f"surgery.sam.checkpoint: no file at {path}. Download the {cfg.model_type} checkpoint "
                          "listed at https://github.com/facebookresearch/segment-anything#model-checkpoints "
                          "and set surgery.sam.checkpoint to its path.")
    try:
        sam = sam_model_registry[cfg.model_type](checkpoint=str(path))
    except Exception as err:
        raise ConfigError(f"surgery.sam.checkpoint: {path} did not load as SAM {cfg.model_type} "
                          f"(is surgery.sam.model_type right? one of {', '.join(SAM_TYPES)}): {err}") from None
    return SamPredictor(sam.to(device).eval())


def sam_masks(predictor: Any, image: np.ndarray, points: list[tuple[list[list[int]], list[int]]]) -> list[np.ndarray | None]:
    """SAM's best mask (by its own score) for each point set; ``None`` where a label has no points.

    Shape:
        - image: :math:`(H, W, 3)` RGB uint8. Output masks: :math:`(H, W)` bool.
    """
    if not any(p for p, _ in points):
        return [None] * len(points)
    with torch.inference_mode():
        predictor.set_image(image)
        out = []
        for pts, labels in points:
            if not pts:
                out.append(None)
                continue
            masks, scores, _ = predictor.predict(point_coords=np.asarray(pts, dtype=np.float32),
                                                 point_labels=np.asarray(labels), multimask_output=True)
            out.append(np.asarray(masks[int(np.argmax(scores))], dtype=bool))
    return out
