"""ascend: CLIP's "opinion" of an image, by gradient ascent on text-token choices.

The objective is the original's: Gumbel-softmax (tau 1000, hard one-hot, straight-
through gradient) over the vocabulary for a few learned token slots, Adam at lr 5,
loss = -100 x the mean cosine between the text feature and augmented views of the
image. What differs, and why:

* the text feature is read at the first EOT, where stock ``encode_text`` pools (the
  original read the second EOT; ``readout: seed`` reproduces that);
* the augmented views are encoded once into a bank and sampled each step: the loss
  is linear in the mean of the unit view features, so this is the same objective;
* only the learned slots meet the vocabulary, and only the causal prefix up to the
  read-out runs through the text transformer;
* many images are optimised in one batch, each with its own random streams, so an
  image's result never depends on what it was batched with;
* SOT and EOT can never be chosen, so the optimised tokens are exactly what stock
  ``encode_text`` would score.

One ascent on the whole image finds the concept that dominates its embedding, and the
rest of a scene is lost. ``discover_opinions`` looks further (``discover``): by default
through a view of each object region beside the whole image (``pipeline.model.discovery``), all
in one ascent batch; or through a fixed grid of tiles; or in rounds that explain the words found
so far away from the target.
``discover: whole`` is the original's single ascent.
"""

from __future__ import annotations

import csv
import hashlib
import io
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Callable, Literal

from pipeline.lazy import lazy_module
from pipeline.run.config import require
from pipeline.model.encode import explain_away, load_batch, rescore_texts, view_features, word_directions
from pipeline.run.images import ImageRef, normalize
from pipeline.model.load import LoadedModel
from pipeline.run.rundir import atomic_write_json, atomic_write_text
from pipeline.run.stage import BAD_INPUT, Finish, ItemResult, PerImageStage, StageContext
from pipeline.model.textenc import encode_text_embeddings
from pipeline.heatmaps.blocks import encode_image_tokens
from pipeline.model.discovery import WHOLE, Opinion, merge_views, object_boxes, tile_boxes, tile_views
from pipeline.model.tokens import STOP_WORDS, allowed_token_ids, clean_words, vocab

K = lazy_module("kornia.augmentation")
torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")


@dataclass(frozen=True)
class AscentConfig:
    """Settings of the ascend stage (defaults are the original's, but for ``discover``: the original's is ``whole``)."""

    method: Literal["gumbel", "pez"] = "gumbel"  # the original's Gumbel-softmax, or PEZ projected embeddings
    prefix: str = ""  # prompt text placed before the learned tokens
    tokens: int = 5  # learned token slots
    candidates: int = 16  # independent candidate prompts per image
    iterations: int = 400  # optimisation steps per image
    lr: float = 5.0  # Adam, for gumbel
    pez_lr: float = 0.1  # AdamW, for pez (the PEZ paper's defaults)
    pez_weight_decay: float = 0.1  # AdamW weight decay, for pez
    gumbel_tau: float = 1000.0  # Gumbel-softmax temperature, for gumbel
    views: int = 64  # augmented views averaged per step
    bank_size: int = 256  # augmented views encoded once per image
    degrees: float = 10.0  # RandomAffine rotation range
    translate: float = 0.1  # RandomAffine translation, fraction of the side
    augment_p: float = 0.8  # probability a view is transformed
    readout: Literal["eot", "seed"] = "eot"  # first EOT (stock CLIP) or the original's second EOT
    checkin_every: int = 10  # steps between word check-ins (the words' appearances, the CSV's rows)
    block_words: tuple[str, ...] = ()  # any token containing one of these is never chosen
    whole_words_only: bool = False  # allow only tokens that are whole words
    batch_size: int = 0  # images optimised together; 0 = 4 on CPU, on CUDA as many as fit (up to 128); halves on out-of-memory
    enabled: bool = True  # false (--no-ascent): no gradient ascent; each opinion is empty and the labels are decode.words' alone, a fast closed-set run
    discover: Literal["regions", "tiles", "explain", "whole"] = "regions"  # past the dominant concept: a view of each object region beside the whole image, a grid of tile views instead, rounds that explain found words away, or the original's one whole-image ascent
    regions: int = 4  # discover regions: at most this many object regions per image, largest first
    tiles: int = 2  # discover tiles: tiles per side of the grid
    tile_size: float = 0.625  # discover tiles: a tile's side, as a fraction of the image's
    tile_candidates: int = 3  # discover regions or tiles: candidate prompts per region or tile
    tile_bank: int = 16  # discover regions or tiles: augmented views encoded per region or tile (and averaged per step)
    rounds: int = 2  # discover explain: ascents per image, each with the words found before removed from its target
    explain_min_frequency: int = 3  # discover explain: a word this frequent among a round's candidates is explained away

    def __post_init__(self) -> None:
        require(self.tokens >= 1, f"ascend.tokens must be >= 1, got {self.tokens}")
        require(self.candidates >= 1, f"ascend.candidates must be >= 1, got {self.candidates}")
        require(self.iterations >= 1, f"ascend.iterations must be >= 1, got {self.iterations}")
        require(self.lr > 0, f"ascend.lr must be > 0, got {self.lr}")
        require(self.pez_lr > 0, f"ascend.pez_lr must be > 0, got {self.pez_lr}")
        require(self.gumbel_tau > 0, f"ascend.gumbel_tau must be > 0, got {self.gumbel_tau}")
        require(1 <= self.views <= self.bank_size, f"ascend.views must be in 1..bank_size ({self.bank_size}), got {self.views}")
        require(0 <= self.augment_p <= 1, f"ascend.augment_p must be in [0, 1], got {self.augment_p}")
        require(self.checkin_every >= 1, f"ascend.checkin_every must be >= 1, got {self.checkin_every}")
        require(self.batch_size >= 0, f"ascend.batch_size must be >= 0 (0 = auto), got {self.batch_size}")
        require(self.regions >= 1, f"ascend.regions must be >= 1, got {self.regions}")
        require(self.tiles >= 1, f"ascend.tiles must be >= 1, got {self.tiles}")
        require(0 < self.tile_size <= 1, f"ascend.tile_size must be in (0, 1], got {self.tile_size}")
        require(self.tile_candidates >= 1, f"ascend.tile_candidates must be >= 1, got {self.tile_candidates}")
        require(self.tile_bank >= 1, f"ascend.tile_bank must be >= 1, got {self.tile_bank}")
        require(self.rounds >= 1, f"ascend.rounds must be >= 1, got {self.rounds}")
        require(self.explain_min_frequency >= 1, f"ascend.explain_min_frequency must be >= 1, got {self.explain_min_frequency}")


AUTO_BATCH_CUDA = 128  # the automatic batch size's cap on CUDA (memory permitting)
AUTO_BATCH_CPU = 4  # the automatic batch size on the CPU


def ascent_bytes_per_image(cfg: AscentConfig, vocab_size: int) -> int:
    """Estimated memory that one more image adds to a batch: the vocabulary-sized fp32 tensors.

    Gumbel holds seven of shape ``[candidates, tokens, V]``: the logits, their gradient, Adam's two
    moments, the noise buffer, the soft sample the backward keeps (on the CPU it reuses the noise
    buffer; compiled on CUDA it is its own tensor) and the backward's product with the table, with
    one to spare for the allocator. PEZ holds one, the similarity to every token, counted twice for
    headroom. An image's tiles or regions (``discover: tiles``, ``regions``) add their candidates. The rest (the view bank,
    the short text prefix's activations) is small beside these.
    """
    boxed = {"tiles": cfg.tiles ** 2, "regions": cfg.regions}.get(cfg.discover, 0)
    slots = cfg.candidates + boxed * cfg.tile_candidates
    per_slot = slots * cfg.tokens * vocab_size * 4
    return (7 if cfg.method == "gumbel" else 2) * per_slot


def image_seed(seed: int, image_id: str) -> int:
    """A per-image seed: the same image gets the same streams whatever it is batched with."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{image_id}".encode()).digest()[:7], "little")


def _encode_views(lm: LoadedModel, image: torch.Tensor, cfg: AscentConfig, seed: int, chunk: int = 64) -> torch.Tensor:
    """The bank: ``bank_size`` RandomAffine views of one image, encoded once, unit-normalised. ``[bank, D]``."""
    aug = K.RandomAffine(degrees=cfg.degrees, translate=(cfg.translate, cfg.translate), p=cfg.augment_p)
    devices = [lm.device] if lm.device.type == "cuda" else []
    feats = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, cfg.bank_size, chunk):
            n = min(chunk, cfg.bank_size - start)
            views = aug(image[None].expand(n, -1, -1, -1))
            with torch.no_grad():
                f = lm.clip.encode_image(normalize(views).to(lm.dtype)).float()
            feats.append(F.normalize(f, dim=-1))
    return torch.cat(feats)


def view_banks(lm: LoadedModel, images: torch.Tensor, seeds: list[int], cfg: AscentConfig) -> torch.Tensor:
    """Each image's bank (``_encode_views``), stacked. ``[B, bank, D]``."""
    return torch.stack([_encode_views(lm, images[b].to(lm.device), cfg, seeds[b]) for b in range(images.shape[0])])


def _words_of(texts: list[str]) -> tuple[Counter, Counter]:
    """(occurrences across the texts, number of texts containing each word)."""
    occ, cand = Counter(), Counter()
    for t in texts:
        ws = clean_words(t)
        occ.update(ws)
        cand.update(set(ws))
    return occ, cand


def fast_dtype(lm: LoadedModel) -> torch.dtype:
    """The dtype of ascent's large products: on CUDA the model's, with bf16 standing in for fp32
    (as the text passes' autocast gives it); on the CPU, fp32."""
    if lm.device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if lm.dtype == torch.float32 else lm.dtype


def prompt_frame(lm: LoadedModel, prefix_ids: list[int], readout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed embeddings around the learned slots: ``[SOT] + prefix`` before them, ``[EOT]`` after
    (two for ``readout: seed``, the original's second EOT). Built once per batch: building them in the
    loop would copy ids to the device, and wait for it, at every step."""
    v, emb = vocab(), lm.clip.token_embedding.weight
    eots = 2 if readout == "seed" else 1
    ids = torch.tensor([v.sot, *prefix_ids] + [v.eot] * eots, device=emb.device)
    return emb[ids[:-eots]], emb[ids[-eots:]]  # [1+P, W], [eots, W]


def learned_text_features(lm: LoadedModel, learned: torch.Tensor, frame: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Unit text features of ``[SOT] + prefix + learned + [EOT]``, read at the last EOT of the frame.

    Only the causal prefix up to the read-out runs through the text transformer.

    Args:
        lm: the frozen model.
        learned: embeddings of the learned slots ``[N, K, W]``.
        frame: ``prompt_frame(lm, prefix_ids, readout)``.

    Shape:
        - learned: :math:`(N, K, W)`; Output: :math:`(N, D)`.
    """
    head, tail = frame
    n = learned.shape[0]
    seq = torch.cat([head.expand(n, -1, -1), learned.to(head.dtype), tail.expand(n, -1, -1)], dim=1)  # [N, 1+P+K+eots, W]
    at = seq.shape[1] - 1  # the last EOT of the frame is the read-out
    fast = fast_dtype(lm)
    with torch.autocast(lm.device.type, enabled=fast != lm.dtype, dtype=fast):
        f = encode_text_embeddings(lm.clip, seq, at)
    return F.normalize(f.float(), dim=-1)


def extract_opinions(
    lm: LoadedModel, images: torch.Tensor, seeds: list[int], cfg: AscentConfig,
    on_checkin: Callable[[float], None] | None = None, banks: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
) -> list[Opinion]:
    """Gradient ascent for every image of a batch: one view each (see ``discover_opinions`` for several).

    Args:
        lm: the frozen model.
        images: ``[B, 3, R, R]`` in [0, 1] at the model's input resolution.
        seeds: one seed per image (see ``image_seed``); all randomness of image b comes from seeds[b].
        cfg: the settings.
        on_checkin: called at each check-in with the fraction of the iterations done.
        banks: the images' view banks ``[B, bank, D]``, when already encoded (``view_banks``).
        exclude: an orthonormal basis per image ``[B, E, D]`` (zero rows allowed) removed from every
            target (``explain_away``).

    Returns:
        One ``Opinion`` per image, in order.

    Shape:
        - images: :math:`(B, 3, R, R)`.
    """
    model, dev = lm.clip, lm.device
    v = vocab()
    B, C, Kt = images.shape[0], cfg.candidates, cfg.tokens
    allowed = torch.tensor(allowed_token_ids(cfg.block_words, cfg.whole_words_only), device=dev)
    table = model.token_embedding.weight[allowed]  # [V', W]: only the learned slots meet the vocabulary

    gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
    banks = view_banks(lm, images, seeds, cfg) if banks is None else banks  # [B, bank, D]
    view_idx = torch.stack([
        torch.stack([torch.randperm(cfg.bank_size, generator=g, device=dev)[: cfg.views] for _ in range(cfg.iterations)])
        for g in gens
    ])  # [B, iters, views]
    from pipeline.model.choosers import GumbelChooser, PezChooser  # defines a torch class on load (pipeline.lazy)

    if cfg.method == "pez":
        chooser = PezChooser(table, gens, C, Kt, cfg.pez_lr, cfg.pez_weight_decay)
    else:
        chooser = GumbelChooser(table, gens, C, Kt, cfg.gumbel_tau, cfg.lr, fast_dtype(lm))
    frame = prompt_frame(lm, v.encode(cfg.prefix) if cfg.prefix else [], cfg.readout)

    def features(tok_emb: torch.Tensor) -> torch.Tensor:  # [B, C, K, W] -> unit [B, C, D]
        return learned_text_features(lm, tok_emb.reshape(B * C, Kt, -1), frame).view(B, C, -1)

    to_ids = lambda idx: allowed[idx]  # noqa: E731  [.., K] positions in the allowed set -> token ids
    snapshots: list[tuple[int, torch.Tensor]] = []  # check-ins' token ids, kept on the device until the end
    for it in range(cfg.iterations):
        feats = features(chooser.embed())
        target = explain_away(banks.gather(1, view_idx[:, it, :, None].expand(-1, -1, banks.shape[-1])).mean(1), exclude)
        loss = (-100 * (feats * target[:, None]).sum(-1)).mean(1).sum()  # per image: mean over candidates
        chooser.opt.zero_grad(set_to_none=True)
        loss.backward()
        chooser.opt.step()
        if it % cfg.checkin_every == 0 or it == cfg.iterations - 1:
            # No copy to the host here: a sync at every check-in would stall the device's queue.
            snapshots.append((it, chooser.choice()))
            if on_checkin is not None:
                on_checkin((it + 1) / cfg.iterations)

    checkins: list[list[dict]] = [[] for _ in range(B)]
    first_seen: list[dict[str, int]] = [{} for _ in range(B)]
    totals: list[Counter] = [Counter() for _ in range(B)]
    all_ids = to_ids(torch.stack([idx for _, idx in snapshots])).cpu()  # [checkins, B, C, K], one copy
    for (it, _), ids in zip(snapshots, all_ids):
        for b in range(B):
            occ, _ = _words_of([v.decode(c.tolist()) for c in ids[b]])
            checkins[b].append({"iteration": it, "counts": dict(occ)})
            totals[b].update(occ)
            for w in occ:
                first_seen[b].setdefault(w, it)

    with torch.no_grad():
        final = chooser.choice()  # [B, C, K]
        feats = features(table[final])
        target = explain_away(banks.mean(1), exclude)
        final_loss = (-100 * (feats * target[:, None]).sum(-1)).cpu()  # [B, C]
    ids = to_ids(final).cpu()
    out = []
    for b in range(B):
        texts = [v.decode(c.tolist()) for c in ids[b]]
        occ, cand = _words_of(texts)
        words = {
            w: {"frequency": occ[w], "candidates": cand[w], "appearances": totals[b][w], "first_iteration": first_seen[b][w]}
            for w in sorted(occ, key=lambda w: (-occ[w], w))
        }
        cands = [{"text": t, "ids": c.tolist(), "loss": round(float(final_loss[b, i]), 4)} for i, (t, c) in enumerate(zip(texts, ids[b]))]
        out.append(Opinion(candidates=cands, words=words, checkins=checkins[b]))
    return out


def view_seed(seed: int, view: int) -> int:
    """The seed of an image's view ``view``; view 0, the whole image, keeps the image's own."""
    return seed if view == 0 else image_seed(seed, f"view/{view}")


def _part(on_checkin: Callable[[float], None] | None, i: int, n: int) -> Callable[[float], None] | None:
    """The progress callback of step ``i`` of ``n``, as a share of the whole."""
    return None if on_checkin is None else (lambda f: on_checkin((i + f) / n))


def region_boxes(lm: LoadedModel, images: torch.Tensor, limit: int) -> list[list[tuple[float, float, float, float]]]:
    """Each image's object regions (``pipeline.model.discovery.object_boxes``) from stock CLIP's CLIP Surgery
    patch tokens, in one forward of the batch: at most ``limit`` boxes per image, as fractions of it."""
    with torch.no_grad():
        tokens = encode_image_tokens(lm.clip, normalize(images.to(lm.device)).to(lm.dtype))
    return [object_boxes(t[1:], tokens.grid, limit) for t in tokens.surgery]


def discover_opinions(
    lm: LoadedModel, images: torch.Tensor, seeds: list[int], cfg: AscentConfig,
    on_checkin: Callable[[float], None] | None = None,
) -> list[Opinion]:
    """The ascent past the dominant concept: several views of each image, by ``cfg.discover``.

    * ``whole``: one ascent on the whole image (``extract_opinions``, the original's form);
    * ``tiles``: that, and beside it an ascent on each of a grid of tile views (``pipeline.model.discovery``),
      all of the batch's tiles in one ascent batch;
    * ``regions``: the same, with a view of each object region the image's patch tokens show (``region_boxes``)
      in place of the grid: as many views as the image has objects, up to ``regions``;
    * ``explain``: ``rounds`` ascents on the one view bank, each with the words that earlier rounds
      found (``explain_min_frequency`` times among their candidates, stop words aside) removed from
      its target; an image's rounds end at the first that finds no new word.

    Each image's result is its own whatever it is batched with. Shape: images :math:`(B, 3, R, R)`.
    """
    if cfg.discover in ("tiles", "regions"):
        kind = "tile" if cfg.discover == "tiles" else "region"
        boxes = [tile_boxes(cfg.tiles, cfg.tile_size)] * len(seeds) if kind == "tile" else region_boxes(lm, images, cfg.regions)
        whole = extract_opinions(lm, images, seeds, cfg, _part(on_checkin, 0, 2))
        small = replace(cfg, candidates=cfg.tile_candidates, bank_size=cfg.tile_bank, views=min(cfg.views, cfg.tile_bank))
        parts = iter(extract_opinions(lm, torch.cat([tile_views(images[b : b + 1], bs) for b, bs in enumerate(boxes)]),
                                      [view_seed(s, k + 1) for s, bs in zip(seeds, boxes) for k in range(len(bs))],
                                      small, _part(on_checkin, 1, 2)) if any(boxes) else ())
        return [merge_views([(whole[b], {"kind": "image", "box": list(WHOLE)})] +
                            [(next(parts), {"kind": kind, "box": list(box)}) for box in boxes[b]])
                for b in range(len(seeds))]
    if cfg.discover == "whole" or cfg.rounds == 1:
        return extract_opinions(lm, images, seeds, cfg, on_checkin)
    banks = view_banks(lm, images, seeds, cfg)
    found: list[list[str]] = [[] for _ in seeds]
    views: list[list[tuple[Opinion, dict]]] = [[] for _ in seeds]
    done = [False] * len(seeds)
    stop = {w.lower() for w in STOP_WORDS}
    for r in range(cfg.rounds):
        exclude = word_directions(lm, found, banks.shape[-1]) if r else None
        ops = extract_opinions(lm, images, [view_seed(s, r) for s in seeds], cfg, _part(on_checkin, r, cfg.rounds),
                               banks=banks, exclude=exclude)
        for b, op in enumerate(ops):
            if done[b]:
                continue  # run for the batch's sake, kept for no image that has stopped
            new = [w for w, d in op.words.items() if d["frequency"] >= cfg.explain_min_frequency
                   and w.lower() not in stop and w not in found[b]]
            if r and not new:
                done[b] = True
                continue
            views[b].append((op, {"kind": "round" if r else "image", "box": list(WHOLE), "explained": list(found[b])}))
            found[b] += new
    return [merge_views(vs) for vs in views]


def score_candidates(lm: LoadedModel, opinions: list[Opinion], features: list[torch.Tensor]) -> list[Opinion]:
    """The opinions with each candidate re-scored by stock CLIP: ``encode_text(tokenize(text))`` against
    the un-augmented feature of its view, in one pass for the batch (decoded BPE does not round-trip,
    so this is the score a user of the words would see).

    Args:
        features: per opinion, its views' unit features ``[V, D]`` (``view_features``; one row without views).
    """
    texts = [c["text"] for op in opinions for c in op.candidates]
    rows = torch.stack([torch.atleast_2d(f)[c.get("view", 0)] for op, f in zip(opinions, features) for c in op.candidates])
    scores = iter(rescore_texts(lm, texts, rows).tolist())
    return [replace(op, candidates=[{**c, "rescored": round(next(scores), 4)} for c in op.candidates])
            for op in opinions]


def opinion_csv(op: Opinion, tau: float) -> str:
    """The original's CSV columns, one row per word per check-in (the original kept only the last)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Token", "Frequency", "Temperature", "Iteration"])
    for ck in op.checkins:
        for word, n in sorted(ck["counts"].items(), key=lambda kv: (-kv[1], kv[0])):
            w.writerow([word, n, tau, ck["iteration"]])
    return buf.getvalue()


class AscendStage(PerImageStage[AscentConfig]):
    """Thin I/O around ``extract_opinions``: writes ``ascend/<id>.json`` and ``ascend/<id>.csv``."""

    name = "ascend"
    needs: tuple[str, ...] = ()

    def batch_size(self, ctx: StageContext[AscentConfig]) -> int:
        vocab_size = ctx.models.clip.clip.token_embedding.weight.shape[0]
        return ctx.batches.size(self.name, ctx.config.batch_size, cuda=AUTO_BATCH_CUDA, cpu=AUTO_BATCH_CPU,
                                bytes_per_image=ascent_bytes_per_image(ctx.config, vocab_size))

    def load(self, ctx: StageContext[AscentConfig], refs: list[ImageRef]) -> tuple:
        return load_batch(ctx.models.clip.input_resolution, refs, ctx.settings.max_side)

    def process(self, ctx: StageContext[AscentConfig], refs: list[ImageRef], loaded: tuple) -> Finish:
        cfg, lm = ctx.config, ctx.models.clip
        ok, images, failed = loaded
        results: dict[str, ItemResult] = {i: ItemResult(error=e, advice=BAD_INPUT) for i, e in failed.items()}
        written: list[tuple] = []
        if ok and not cfg.enabled:  # vocabulary-only: an empty opinion, for decode to add the words to
            written = [(ref, image_seed(ctx.settings.seed, ref.id), Opinion([], {}), lm.name, 0.0) for ref in ok]
        elif ok:
            t = time.time()
            seeds = [image_seed(ctx.settings.seed, r.id) for r in ok]
            opinions = ctx.batches.run(self.name, lambda a, b: discover_opinions(lm, images[a:b], seeds[a:b], cfg, ctx.progress),
                                       len(seeds))  # results do not depend on batching
            with torch.no_grad():
                feats = view_features(lm, images, [op.views for op in opinions])
                per_image = (time.time() - t) / len(ok)
                opinions = score_candidates(lm, opinions, feats)
            written = [(ref, seed, op, lm.name, per_image) for ref, seed, op in zip(ok, seeds, opinions)]

        def finish() -> list[ItemResult]:
            for ref, *rest in written:
                results[ref.id] = ItemResult(outputs=self._write(ctx, ref, *rest))
            return [results[r.id] for r in refs]

        return finish

    @staticmethod
    def _write(ctx: StageContext[AscentConfig], ref: ImageRef, seed: int, op: Opinion, model: str,
               seconds: float) -> list[str]:
        doc = {"image": ref.id, "path": ref.path, "model": model, "seed": seed,
               "seconds": round(seconds, 3), "settings": asdict(ctx.config), "candidates": op.candidates,
               "words": op.words, "checkins": op.checkins, **({"views": op.views} if op.views else {})}
        jpath, cpath = ctx.run.opinion(ref.id), ctx.run.opinion_csv(ref.id)
        atomic_write_json(jpath, doc)
        atomic_write_text(cpath, opinion_csv(op, ctx.config.gumbel_tau))
        return [ctx.run.rel(jpath), ctx.run.rel(cpath)]
