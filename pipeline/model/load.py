"""Load CLIP models: OpenAI names, local checkpoints, the shipped toy model, random architectures.

* An openai-clip name (``RN50`` ... ``ViT-L/14@336px``) goes through openai-clip's own
  download and cache. Offline and not cached, loading fails with one message that
  names the expected file and where to put it.
* A local path may hold an OpenAI JIT archive, a plain state dict in OpenAI's key
  layout, or a whole model saved with ``torch.save``. The architecture and input
  resolution are read from the weights by ``clip.model.build_model``.
* ``toy`` is the checkpoint shipped in ``pipeline/assets``.
* ``random:<arch>`` is a seeded random initialisation of a real architecture.
* ``openclip:ARCH/PRETRAINED`` is an OpenCLIP model (the ``openclip`` extra) with its named
  pretrained weights, downloaded through open_clip into its cache (PRETRAINED may also be a
  checkpoint file's path); ``random:openclip:ARCH`` is that architecture with seeded random
  weights. Only configurations ``pipeline.model.adapter`` serves faithfully load; the rest are
  refused with the reason.

Loaded models are in eval mode with frozen parameters: fp32 on CPU, the chosen
precision on CUDA. Stages read them and never change them.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import urllib.error
import urllib.parse
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.lazy import lazy_module
from pipeline.model.adapter import ClipAdapter, check_openclip_model, openclip_refusal

torch = lazy_module("torch")

if TYPE_CHECKING:  # openai-clip is imported where a model is loaded: it imports torchvision, which would cost
    from clip.model import CLIP  # every command, ``status`` and a rerun with nothing to do among them, seconds

ASSETS = Path(__file__).parent.parent / "assets"
TOY_CHECKPOINT = ASSETS / "toy-clip.pt"
CACHE_ENV = "CLIPSIGHT_CACHE"
OPENAI_CONTEXT_LENGTH = 77  # every OpenAI CLIP; loaded models report their own
OPENCLIP_PREFIX = "openclip:"
RANDOM_OPENCLIP_PREFIX = "random:openclip:"

# Hyper-parameters for ``random:<arch>`` only: a random model has no weights to read them from.
# (embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, text_width, text_heads, text_layers)
RANDOM_ARCHS: dict[str, tuple] = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 512, 8, 12),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 640, 10, 12),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 768, 12, 12),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 1024, 16, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 768, 12, 12),
    "ViT-L/14@336px": (768, 336, 24, 1024, 14, 768, 12, 12),
    "tiny": (32, 32, 2, 64, 8, 64, 1, 2),
    "tiny-rn": (32, 64, (1, 1, 1, 1), 8, None, 64, 1, 2),
}


class ModelError(RuntimeError):
    """A model that cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class LoadedModel:
    """A frozen CLIP model and how it was loaded."""

    model: torch.nn.Module  # openai-clip's CLIP or open_clip.CLIP
    name: str
    device: torch.device
    dtype: torch.dtype

    @functools.cached_property
    def clip(self) -> ClipAdapter:
        """The model's adapter: how every stage reaches its towers, whichever backend it is."""
        return ClipAdapter(self.model)

    @property
    def input_resolution(self) -> int:
        return self.clip.input_resolution

    @property
    def is_vit(self) -> bool:
        return self.clip.is_vit


def default_cache_dir() -> Path:
    """``$CLIPSIGHT_CACHE`` if set, else openai-clip's own default ``~/.cache/clip``."""
    return Path(os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/clip"))


def known_models() -> list[str]:
    """Every name ``load_model`` accepts besides local paths (OpenCLIP's when open_clip is installed)."""
    import clip

    return ["toy", *clip.available_models(), *(f"random:{a}" for a in RANDOM_ARCHS), *openclip_models()]


def openclip_models() -> list[str]:
    """The OpenCLIP names the adapter serves: every served architecture's pretrained tags, then its random form."""
    try:
        import open_clip
    except ImportError:
        return []
    served = [a for a in open_clip.list_models() if openclip_refusal(a, open_clip.get_model_config(a)) is None]
    pretrained = [f"{OPENCLIP_PREFIX}{a}/{t}" for a, t in open_clip.list_pretrained() if a in served]
    return pretrained + [f"{RANDOM_OPENCLIP_PREFIX}{a}" for a in served]


def cached_file(name: str, cache_dir: Path) -> Path:
    """Where openai-clip keeps (or will download) the checkpoint for an OpenAI model name."""
    import clip

    url = clip.clip._MODELS[name]
    return cache_dir / os.path.basename(url)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when it is available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(device)


def load_model(
    name: str,
    device: torch.device,
    precision: str = "fp16",
    cache_dir: Path | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a CLIP model, frozen and in eval mode.

    Args:
        name: an openai-clip name, ``toy``, ``random:<arch>``, ``openclip:ARCH/PRETRAINED``,
            ``random:openclip:ARCH``, or a path to a checkpoint.
        device: where to put it.
        precision: ``fp16``, ``bf16`` or ``fp32`` on CUDA; the CPU always uses fp32.
        cache_dir: openai-clip's download cache (default: ``default_cache_dir()``); for OpenCLIP names, the
            folder open_clip downloads into (default: its own, the Hugging Face hub cache).
        seed: seeds the initialisation of ``random:<arch>``.

    Raises:
        ModelError: with a message that says which file was expected and what to do.
    """
    import clip

    if name.startswith((OPENCLIP_PREFIX, RANDOM_OPENCLIP_PREFIX)):
        return _load_openclip(name, device, precision, cache_dir, seed)
    if name in clip.available_models():
        model = _load_openai(name, cache_dir or default_cache_dir())
    elif name == "toy":
        model = _build(_read_checkpoint(TOY_CHECKPOINT))
    elif name.startswith("random:"):
        model = _random_model(name.split(":", 1)[1], seed)
    elif Path(name).expanduser().exists():
        model = _build(_read_checkpoint(Path(name).expanduser()))
    else:
        raise ModelError(
            f"unknown model {name!r}: not a known name and no such file. "
            f"Known names: {', '.join(n for n in known_models() if 'openclip:' not in n)}, "
            f"openclip:ARCH/PRETRAINED and random:openclip:ARCH (`python runall.py models` lists them); "
            f"or give a path to a checkpoint."
        )
    dtype = _compute_dtype(device, precision)
    model = _cast_like_openai(model.to(device), dtype).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, name=name, device=device, dtype=dtype)


def _compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The precision a model runs in: ``precision`` on CUDA, fp32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def _import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise ModelError("OpenCLIP models need the open_clip package: pip install -e '.[openclip]'") from None
    return open_clip


def _load_openclip(name: str, device: torch.device, precision: str, cache_dir: Path | None, seed: int) -> LoadedModel:
    """An ``open_clip.CLIP`` for ``openclip:ARCH/PRETRAINED`` or ``random:openclip:ARCH``, frozen, in eval mode.

    On CUDA the half precisions are open_clip's own (weights in half, layer norms in fp32), as openai-clip's.
    """
    open_clip = _import_open_clip()
    random = name.startswith(RANDOM_OPENCLIP_PREFIX)
    spec = name.removeprefix(RANDOM_OPENCLIP_PREFIX if random else OPENCLIP_PREFIX)
    arch, _, tag = spec.partition("/")
    if not arch or (random and tag) or (not random and not tag):
        form = "random:openclip:ARCH" if random else "openclip:ARCH/PRETRAINED"
        raise ModelError(f"model {name!r}: expected {form}, e.g. "
                         + ("random:openclip:ViT-B-32" if random else "openclip:ViT-B-32/laion2b_s34b_b79k"))
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ModelError(f"model {name!r}: {arch!r} is not an OpenCLIP architecture; `python runall.py models` "
                         f"lists those clipsight serves")
    refusal = openclip_refusal(arch, config)
    if refusal:
        raise ModelError(f"model {name!r} is refused: clipsight cannot run {arch} faithfully. Its layout: {refusal}. "
                         f"clipsight serves open_clip's plain ViT and ModifiedResNet CLIPs (`python runall.py models`).")
    dtype = _compute_dtype(device, precision)
    oc_precision = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    if random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            logging.disable(logging.WARNING)  # open_clip's "initialized randomly" is what was asked for
            try:
                model = open_clip.create_model(arch, pretrained=None, precision=oc_precision)
            finally:
                logging.disable(logging.NOTSET)
    else:
        checkpoint = _openclip_checkpoint(open_clip, name, arch, config, tag, cache_dir)
        model = open_clip.create_model(arch, pretrained=str(checkpoint), precision=oc_precision)
    try:
        check_openclip_model(model, name)
    except ValueError as err:
        raise ModelError(str(err)) from None
    model = model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, name=name, device=device, dtype=dtype)


def _openclip_checkpoint(open_clip, name: str, arch: str, config: dict, tag: str, cache_dir: Path | None) -> Path:
    """The checkpoint file for ``tag``: a file path as given, else the cached download, else downloaded now.

    Offline (no route to the host, or ``HF_HUB_OFFLINE=1``) it fails at once, naming the file and the cache.
    """
    if Path(tag).expanduser().is_file():
        return Path(tag).expanduser()
    pcfg = open_clip.get_pretrained_cfg(arch, tag)
    if not pcfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ModelError(f"model {name!r}: {tag!r} is neither a pretrained tag of {arch} nor a file. Its tags: {tags}")
    if pcfg.get("quick_gelu") and not config.get("quick_gelu"):
        warnings.warn(f"{name}: these weights were trained with QuickGELU, but {arch} builds plain GELU, so every "
                      f"feature is off; use openclip:{arch}-quickgelu/{tag}", UserWarning, stacklevel=3)
    hub = pcfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        folder = Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)
        for n in names:
            hit = try_to_load_from_cache(repo, n, cache_dir=str(folder))
            if isinstance(hit, str):
                return Path(hit)
        url, host, expected = f"https://huggingface.co/{repo}/resolve/main/{names[-1]}", "huggingface.co", names
        where = f"the Hugging Face cache {folder} (as models--{repo.replace('/', '--')}/snapshots/<revision>/<file>)"
    else:
        url = pcfg["url"]
        folder = Path(cache_dir) if cache_dir else Path(os.path.expanduser("~/.cache/clip"))
        target = folder / os.path.basename(urllib.parse.urlparse(url).path)
        if target.is_file():
            return target
        host, expected, where = urllib.parse.urlparse(url).hostname or "", [target.name], f"the folder {folder}"
    reason = _offline_reason(host)
    if reason is None:
        try:
            return Path(open_clip.download_pretrained(pcfg, cache_dir=str(folder) if cache_dir else None))
        except Exception as err:  # network errors of any library on the way
            reason = str(err).splitlines()[0]
    raise ModelError(
        f"could not load {name!r}: its checkpoint is not in the cache and could not be downloaded ({reason}).\n"
        f"  expected file: {' or '.join(expected)} in {where}\n"
        f"  to place it by hand, download {url}\n"
        f"  on a machine with internet, and give its path as the model: openclip:{arch}/PATH/TO/{expected[-1]}"
    )


def _offline_reason(host: str) -> str | None:
    """Why a download cannot start now (``HF_HUB_OFFLINE`` set, or no connection to ``host`` within 3 s), or None."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as err:
        return f"no connection to {host}: {err}"
    return None


def _load_openai(name: str, cache_dir: Path) -> CLIP:
    import clip

    target = cached_file(name, cache_dir)
    url = clip.clip._MODELS[name]
    try:
        model, _ = clip.load(name, device="cpu", jit=False, download_root=str(cache_dir))
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise ModelError(
            f"could not load CLIP model {name!r}: the checkpoint is not in the cache and could not be "
            f"downloaded ({err}).\n"
            f"  expected file: {target}\n"
            f"  to place it by hand, download {url}\n"
            f"  on a machine with internet and copy it to that path (or set {CACHE_ENV} or "
            f"model_cache to the folder that holds it)."
        ) from None
    return model.float()


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict in OpenAI's layout from a JIT archive, a state dict or a whole pickled model."""
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    if _is_jit_archive(path):
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        except (RuntimeError, ValueError) as err:
            raise ModelError(f"{path}: a TorchScript archive that cannot be loaded ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:  # a whole model pickled with torch.save: only load files you trust
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ModelError(f"{path}: not a CLIP checkpoint that torch can read ({err})") from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a state dict or a model, found {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if "token_embedding.weight" not in state or ("visual.proj" not in state and "visual.attnpool.c_proj.weight" not in state):
        raise ModelError(f"{path}: not a CLIP state dict in OpenAI's key layout (keys such as 'visual.proj' are missing)")
    return state


def _cast_like_openai(model: CLIP, dtype: torch.dtype) -> CLIP:
    """Half precision the way stock ``convert_weights`` does it: linear, conv, attention and projection
    weights only. openai-clip's LayerNorm computes in fp32 and keeps fp32 weights."""
    if dtype == torch.float32:
        return model.float()

    def cast(layer: torch.nn.Module) -> None:
        if isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            layer.weight.data = layer.weight.data.to(dtype)
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.to(dtype)
        if isinstance(layer, torch.nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v"):
                tensor = getattr(layer, attr)
                if tensor is not None:
                    tensor.data = tensor.data.to(dtype)
        for name in ("text_projection", "proj"):
            attr = getattr(layer, name, None)
            if isinstance(attr, torch.Tensor):
                attr.data = attr.data.to(dtype)

    model.apply(cast)
    return model


def _build(state: dict[str, torch.Tensor]) -> CLIP:
    """Architecture from the weights (stock ``build_model``), then the exact tensors back.

    ``build_model`` casts to fp16; reloading keeps an fp32 checkpoint exact.
    """
    from clip.model import build_model

    model = build_model(dict(state)).float()
    skip = {"input_resolution", "context_length", "vocab_size"}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items() if k not in skip})
    return model


def _is_jit_archive(path: Path) -> bool:
    """TorchScript archives are zip files with a ``constants.pkl`` or ``code/`` entry; state dicts have neither."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _random_model(arch: str, seed: int) -> CLIP:
    from clip.model import CLIP

    if arch not in RANDOM_ARCHS:
        raise ModelError(f"unknown random architecture {arch!r}; valid: {', '.join(RANDOM_ARCHS)}")
    embed, res, vlayers, vwidth, patch, twidth, theads, tlayers = RANDOM_ARCHS[arch]
    from pipeline.model.tokens import vocab

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIP(embed, res, vlayers, vwidth, patch, OPENAI_CONTEXT_LENGTH, vocab().size, twidth, theads, tlayers)


def model_statuses(cache_dir: Path) -> list[tuple[str, str]]:
    """``(name, status)`` for every known model name: shipped, random, or whether its checkpoint is cached.

    OpenCLIP's random architectures share one row, and one closing row says which families are refused.
    """
    rows, random_openclip = [], []
    for name in known_models():
        if name.startswith(RANDOM_OPENCLIP_PREFIX):
            random_openclip.append(name.removeprefix(RANDOM_OPENCLIP_PREFIX))
            continue
        if name == "toy":
            status = "shipped with clipsight"
        elif name.startswith("random:"):
            status = "random weights, for tests and timing"
        elif name.startswith(OPENCLIP_PREFIX):
            status = "OpenCLIP: downloaded through open_clip on first use (or openclip:ARCH/PATH to a file)"
        else:
            path = cached_file(name, cache_dir)
            status = f"cached: {path}" if path.is_file() else f"not cached (expected at {path})"
        rows.append((name, status))
    if random_openclip:
        rows.append(("random:openclip:ARCH", "random weights of an OpenCLIP architecture: " + ", ".join(random_openclip)))
        rows.append(("openclip: refused", "SigLIP, CLIPA, CoCa, EVA, MobileCLIP, ConvNeXt and other timm trunks, Hugging "
                                          "Face text towers: not CLIP's layout (loading one names why)"))
    else:
        rows.append(("openclip:ARCH/PRETRAINED", "needs the openclip extra: pip install -e '.[openclip]'"))
    return rows
