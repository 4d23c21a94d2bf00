"""Environment checks for ``runall.py doctor``: torch and CUDA, openai-clip, the weights cache, disk, extras."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.model.load import TOY_CHECKPOINT, cached_file


CHROMIUM_ENV = "CLIPSIGHT_CHROMIUM"


def find_chromium() -> str | None:
    """The Chromium the report's browser test, the figures and the report benchmark drive: ``$CLIPSIGHT_CHROMIUM``
    when set, else the first of Debian's and Google's names on the PATH."""
    for candidate in (os.environ.get(CHROMIUM_ENV), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


@dataclass(frozen=True)
class Check:
    """One line of the doctor's table; ``ok`` is True (fine), False (a problem) or None (a note)."""

    name: str
    ok: bool | None
    detail: str


def check_environment(cache: Path, output: Path) -> list[Check]:
    """Every check, in the order a person reads them."""
    import torch

    checks = [Check("python", sys.version_info >= (3, 11), sys.version.split()[0]),
              Check("torch", True, f"{torch.__version__} ({torch.get_num_threads()} CPU threads)")]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        checks.append(Check("CUDA", True, f"{torch.version.cuda}: {names}"))
    else:
        checks.append(Check("CUDA", None, "no GPU visible: runs use the CPU (fine for the toy demo, slow for ViT-B/16)"))
    try:
        import clip

        checks.append(Check("openai-clip", True, "imports"))
    except Exception as err:  # e.g. setuptools >= 81 has no pkg_resources
        checks.append(Check("openai-clip", False, f"{err}; try: pip install 'setuptools>=77,<81'"))
    present = [n for n in clip.available_models() if cached_file(n, cache).is_file()]
    checks.append(Check("weights cache", None if not present else True,
                        f"{cache}: " + (", ".join(present) if present else "no OpenAI checkpoint yet (downloaded on first "
                                                                           "use; offline, copy the file to the path `models` prints)")))
    checks.append(Check("toy model", TOY_CHECKPOINT.is_file(), str(TOY_CHECKPOINT)))
    probe = output if output.exists() else Path(".")
    free = shutil.disk_usage(probe).free / 2**30
    checks.append(Check("free disk", free >= 1, f"{free:.1f} GiB free at {probe.resolve()} "
                                                "(overlay PNGs take most of a run's space)"))
    try:
        import open_clip

        from pipeline.model.load import RANDOM_OPENCLIP_PREFIX, openclip_models

        served = sum(n.startswith(RANDOM_OPENCLIP_PREFIX) for n in openclip_models())
        checks.append(Check("extra: openclip", True, f"open_clip {open_clip.__version__}: {served} architectures served, "
                                                     "as openclip:ARCH/PRETRAINED or random:openclip:ARCH"))
    except ImportError:
        checks.append(Check("extra: openclip", None, "open_clip not installed: pip install -e '.[openclip]' for OpenCLIP models"))
    for module, extra, use in (("segment_anything", "sam", "SAM masks"), ("playwright", "dev", "the report's browser test")):
        found = importlib.util.find_spec(module) is not None
        checks.append(Check(f"extra: {extra}", True if found else None,
                            f"{module} installed" if found else f"{module} not installed: pip install -e '.[{extra}]' for {use}"))
    browser = find_chromium()
    checks.append(Check("browser", True if browser else None, browser or "no Chromium: the report's browser test will skip"))
    return checks
