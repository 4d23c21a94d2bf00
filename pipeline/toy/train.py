"""Train the shipped toy CLIP on toy-world scenes, and measure it.

The recipe follows the one in the project's method notes: a small stock
``clip.model.CLIP``, contrastive training on captioned toy scenes, plus "noise"
captions of random tokens that must match no image, so that gradient ascent cannot
exploit the thousands of token embeddings the captions never use.

Recipes with ``dense_weight > 0`` add a patch-level term: every patch token (through
``ln_post`` and ``proj``, as the heatmaps read it) is classified against a fixed set
of captions, "a red circle.", "a red." and "a circle." for every colour and shape,
with every caption consistent with the object under the patch as a positive and a
learned "nothing" logit as the target of background patches. It teaches the patch
tokens local evidence, which the 8 px toy's global-only training never did. The
saved model is a stock ``CLIP``: the term changes the training, not the layout.

Training writes a resumable checkpoint (model, optimiser, step, history) every
``checkpoint_every`` steps; batch ``k`` is a pure function of the seed and ``k``, so a
resumed training sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from clip.model import CLIP

from pipeline.run.images import normalize
from pipeline.heatmaps.blocks import encode_image_tokens
from pipeline.heatmaps.similarity import feature_surgery
from pipeline.model.textenc import encode_tokens
from pipeline.model.tokens import tokenize, vocab
from pipeline.toy.world import COLOURS, SHAPES, SceneSpec, caption_for, make_scene, scene_rng

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
    arch: ToyArch = field(default_factory=ToyArch)
    dense_weight: float = 0.0  # weight of the patch-token term; 0 trains the global contrastive loss only
    checkpoint_every: int = 100
    teacher: str | None = None  # a toy checkpoint whose text tower is copied and frozen, and whose image embedding is distilled
    distill_weight: float = 0.0  # weight of 1 - cos(student image embedding, teacher image embedding)
    init_from_teacher: bool = False  # start the vision tower from the teacher's (see ``_init_vision``)
    surgery_weight: float = 0.0  # weight of the surgery pointing term (see ``surgery_pointing_loss``): the maps users see
    surgery_depth: int = 3  # blocks on the dual path for that term (the demo's surgery.surgery_depth)
    start_from: str | None = None  # a toy checkpoint of this architecture whose weights training starts from
    freeze_text: bool = False  # keep the text tower as loaded (from ``start_from``), so the words' embeddings stay put
    style: str = "train"  # the scenes' renderer (``pipeline.toy.world.Style``); "varied" draws fresh choices per scene
    max_scale: float = 0.40  # the largest object's diameter as a fraction of the image side
    class_weight: float = 0.0  # weight of the 36-way term: the image embedding against every colour+shape prompt
    fresh_vision: bool = False  # after ``start_from``, the vision tower starts again from a fresh initialisation


FINE = ToyArch(vision_patch_size=4, vision_layers=3)  # 16x16 patch grid on 64 px scenes
FINE4 = ToyArch(vision_patch_size=4)  # the same grid with the 8x8 toy's four vision blocks, so they can be its

# Named recipes. "gpu" trained the 8 px checkpoint. "cpu" is sized to finish within an
# hour on a small CPU: per scene, a step of 128 costs about 60% of one of 256 there (the
# larger batch falls out of cache), and the shorter schedule takes a higher peak lr.
# The "fine-" recipes train the 16x16-grid model with the patch-token term.
RECIPES: dict[str, ToyTrainConfig] = {
    "gpu": ToyTrainConfig(steps=6000, batch_size=256, noise_captions=128, lr=5e-4),
    "cpu": ToyTrainConfig(steps=2800, batch_size=128, noise_captions=64, lr=1e-3),
    "fine-gpu": ToyTrainConfig(steps=8000, batch_size=256, noise_captions=128, lr=5e-4, arch=FINE, dense_weight=1.0),
    "fine-cpu": ToyTrainConfig(steps=4000, batch_size=64, noise_captions=32, lr=1e-3, arch=FINE, dense_weight=1.0,
                               warmup=150),
    # The 16x16-grid vision tower trained against a teacher (``--teacher``, the 8x8-grid toy): its text tower is
    # copied and frozen, so only the vision tower learns, from the teacher's image embedding, the captions and
    # the patch term. Sized for a 2-core CPU.
    "distill-cpu": ToyTrainConfig(steps=2500, batch_size=64, noise_captions=32, lr=1e-3, arch=FINE, dense_weight=1.0,
                                  warmup=100, distill_weight=4.0, eval_every=250),
    # The same, with the vision tower started from the teacher's: its blocks, and its patch embedding and
    # positional embedding resampled to the 16x16 grid.
    "distill-init-cpu": ToyTrainConfig(steps=1500, batch_size=64, noise_captions=32, lr=3e-4, arch=FINE4,
                                       dense_weight=1.0, warmup=50, distill_weight=4.0, eval_every=100,
                                       init_from_teacher=True),
    # Continues a distill-init-cpu model (``--start-from``) with the surgery pointing term: the patch term trains
    # only the stock path, while the maps users see come from feature surgery on the v-v path of the last blocks.
    "surgery-cpu": ToyTrainConfig(steps=600, batch_size=64, noise_captions=32, lr=2e-4, arch=FINE4,
                                  dense_weight=1.0, warmup=20, distill_weight=4.0, eval_every=100,
                                  surgery_weight=1.0, surgery_depth=3),
    # Continues a trained toy (``--start-from``, e.g. the shipped one) on the "varied" renderer, with its text
    # tower frozen and the patch and surgery terms kept, so it learns shapes and colours drawn in many ways
    # while its words and its maps stay where they were.
    "varied-cpu": ToyTrainConfig(steps=1200, batch_size=64, noise_captions=32, lr=2e-4, arch=FINE4,
                                 dense_weight=1.0, warmup=50, eval_every=100, surgery_weight=1.0, surgery_depth=3,
                                 freeze_text=True, style="varied", max_scale=0.45),
    # Continues a toy (``--start-from``, e.g. a varied-cpu one) on training-style and varied scenes, half each,
    # adding the 36-way term: the contrastive loss sees a shape's other five only when a batch happens to hold
    # them, while zero-shot use asks the image embedding to beat all 35 other colour+shape prompts.
    "mixed-cpu": ToyTrainConfig(steps=1000, batch_size=64, noise_captions=32, lr=3e-4, arch=FINE4,
                                dense_weight=1.0, warmup=50, eval_every=100, surgery_weight=1.0, surgery_depth=3,
                                freeze_text=True, style="mixed", max_scale=0.45, class_weight=1.0),
    # For a GPU (tests/benchmarks/gpu_toytrain.py runs both under a time limit): a vision tower trained from scratch
    # against the text tower of ``--start-from`` (the shipped toy's, frozen), on training-style, varied and alt
    # scenes, with the patch and 36-way terms; then "scratch-surgery-gpu" continues it with the surgery term too.
    "scratch-gpu": ToyTrainConfig(steps=6000, batch_size=256, noise_captions=128, lr=5e-4, arch=FINE4,
                                  dense_weight=1.0, warmup=200, eval_every=500, freeze_text=True, fresh_vision=True,
                                  style="blend", max_scale=0.45, class_weight=1.0),
    "scratch-surgery-gpu": ToyTrainConfig(steps=1000, batch_size=256, noise_captions=128, lr=2e-4, arch=FINE4,
                                          dense_weight=1.0, warmup=50, eval_every=250, surgery_weight=1.0,
                                          surgery_depth=3, freeze_text=True, style="blend", max_scale=0.45,
                                          class_weight=1.0),
}

TEXT_TOWER = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection", "logit_scale")



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


def dense_captions() -> tuple[list[str], np.ndarray, np.ndarray]:
    """The patch term's captions, and which of them each colour and shape is consistent with.

    Returns:
        The captions (36 colour+shape, 6 colour-only, 6 shape-only), and boolean tables
        ``[colours, captions]`` and ``[shapes, captions]``: caption j fits an object of
        colour c and shape s when ``by_colour[c, j] & by_shape[s, j]``.
    """
    colours, shapes = list(COLOURS), list(SHAPES)
    entries = [(c, s) for c in colours for s in shapes] + [(c, None) for c in colours] + [(None, s) for s in shapes]
    captions = [caption_for([(c, s)]) if c and s else f"a {c or s}." for c, s in entries]
    by_colour = np.array([[e[0] in (None, c) for e in entries] for c in colours])
    by_shape = np.array([[e[1] in (None, s) for e in entries] for s in shapes])
    return captions, by_colour, by_shape


def class_targets(scenes: list) -> torch.Tensor:
    """``[N, 36]``: for each scene, an even share over the colour+shape prompts of its objects (``class_prompts`` order)."""
    pairs = {p: i for i, p in enumerate(class_prompts()[1])}
    out = torch.zeros(len(scenes), len(pairs))
    for n, scene in enumerate(scenes):
        for obj in scene.objects:
            out[n, pairs[obj.words]] = 1.0
    return out / out.sum(1, keepdim=True)


def patch_targets(scene, patch: int) -> np.ndarray:
    r"""For each patch, the index of the object covering at least half of it, else -1.

    Shape:
        - Output: :math:`(H / patch \cdot W / patch,)` int, patches in row-major order.
    """
    h, w = scene.image.shape[:2]
    out = np.full((h // patch, w // patch), -1, dtype=np.int64)
    for i, obj in enumerate(scene.objects):
        cover = obj.mask[: h // patch * patch, : w // patch * patch].reshape(h // patch, patch, w // patch, patch).mean((1, 3))
        out[cover >= 0.5] = i
    return out.reshape(-1)


def word_patch_masks(scenes: list, patch: int) -> torch.Tensor:
    """``[B, words, patches]`` bool, words as ``COLOURS + SHAPES`` (the order of the one-word captions of
    ``dense_captions``): the patches that an object with that word covers at least half of."""
    words = list(COLOURS) + list(SHAPES)
    masks = []
    for scene in scenes:
        idx = patch_targets(scene, patch)
        m = np.zeros((len(words), len(idx)), dtype=bool)
        for i, obj in enumerate(scene.objects):
            for w in obj.words:
                m[words.index(w)] |= idx == i
        masks.append(m)
    return torch.from_numpy(np.stack(masks))


def surgery_pointing_loss(tokens: torch.Tensor, word_text: torch.Tensor, masks: torch.Tensor, scale: torch.Tensor,
                          distractors: int, gen: torch.Generator) -> torch.Tensor:
    """How far each present word's feature-surgery map, as a softmax over patches, misses its objects.

    Each scene's labels are its words plus ``distractors`` absent ones (as decode's labels hold words
    that are not there); the maps are ``feature_surgery`` over those labels, as the surgery stage draws
    them, and the loss is ``-log`` of the map's softmax mass on the patches of the word's objects.

    Shape:
        - tokens: :math:`(B, 1 + P, D)` surgery-path tokens; word_text: :math:`(W, D)`; masks: :math:`(B, W, P)`.
    """
    losses = []
    for b in range(tokens.shape[0]):
        present = masks[b].any(-1)
        absent = (~present).nonzero()[:, 0]
        here = present.nonzero()[:, 0]
        labels = torch.cat([here, absent[torch.randperm(len(absent), generator=gen)[:distractors]].to(here.device)])
        sim = feature_surgery(tokens[b : b + 1], word_text[labels])[0, 1:, : len(here)]  # [P, present]
        logp = (scale * sim.T).log_softmax(-1)  # [present, P]
        losses.append(-logp.masked_fill(~masks[b][here], float("-inf")).logsumexp(-1).mean())
    return torch.stack(losses).mean()


def _dense_target_table(scenes: list, patch: int) -> torch.Tensor:
    """``[B, patches, captions + 1]``: a uniform distribution over each patch's consistent captions,
    or all mass on the last column ("nothing") for a background patch."""
    _, by_colour, by_shape = dense_captions()
    colours, shapes = list(COLOURS), list(SHAPES)
    rows = []
    for scene in scenes:
        idx = patch_targets(scene, patch)
        table = np.zeros((len(idx), by_colour.shape[1] + 1), dtype=np.float32)
        table[idx < 0, -1] = 1
        for i, obj in enumerate(scene.objects):
            fits = by_colour[colours.index(obj.colour)] & by_shape[shapes.index(obj.shape)]
            table[idx == i, :-1] = fits / fits.sum()
        rows.append(table)
    return torch.from_numpy(np.stack(rows))


def _batch(seed: int, k: int, cfg: ToyTrainConfig, spec: SceneSpec, context_length: int):
    """Batch ``k`` of stream ``seed``: a pure function of (seed, k)."""
    rng = scene_rng(seed, k, TRAIN_SEED_STREAM)  # type: ignore[arg-type]
    scenes = [make_scene(rng, spec) for _ in range(cfg.batch_size)]
    dense = _dense_target_table(scenes, cfg.arch.vision_patch_size) if cfg.dense_weight else torch.zeros(0)
    words = word_patch_masks(scenes, cfg.arch.vision_patch_size) if cfg.surgery_weight else torch.zeros(0)
    classes = class_targets(scenes) if cfg.class_weight else torch.zeros(0)
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
    return images, tokenize(captions, context_length), captions, noise, dense, words, classes


class _Batches(torch.utils.data.IterableDataset):
    def __init__(self, cfg: ToyTrainConfig, spec: SceneSpec, context_length: int, start: int = 0):
        self.cfg, self.spec, self.context_length, self.start = cfg, spec, context_length, start

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for k in range(self.start + wid, self.cfg.steps, nw):  # the loader interleaves workers in order
            yield _batch(self.cfg.seed, k, self.cfg, self.spec, self.context_length)


def _load_teacher(cfg: ToyTrainConfig, model: CLIP, device: torch.device) -> CLIP | None:
    """The recipe's teacher, in eval mode, after copying its text tower into ``model`` and freezing it there."""
    if cfg.teacher is None:
        return None
    from clip.model import build_model

    state = torch.load(cfg.teacher, map_location="cpu", weights_only=True)
    teacher = build_model(state).float().to(device).eval().requires_grad_(False)
    if teacher.visual.input_resolution != cfg.arch.image_resolution:
        raise ValueError(f"teacher {cfg.teacher} sees {teacher.visual.input_resolution} px, the recipe {cfg.arch.image_resolution} px")
    mine = model.state_dict()
    text = {k: v.float() for k, v in teacher.state_dict().items() if k.startswith(TEXT_TOWER)}
    if any(mine[k].shape != v.shape for k, v in text.items()):
        raise ValueError(f"teacher {cfg.teacher}'s text tower does not fit the recipe's architecture")
    model.load_state_dict(text, strict=False)
    for n, p in model.named_parameters():
        if n.startswith(TEXT_TOWER):
            p.requires_grad_(False)
    if cfg.init_from_teacher:
        _init_vision(model, teacher)
    return teacher


def _load_start(cfg: ToyTrainConfig, model: CLIP) -> None:
    """Load ``cfg.start_from``'s weights into ``model``, which must have its architecture."""
    state = torch.load(cfg.start_from, map_location="cpu", weights_only=True)
    mine = model.state_dict()
    if set(state) != set(mine) or any(mine[k].shape != v.shape for k, v in state.items()):
        raise ValueError(f"--start-from {cfg.start_from} is not a toy checkpoint of the recipe's architecture")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


def _init_vision(model: CLIP, teacher: CLIP) -> None:
    """Start ``model``'s vision tower from ``teacher``'s, at a finer patch grid.

    Blocks, class embedding, layer norms and projection are copied. Each patch-embedding kernel
    is summed over the blocks of the teacher's kernel that a smaller patch covers, so a patch of
    flat colour embeds as the teacher's larger patch of it does; the positional embedding of the
    grid is resized bilinearly.

    Raises:
        ValueError: widths or block counts differ, or the student's patch does not divide the teacher's.
    """
    mine, theirs = model.visual, teacher.visual
    k_t, k_s = theirs.conv1.kernel_size[0], mine.conv1.kernel_size[0]
    if (mine.conv1.out_channels != theirs.conv1.out_channels or len(mine.transformer.resblocks) != len(theirs.transformer.resblocks)
            or k_t % k_s):
        raise ValueError("init_from_teacher needs the teacher's width and vision blocks, and a patch that divides its patch")
    f = k_t // k_s
    with torch.no_grad():
        w = theirs.conv1.weight.float()  # [C, 3, k_t, k_t]
        mine.conv1.weight.copy_(w.view(w.shape[0], 3, k_s, f, k_s, f).sum((3, 5)))
        pos = theirs.positional_embedding.float()
        g_t, g_s = int(round((pos.shape[0] - 1) ** 0.5)), int(round((mine.positional_embedding.shape[0] - 1) ** 0.5))
        grid = pos[1:].T.reshape(1, -1, g_t, g_t)
        grid = F.interpolate(grid, size=(g_s, g_s), mode="bilinear", align_corners=False).reshape(-1, g_s * g_s).T
        mine.positional_embedding.copy_(torch.cat([pos[:1], grid]))
        for name in ("class_embedding", "proj"):
            getattr(mine, name).copy_(getattr(theirs, name).float())
        for name in ("ln_pre", "ln_post", "transformer"):
            getattr(mine, name).load_state_dict({k: v.float() for k, v in getattr(theirs, name).state_dict().items()})


def teacher_reference(path: str | None) -> dict | None:
    """How a card names its teacher: the file's name and hash, not where it lay on the training machine."""
    if path is None:
        return None
    import hashlib

    return {"file": Path(path).name, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def start_reference(path: str | None) -> dict | None:
    """How a card names the checkpoint it started from: its name and hash, and its own card when one lies
    beside it (``.json``), so a model trained in stages keeps every stage's recipe and history."""
    ref = teacher_reference(path)
    card = Path(path).with_suffix(".json") if path else None
    if ref is not None and card is not None and card.is_file():
        ref["card"] = json.loads(card.read_text())
    return ref


def _lr_at(step: int, cfg: ToyTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def _save_checkpoint(path: Path, model: CLIP, opt: torch.optim.Optimizer, null: torch.Tensor, step: int,
                     history: list, seconds: float, cfg: ToyTrainConfig) -> None:
    """Everything a resumed training needs, written to a temporary name and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "null": null.detach().cpu(), "step": step,
                "history": history, "seconds": seconds, "recipe": asdict(cfg)}, tmp)
    os.replace(tmp, path)


def train_toy_clip(
    cfg: ToyTrainConfig,
    device: torch.device,
    on_step: Callable[[int, float, dict | None], None] | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    time_limit: float | None = None,
    checkpoint_seconds: float | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the toy CLIP.

    Args:
        cfg: the recipe.
        device: where to train.
        on_step: called as ``on_step(step, loss, eval_or_None)`` after every step.
        checkpoint: where to write a resumable checkpoint every ``cfg.checkpoint_every`` steps.
        resume: continue from ``checkpoint`` when it exists; its recipe must equal ``cfg``
            except for ``workers``.
        time_limit: stop after the step that passes this many seconds of this session (a checkpoint is written
            then), so a run on borrowed time ends with a usable model; the card says where it stopped.
        checkpoint_seconds: also write the checkpoint whenever this many seconds have passed since the last.

    Returns:
        The fp16 state dict in OpenAI's key layout, and a card with the recipe,
        training time (summed over resumed sessions), device and held-out metrics.
    """
    torch.manual_seed(cfg.seed)
    arch = cfg.arch
    model = build_toy_model(arch).to(device).train()
    spec = SceneSpec(size=arch.image_resolution, max_scale=cfg.max_scale, style=cfg.style)  # type: ignore[arg-type]
    null = torch.zeros((), device=device, requires_grad=True)  # the "nothing" logit of background patches
    teacher = _load_teacher(cfg, model, device)
    if cfg.start_from is not None:
        _load_start(cfg, model)
    if cfg.fresh_vision:  # the architecture's fresh vision tower (the seed's), whatever ``start_from`` held
        model.visual.load_state_dict(build_toy_model(arch).visual.state_dict())
    if cfg.freeze_text:
        for n, p in model.named_parameters():
            if n.startswith(TEXT_TOWER):
                p.requires_grad_(False)
    text_trains = teacher is None and not cfg.freeze_text
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in trained if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest + [null], "weight_decay": 0.0}], lr=cfg.lr
    )
    first, history, before = 0, [], 0.0
    if resume and checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        mine = {k: v for k, v in asdict(cfg).items() if k != "workers"}
        theirs = {k: v for k, v in saved["recipe"].items() if k != "workers"}
        if mine != theirs:
            diff = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise ValueError(f"{checkpoint} was made with another recipe (differs in: {', '.join(diff)})")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        with torch.no_grad():
            null.copy_(saved["null"])
        first, history, before = saved["step"], saved["history"], saved["seconds"]
    loader = torch.utils.data.DataLoader(
        _Batches(cfg, spec, arch.context_length, first), batch_size=None, num_workers=cfg.workers,
        persistent_workers=False, prefetch_factor=4 if cfg.workers else None,
    )
    dense_text = (tokenize(dense_captions()[0], arch.context_length)
                  if cfg.dense_weight or cfg.surgery_weight or cfg.class_weight else None)
    word_caption = len(COLOURS) * len(SHAPES)  # the one-word captions follow the 36 pairs in dense_captions
    start = saved_at = time.time()
    stopped_at = None
    for step, (images, tokens, captions, noise, dense, words, classes) in enumerate(loader, start=first):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        x = normalize(images.to(device).permute(0, 3, 1, 2).float() / 255)
        texts = [tokens, noise] + ([dense_text] if dense_text is not None else [])
        with torch.set_grad_enabled(text_trains):
            txt = F.normalize(encode_tokens(model, torch.cat(texts).to(device)), dim=-1)  # [B+N(+K), D]
        if cfg.dense_weight or cfg.surgery_weight:
            both = encode_image_tokens(model, x, surgery_depth=cfg.surgery_depth if cfg.surgery_weight else 0)
            tokens_all = both.raw  # [B, 1+G*G, D]
            img = F.normalize(tokens_all[:, 0], dim=-1)  # [B, D], equal to encode_image
        else:
            img = F.normalize(model.encode_image(x), dim=-1)  # [B, D]
        scale = model.logit_scale.exp()
        b = len(captions)
        logits = scale * img @ txt[: b + noise.shape[0]].T  # [B, B+N]
        keys = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        key = torch.tensor([keys[c] for c in captions], device=device)
        same = (key[:, None] == key[None, :]).float()  # duplicate captions are positives too
        target = same / same.sum(1, keepdim=True)
        pad = torch.zeros(b, noise.shape[0], device=device)
        loss_i = -(torch.cat([target, pad], 1) * logits.log_softmax(1)).sum(1).mean()
        loss_t = -(target * logits[:, :b].T.log_softmax(1)).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        if teacher is not None and cfg.distill_weight:
            with torch.no_grad():
                target_img = F.normalize(teacher.encode_image(x).float(), dim=-1)
            loss = loss + cfg.distill_weight * (1 - (img * target_img).sum(-1)).mean()
        if cfg.dense_weight:
            patches = F.normalize(tokens_all[:, 1:], dim=-1)  # [B, G*G, D]
            dense_logits = scale * patches @ txt[b + noise.shape[0]:].T  # [B, G*G, K]
            dense_logits = torch.cat([dense_logits, null.expand(*dense_logits.shape[:2], 1)], -1)  # [B, G*G, K+1]
            loss = loss + cfg.dense_weight * -(dense.to(device) * dense_logits.log_softmax(-1)).sum(-1).mean()
        if cfg.class_weight:  # the 36 colour+shape captions lead dense_captions, in class_prompts' order
            class_logits = scale * img @ txt[b + noise.shape[0] : b + noise.shape[0] + word_caption].T  # [B, 36]
            loss = loss + cfg.class_weight * -(classes.to(device) * class_logits.log_softmax(1)).sum(1).mean()
        if cfg.surgery_weight:
            word_text = txt[b + noise.shape[0] + word_caption :]  # [colours + shapes, D]
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            loss = loss + cfg.surgery_weight * surgery_pointing_loss(both.surgery, word_text, words.to(device), scale, 2, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        now = time.time()
        out_of_time = time_limit is not None and now - start >= time_limit and step + 1 < cfg.steps
        metrics = None
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps or out_of_time):
            model.eval()  # a time limit's stop is scored too: the curve ends where the model does
            with torch.no_grad():
                metrics = zero_shot_accuracy(model, held_out_single_objects(200), device)
            model.train()
            history.append({"step": step + 1, "loss": round(loss.item(), 4), **metrics})
        if checkpoint is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or out_of_time
                                       or (checkpoint_seconds is not None and now - saved_at >= checkpoint_seconds)):
            _save_checkpoint(checkpoint, model, opt, null, step + 1, history, before + now - start, cfg)
            saved_at = now
        if on_step:
            on_step(step, loss.item(), metrics)
        if out_of_time:
            stopped_at = step + 1
            break
    seconds = before + time.time() - start
    model.eval()
    card = {
        "name": "toy-clip",
        "arch": asdict(arch),
        "recipe": {**asdict(cfg), "teacher": teacher_reference(cfg.teacher), "start_from": start_reference(cfg.start_from)},
        "seed": cfg.seed,
        "steps": cfg.steps,
        "train_seconds": round(seconds, 1),
        "resumed_at": first or None,
        "stopped_at": stopped_at,  # the step a time limit ended it at, before the recipe's ``steps``
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


def image_embeddings(model: torch.nn.Module, scenes: list, device: torch.device) -> torch.Tensor:
    """``[N, D]`` float ``encode_image`` of the scenes' images, resized to the model's side when they differ."""
    res = model.visual.input_resolution
    images = torch.from_numpy(np.stack([s.image for s in scenes])).to(device).permute(0, 3, 1, 2).float() / 255
    if images.shape[-1] != res:
        images = F.interpolate(images, size=(res, res), mode="bicubic", align_corners=False).clamp(0, 1)
    return model.encode_image(normalize(images).to(model.dtype)).float()


def zero_shot_accuracy(model: torch.nn.Module, scenes: list, device: torch.device) -> dict[str, float]:
    """Zero-shot accuracy over the 36 colour+shape prompts on single-object scenes.

    Colour and shape accuracy marginalise the 36-way probabilities over the other word.
    """
    prompts, pairs = class_prompts()
    ctx = model.positional_embedding.shape[0]
    txt = F.normalize(encode_tokens(model, tokenize(prompts, ctx).to(device)).float(), dim=-1)
    img = F.normalize(image_embeddings(model, scenes, device), dim=-1)
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


def resolve_recipe(recipe: str, device: torch.device, **overrides) -> tuple[str, ToyTrainConfig]:
    """The named recipe (``auto``: ``fine-gpu`` on CUDA, else ``fine-cpu``) with the non-``None`` overrides.

    Raises:
        ValueError: an unknown recipe name, with the valid ones.
    """
    name = ("fine-gpu" if device.type == "cuda" else "fine-cpu") if recipe == "auto" else recipe
    if name not in RECIPES:
        raise ValueError(f"unknown --recipe {recipe!r}; choose one of: auto, {', '.join(RECIPES)}")
    cfg = replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})
    if cfg.distill_weight and cfg.teacher is None:
        raise ValueError(f"recipe {name} distils a teacher: pass --teacher, a toy checkpoint such as the 8x8-grid toy")
    if (cfg.surgery_weight or cfg.freeze_text) and not cfg.init_from_teacher and cfg.start_from is None:
        raise ValueError(f"recipe {name} continues a trained model: pass --start-from, e.g. a distill-init-cpu checkpoint")
    if cfg.teacher is not None and not Path(cfg.teacher).is_file():
        raise ValueError(f"--teacher {cfg.teacher}: no such file")
    if cfg.start_from is not None and not Path(cfg.start_from).is_file():
        raise ValueError(f"--start-from {cfg.start_from}: no such file")
    return name, cfg


def save_toy_checkpoint(out: Path, state: dict[str, torch.Tensor], card: dict) -> Path:
    """The state dict at ``out`` and its card beside it as ``.json``, each written atomically; returns the card's path."""
    from pipeline.run.rundir import atomic_path, atomic_write_json

    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    atomic_write_json(out.with_suffix(".json"), card)
    return out.with_suffix(".json")
