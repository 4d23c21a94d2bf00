"""The pipeline's stages, in run order, and the run config that holds each stage's section.

Each stage module has the same three parts: a frozen ``*Config`` (its section of
``RunConfig``, named like the stage), a pure core that takes the model and tensors or
plain data and returns a result dataclass, and a stage class whose ``process`` (or
``run_all``) reads inputs, calls the core and writes outputs through ``RunDir``.
No stage imports another.

Per-image stages: ascend -> decode -> surgery. Whole-run stages: rank -> export -> report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.run.config import STAGE_NAMES, require
from pipeline.heatmaps import names as heatmap_methods
from pipeline.run.stage import PerImageStage, WholeRunStage
from stages.ascend import AscendStage, AscentConfig
from stages.decode import DecodeConfig, DecodeStage
from stages.export import ExportConfig, ExportStage
from stages.rank import RankConfig, RankStage
from stages.report import ReportConfig, ReportStage
from stages.surgery import SurgeryConfig, SurgeryStage


@dataclass(frozen=True)
class InputConfig:
    patterns: tuple[str, ...] = ()  # globs on the relative path or file name; empty = every image type


@dataclass(frozen=True)
class RunConfig:
    """The whole resolved config of a run, saved as ``run.yaml``."""

    preset: Literal["fast", "classic", "best"] = "classic"  # ascend's speed against thoroughness (PRESETS)
    model: str = "ViT-B/16"  # openai-clip name, "toy", "random:<arch>", "openclip:ARCH/PRETRAINED", "random:openclip:ARCH", or a checkpoint path
    model_cache: str | None = None  # download cache; default $CLIPSIGHT_CACHE or ~/.cache/clip (OpenCLIP: its Hugging Face cache)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto picks CUDA when torch sees a GPU
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"  # on CUDA; the CPU always runs fp32
    seed: int = 0  # every image's random streams derive from the seed and the image's id
    encode_batch_size: int = 32  # images per forward when encoding (decode)
    max_side: int = 4096  # larger inputs are downscaled on load
    input: InputConfig = field(default_factory=InputConfig)
    ascend: AscentConfig = field(default_factory=AscentConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        require(self.encode_batch_size >= 1, f"encode_batch_size must be >= 1, got {self.encode_batch_size}")
        require(self.max_side >= 32, f"max_side must be >= 32, got {self.max_side}")
        require(self.ascend.enabled or bool(self.decode.words),
                "ascend.enabled is false (--no-ascent), so the labels come from a vocabulary alone: give one with "
                "--words or decode.words")


# Named settings a run can start from (``preset: fast`` in a config, or ``--preset fast``); any key a config
# file, an option or --set gives wins over the preset's. "classic" is the original's ascent (the defaults).
# Each preset's seconds per image and toy recall are measured in the README.
PRESETS: dict[str, dict] = {
    "fast": {"ascend": {"iterations": 100, "candidates": 8, "checkin_every": 5}},
    "classic": {},
    "best": {"ascend": {"iterations": 400, "candidates": 32}},
}


def config_choices() -> dict[str, tuple[str, ...]]:
    """The keys whose values come from a registry, with those values now (the config reference lists them)."""
    return {"surgery.methods": heatmap_methods(), "export.region_method": heatmap_methods()}


# The config keys that change each stage's results, in one place (see pipeline.run.provenance): a change to
# one of them redoes that stage, and every stage after it, for every image. A section named here counts
# whole, less the keys pipeline.run.provenance.NOT_RESULT lists (batch sizes).
RESULT_KEYS: dict[str, tuple[str, ...]] = {
    "ascend": ("model", "precision", "seed", "max_side", "ascend"),
    "decode": ("model", "precision", "max_side", "decode"),
    "surgery": ("model", "precision", "max_side", "surgery"),
    "rank": ("rank",),
    "export": ("export",),
    "report": ("report",),
}

STAGES: dict[str, PerImageStage | WholeRunStage] = {
    s.name: s for s in (AscendStage(), DecodeStage(), SurgeryStage(), RankStage(), ExportStage(), ReportStage())
}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)
assert STAGE_ORDER == STAGE_NAMES, "pipeline.run.config.STAGE_NAMES must list the stages in run order"
