"""One view of a CLIP model for every stage: openai-clip's ``CLIP`` or OpenCLIP's ``open_clip.CLIP``.

The stages never reach into a model's modules by their backend's names; they ask the
adapter. It reads the model's own parameters and submodules, and never copies, swaps
or changes them.

What differs between the two backends, and what the adapter hides:

* blocks: openai-clip's take ``[L, B, C]`` (sequence first), OpenCLIP's ``[B, L, C]``;
  :func:`stock_block` runs either batch first. OpenCLIP's blocks may carry LayerScale
  (``ls_1``/``ls_2``, ``Identity`` when unset); :func:`block_parts` gives ``Identity``
  for openai-clip's, so one block runner serves both;
* the text tower's causal mask: on each openai-clip block, on ``model.attn_mask`` in
  OpenCLIP (the prefix encoders build their own, so neither is read);
* the ResNet stem's activations: ``relu1..3`` in openai-clip, ``act1..3`` in OpenCLIP;
* the input side: ``visual.input_resolution`` against ``visual.image_size`` (a tuple);
* the precision: openai-clip's ``model.dtype`` does not exist in OpenCLIP; the adapter
  reads the patch (or stem) convolution's weight, as openai-clip does.

The BPE vocabulary, the SOT/EOT ids (49406/49407) and the context length (77) are the
same in both for the configs the adapter serves; :mod:`pipeline.model.tokens` tokenizes for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from pipeline.lazy import lazy_module

torch = lazy_module("torch")
nn = lazy_module("torch.nn")


@dataclass(frozen=True)
class BlockParts:
    """A pre-norm transformer block's parts: ``x + ls_1(attn(ln_1(x)))``, then ``+ ls_2(mlp(ln_2(x)))``."""

    ln_1: nn.Module
    attn: nn.MultiheadAttention
    ls_1: nn.Module
    ln_2: nn.Module
    mlp: nn.Module
    ls_2: nn.Module


@cache
def _identity() -> nn.Module:
    """The one shared ``nn.Identity``, made at its first use (this module does not import torch on load)."""
    return nn.Identity()


def block_parts(block: nn.Module) -> BlockParts:
    """The parts of an openai-clip or OpenCLIP residual attention block (LayerScale as ``Identity`` when absent)."""
    return BlockParts(block.ln_1, block.attn, getattr(block, "ls_1", _identity()), block.ln_2, block.mlp,
                      getattr(block, "ls_2", _identity()))


def stock_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's own forward on batch-first ``x`` ``[B, N, C]``, whichever layout the block takes."""
    if getattr(block.attn, "batch_first", False):
        return block(x)
    return block(x.permute(1, 0, 2)).permute(1, 0, 2)


def is_vit(visual: nn.Module) -> bool:
    """A plain vision transformer (class token, patch convolution, projection), as opposed to a ModifiedResNet."""
    return hasattr(visual, "transformer") and hasattr(visual, "conv1")


def vision_blocks(visual: nn.Module) -> list[nn.Module]:
    return list(visual.transformer.resblocks)


def stem_activations(visual: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """A ModifiedResNet stem's three activations: ``relu1..3`` (openai-clip) or ``act1..3`` (OpenCLIP)."""
    names = ("relu1", "relu2", "relu3") if hasattr(visual, "relu1") else ("act1", "act2", "act3")
    return tuple(getattr(visual, n) for n in names)  # type: ignore[return-value]


def input_resolution(visual: nn.Module) -> int:
    """The side the vision tower was trained at."""
    if hasattr(visual, "input_resolution"):
        return int(visual.input_resolution)
    size = visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def weight_dtype(model: nn.Module) -> torch.dtype:
    """The model's compute precision: its image tower's first convolution's weight, as openai-clip's ``dtype`` reads it."""
    return getattr(model, "visual", model).conv1.weight.dtype


def backend(model: nn.Module) -> str:
    """``"openai-clip"`` or ``"open_clip"``: the package whose ``CLIP`` class ``model`` is."""
    module = type(model).__module__
    return "open_clip" if module.startswith("open_clip") else "openai-clip"


def text_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.transformer.resblocks)


def context_length(model: nn.Module) -> int:
    return int(model.positional_embedding.shape[0])


class ClipAdapter:
    """The one object through which the stages reach a model of either backend.

    Text tower: ``token_embedding``, ``positional_embedding``, ``text_blocks``, ``ln_final``,
    ``text_projection``, ``sot``/``eot``, ``context_length``, ``tokenize``. Vision tower: ``visual``
    (its ``conv1``, ``class_embedding``, ``positional_embedding``, ``ln_pre``, ``ln_post``, ``proj``,
    or the ResNet trunk and ``attnpool``), ``vision_blocks``, ``is_vit``, ``input_resolution``,
    ``stem_activations``. Blocks: :func:`block_parts` and :func:`stock_block`. And ``encode_text`` /
    ``encode_image``, the stock forwards.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.backend = backend(model)
        self.visual = model.visual
        self._text_blocks = text_blocks(model)  # read once: the prefix encoder walks them every ascent step

    # text tower
    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    @property
    def positional_embedding(self) -> torch.Tensor:
        return self.model.positional_embedding

    @property
    def text_blocks(self) -> list[nn.Module]:
        return self._text_blocks

    @property
    def ln_final(self) -> nn.Module:
        return self.model.ln_final

    @property
    def text_projection(self) -> torch.Tensor:
        return self.model.text_projection

    @property
    def context_length(self) -> int:
        return context_length(self.model)

    @property
    def sot(self) -> int:
        from pipeline.model.tokens import vocab

        return vocab().sot

    @property
    def eot(self) -> int:
        from pipeline.model.tokens import vocab

        return vocab().eot

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        from pipeline.model.tokens import tokenize

        return tokenize(texts, self.context_length)

    # vision tower
    @property
    def is_vit(self) -> bool:
        return is_vit(self.visual)

    @property
    def vision_blocks(self) -> list[nn.Module]:
        return vision_blocks(self.visual)

    @property
    def input_resolution(self) -> int:
        return input_resolution(self.visual)

    @property
    def stem_activations(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return stem_activations(self.visual)

    @property
    def dtype(self) -> torch.dtype:
        return weight_dtype(self.model)

    # the stock forwards
    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


def as_adapter(model: nn.Module | ClipAdapter) -> ClipAdapter:
    """``model`` itself when it is an adapter, else a new adapter over it."""
    return model if isinstance(model, ClipAdapter) else ClipAdapter(model)


# --- OpenCLIP configurations the adapter serves, and why it refuses the rest -------------------------------------

def openclip_refusal(arch: str, cfg: dict | None) -> str | None:
    """Why ``arch`` (an OpenCLIP config name, its config ``cfg``) cannot be served faithfully, or ``None``.

    The adapter serves ``open_clip.CLIP`` with a plain ViT (class-token pooling, ``ln_pre``, no
    attention pooler) or a ModifiedResNet, and a text tower with a causal mask, argmax (EOT)
    pooling and CLIP's BPE tokenizer.
    """
    if cfg is None:
        return "no such OpenCLIP architecture"
    text, vision = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
    if "multimodal_cfg" in cfg:
        return ("CoCa: a captioning model whose image embedding comes from an attention pooler over the tokens, "
                "not from a class token, and whose text tower appends its own class token")
    if "siglip" in arch.lower() or "init_logit_bias" in cfg:
        return ("SigLIP: last-token text pooling without a causal mask, a SentencePiece tokenizer, and an image "
                "embedding from an attention-pooling head of a timm trunk")
    if "clipa" in arch.lower():
        return "CLIPA: last-token text pooling without a causal mask, a BERT tokenizer, and average-pooled image tokens"
    if "hf_model_name" in text:
        return f"a Hugging Face text tower ({text['hf_model_name']}) instead of CLIP's causal transformer"
    if "timm_model_name" in vision:
        return f"a timm image trunk ({vision['timm_model_name']}) instead of CLIP's ViT or ModifiedResNet"
    if "hf_tokenizer_name" in text:
        return f"another tokenizer ({text['hf_tokenizer_name']}) than CLIP's BPE, with other special ids"
    if text.get("pool_type", "argmax") != "argmax" or text.get("no_causal_mask") or text.get("embed_cls"):
        return "a text tower pooled otherwise than at the EOT token of a causal transformer"
    if (vision.get("attentional_pool") or vision.get("pool_type", "tok") != "tok" or vision.get("final_ln_after_pool")
            or vision.get("no_ln_pre")):
        return "an image tower pooled otherwise than CLIP's class token after ln_pre, the blocks and ln_post"
    if text.get("vocab_size", 49408) != 49408 or text.get("context_length", 77) != 77:
        return "a text vocabulary or context length other than CLIP's 49408 BPE tokens and 77 positions"
    if cfg.get("custom_text"):
        return "a separate text-tower class (CustomTextCLIP) whose layout the adapter does not read"
    return None


def check_openclip_model(model: nn.Module, name: str) -> None:
    """Raise ``ValueError`` naming what a built OpenCLIP model has that the adapter cannot serve."""
    import open_clip

    if type(model) is not open_clip.CLIP:
        raise ValueError(f"{name}: built as {type(model).__name__}, not open_clip.CLIP")
    if model.text_pool_type != "argmax" or model.attn_mask is None:
        raise ValueError(f"{name}: its text tower is not pooled at the EOT token of a causal transformer")
    visual = model.visual
    if is_vit(visual):
        if (visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool
                or isinstance(visual.ln_pre, nn.Identity)):
            raise ValueError(f"{name}: its image tower is pooled otherwise than at the class token")
    elif not hasattr(visual, "attnpool"):
        raise ValueError(f"{name}: its image tower is neither a plain ViT nor a ModifiedResNet")
