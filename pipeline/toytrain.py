"""Train the shipped toy CLIP on toy-world scenes, and measure it.

The recipe follows the one in the project's method notes: a small stock
``clip.model.CLIP``, contrastive training on captioned toy scenes, plus "noise"
captions of random tokens that must match no image, so that gradient ascent cannot
exploit the thousands of token embeddings the captions never use.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from clip.model import CLIP

from pipeline.images import normalize
from pipeline.textenc import encode_tokens
from pipeline.tokens import tokenize, vocab
from pipeline.toyworld import COLOURS, SHAPES, SceneSpec, caption_for, make_scene, scene_rng

TRAIN_SEED_STREAM = "train"
HELD_OUT_SEED = 1_000_003  # scene stream for held-out evaluation; training never draws from it


@dataclass(frozen=True)
class ToyArch:
    """Hyper-parameters of ``clip.model.CLIP`` for the toy model (heads = width / 64, as build_model infers)."""

    embed_dim: int = 128
    image_resolution: int = 64
    vision_layers: int = 4
    vision_width: int = 128
    vision_patch_size: int = 8
    context_length: int = 77
    transformer_width: int = 128
    transformer_heads: int = 2
    transformer_layers: int = 4


@dataclass(frozen=True)
class ToyTrainConfig:
    steps: int = 3000
    batch_size: int = 256
    noise_captions: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup: int = 200
    seed: int = 0
    workers: int = 0
    eval_every: int = 500


# Named recipes. "gpu" trained the shipped checkpoint. "cpu" is sized to finish within an
# hour on a small CPU: per scene, a step of 128 costs about 60% of one of 256 there (the
# larger batch falls out of cache), and the shorter schedule takes a higher peak lr.
RECIPES: dict[str, ToyTrainConfig] = {
    "gpu": ToyTrainConfig(steps=6000, batch_size=256, noise_captions=128, lr=5e-4),
    "cpu": ToyTrainConfig(steps=2800, batch_size=128, noise_captions=64, lr=1e-3),
}


def build_toy_model(arch: ToyArch = ToyArch()) -> CLIP:
    """A randomly initialised toy CLIP with the tokenizer's vocabulary."""
    a = arch
    return CLIP(
        a.embed_dim, a.image_resolution, a.vision_layers, a.vision_width, a.vision_patch_size,
        a.context_length, vocab().size, a.transformer_width, a.transformer_heads, a.transformer_layers,
    )


def class_prompts() -> tuple[list[str], list[tuple[str, str]]]:
    """The 36 colour+shape zero-shot prompts and their (colour, shape) pairs."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return [caption_for([p]) for p in pairs], pairs


def _batch(seed: int, k: int, cfg: ToyTrainConfig, spec: SceneSpec, context_length: int):
    """Batch ``k`` of stream ``seed``: a pure function of (seed, k)."""
    rng = scene_rng(seed, k, TRAIN_SEED_STREAM)  # type: ignore[arg-type]
    scenes = [make_scene(rng, spec) for _ in range(cfg.batch_size)]
    images = torch.from_numpy(np.stack([s.image for s in scenes]))  # [B, H, W, 3] uint8
    captions = [s.caption for s in scenes]
    v = vocab()
    noise = torch.zeros(cfg.noise_captions, context_length, dtype=torch.long)
    for i in range(cfg.noise_captions):
        n = int(rng.integers(1, 7))
        ids = rng.integers(0, v.size, n)
        ids = ids[(ids != v.sot) & (ids != v.eot)]
        seq = [v.sot, *ids.tolist(), v.eot]
        noise[i, : len(seq)] = torch.tensor(seq)
    return images, tokenize(captions, context_length), captions, noise


class _Batches(torch.utils.data.IterableDataset):
    def __init__(self, cfg: ToyTrainConfig, spec: SceneSpec, context_length: int):
        self.cfg, self.spec, self.context_length = cfg, spec, context_length

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for k in range(wid, self.cfg.steps, nw):  # the loader interleaves workers in order: batch k is k-th
            yield _batch(self.cfg.seed, k, self.cfg, self.spec, self.context_length)


def _lr_at(step: int, cfg: ToyTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def train_toy_clip(
    cfg: ToyTrainConfig,
    device: torch.device,
    on_step: Callable[[int, float, dict | None], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the toy CLIP.

    Args:
        cfg: the recipe.
        device: where to train.
        on_step: called as ``on_step(step, loss, eval_or_None)`` after every step.

    Returns:
        The fp16 state dict in OpenAI's key layout, and a card with the recipe,
        training time, device and held-out metrics.
    """
    torch.manual_seed(cfg.seed)
    arch = ToyArch()
    model = build_toy_model(arch).to(device).train()
    spec = SceneSpec(size=arch.image_resolution)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=cfg.lr
    )
    loader = torch.utils.data.DataLoader(
        _Batches(cfg, spec, arch.context_length), batch_size=None, num_workers=cfg.workers,
        persistent_workers=False, prefetch_factor=4 if cfg.workers else None,
    )
    start = time.time()
    history = []
    for step, (images, tokens, captions, noise) in enumerate(loader):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        x = normalize(images.to(device).permute(0, 3, 1, 2).float() / 255)
        img = F.normalize(model.encode_image(x), dim=-1)  # [B, D]
        txt = F.normalize(encode_tokens(model, torch.cat([tokens, noise]).to(device)), dim=-1)  # [B+N, D]
        scale = model.logit_scale.exp()
        logits = scale * img @ txt.T  # [B, B+N]
        keys = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        key = torch.tensor([keys[c] for c in captions], device=device)
        same = (key[:, None] == key[None, :]).float()  # duplicate captions are positives too
        target = same / same.sum(1, keepdim=True)
        pad = torch.zeros(len(captions), noise.shape[0], device=device)
        loss_i = -(torch.cat([target, pad], 1) * logits.log_softmax(1)).sum(1).mean()
        loss_t = -(target * logits[:, : len(captions)].T.log_softmax(1)).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        metrics = None
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            model.eval()
            metrics = zero_shot_accuracy(model, held_out_single_objects(200), device)
            model.train()
            history.append({"step": step + 1, "loss": round(loss.item(), 4), **metrics})
        if on_step:
            on_step(step, loss.item(), metrics)
    seconds = time.time() - start
    model.eval()
    card = {
        "name": "toy-clip",
        "arch": asdict(arch),
        "recipe": asdict(cfg),
        "seed": cfg.seed,
        "steps": cfg.steps,
        "train_seconds": round(seconds, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "history": history,
    }
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    return {k: v.detach().cpu() for k, v in state.items()}, card


def held_out_single_objects(count: int, style: str = "train", size: int = 64) -> list:
    """Single-object scenes from the held-out stream (never used for training)."""
    spec = SceneSpec(size=size, min_objects=1, max_objects=1, style=style)  # type: ignore[arg-type]
    return [make_scene(scene_rng(HELD_OUT_SEED, i, spec.style), spec) for i in range(count)]


@torch.no_grad()
def zero_shot_accuracy(model: torch.nn.Module, scenes: list, device: torch.device) -> dict[str, float]:
    """Zero-shot accuracy over the 36 colour+shape prompts on single-object scenes.

    Colour and shape accuracy marginalise the 36-way probabilities over the other word.
    """
    prompts, pairs = class_prompts()
    ctx = model.positional_embedding.shape[0]
    txt = F.normalize(encode_tokens(model, tokenize(prompts, ctx).to(device)).float(), dim=-1)
    res = model.visual.input_resolution
    images = torch.from_numpy(np.stack([s.image for s in scenes])).to(device).permute(0, 3, 1, 2).float() / 255
    if images.shape[-1] != res:
        images = F.interpolate(images, size=(res, res), mode="bicubic", align_corners=False).clamp(0, 1)
    img = F.normalize(model.encode_image(normalize(images).to(model.dtype)).float(), dim=-1)
    probs = (100 * img @ txt.T).softmax(-1).cpu()  # [N, 36]
    colours, shapes = list(COLOURS), list(SHAPES)
    col_idx = torch.tensor([colours.index(c) for c, _ in pairs])
    shp_idx = torch.tensor([shapes.index(s) for _, s in pairs])
    p_col = torch.zeros(len(scenes), len(colours)).index_add_(1, col_idx, probs)
    p_shp = torch.zeros(len(scenes), len(shapes)).index_add_(1, shp_idx, probs)
    truth = [s.objects[0].words for s in scenes]
    joint = np.mean([pairs[int(i)] == t for i, t in zip(probs.argmax(1), truth)])
    colour = np.mean([colours[int(i)] == t[0] for i, t in zip(p_col.argmax(1), truth)])
    shape = np.mean([shapes[int(i)] == t[1] for i, t in zip(p_shp.argmax(1), truth)])
    return {"joint36": round(float(joint), 4), "colour": round(float(colour), 4), "shape": round(float(shape), 4)}
