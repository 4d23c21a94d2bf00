"""CLIP's BPE tokenizer, with the special ids read from it rather than written as literals."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from functools import lru_cache

from typing import TYPE_CHECKING

from pipeline.lazy import lazy_module

torch = lazy_module("torch")


if TYPE_CHECKING:
    from clip.simple_tokenizer import SimpleTokenizer

SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"

# Function words that CLIP's opinions are full of and that name nothing in a picture. A label equal to
# one of them (any case) is dropped; ``decode.stop_words: []`` keeps them, and
# ascend never explains them away.
STOP_WORDS: tuple[str, ...] = (
    "a", "an", "the", "and", "or", "of", "in", "on", "at", "to", "by", "for", "with", "from", "as", "is", "are",
    "was", "be", "it", "its", "this", "that", "these", "those", "his", "her", "their", "my", "your", "our", "i",
    "you", "he", "she", "we", "they", "me", "him", "them", "us", "not", "no", "so", "but", "if", "than", "then",
    "there", "here", "very", "just", "also", "into", "onto", "over", "under", "about", "up", "down", "out", "off",
)


# A BPE piece can end inside a multi-byte character. Decoding a whole sequence joins such pieces with
# their neighbours where the bytes form valid UTF-8; a byte left over is shown as ``<0xe2>``, never as
# U+FFFD, so a person can read it and it survives cleaning as part of its word.
BYTE_MARK = re.compile(r"<0x[0-9a-f]{2}>")


def _byte_marks(err: UnicodeDecodeError) -> tuple[str, int]:
    return "".join(f"<0x{b:02x}>" for b in err.object[err.start:err.end]), err.end


codecs.register_error("clipsight-bytes", _byte_marks)


def readable(data: bytes) -> str:
    """``data`` as UTF-8, each byte that is not part of a valid character written as ``<0x..>``."""
    return data.decode("utf-8", errors="clipsight-bytes")


@dataclass(frozen=True)
class Vocab:
    """The tokenizer and the ids a pipeline needs from it."""

    tokenizer: SimpleTokenizer
    sot: int
    eot: int
    size: int

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids`` (special ids dropped): pieces cut inside a character are joined where their
        bytes form valid text, and a byte that does not is written ``<0x..>`` (stock ``decode`` writes U+FFFD)."""
        text = "".join(self.tokenizer.decoder[i] for i in ids if i not in (self.sot, self.eot))
        data = bytes(self.tokenizer.byte_decoder[c] for c in text)
        return readable(data).replace("</w>", " ")

    def piece(self, token_id: int) -> str:
        """The raw BPE piece of one id, e.g. ``"circle</w>"``."""
        return self.tokenizer.decoder[token_id]


@lru_cache(maxsize=1)
def vocab() -> Vocab:
    from clip.simple_tokenizer import SimpleTokenizer  # openai-clip imports torchvision: only when tokens are needed

    tok = SimpleTokenizer()
    return Vocab(tokenizer=tok, sot=tok.encoder[SOT_TEXT], eot=tok.encoder[EOT_TEXT], size=len(tok.encoder))


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """Token ids ``[N, context_length]`` as stock ``clip.tokenize`` with ``truncate=True`` makes them.

    Shape:
        - Output: :math:`(N, L)` int64, zero padded after the EOT.
    """
    v = vocab()
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [v.sot] + v.encode(text)[: context_length - 2] + [v.eot]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


# The characters the original strips from decoded opinions before splitting into words.
STRIP_CHARS = ".,*$)({}&#%^\\/-_?!><\"':;@=|+"
_STRIP_TABLE = str.maketrans("", "", STRIP_CHARS)


def clean_words(text: str) -> list[str]:
    """The original's cleaning: strip its punctuation set, keep printable characters, split on spaces.
    A byte mark (``<0xe2>``, from ``Vocab.decode``) is kept whole, as part of its word."""
    parts = BYTE_MARK.split(text)
    marks = BYTE_MARK.findall(text)
    kept = ["".join(ch for ch in part.translate(_STRIP_TABLE) if ch.isprintable()) for part in parts]
    return "".join(k + (marks[i] if i < len(marks) else "") for i, k in enumerate(kept)).split()


@lru_cache(maxsize=8)
def allowed_token_ids(block_words: tuple[str, ...] = (), whole_words_only: bool = False) -> tuple[int, ...]:
    """Token ids ascent may choose: never SOT/EOT, never a token containing a blocked word.

    Args:
        block_words: case-insensitive substrings; any token whose text contains one is excluded.
        whole_words_only: keep only tokens that end a word and are all letters (e.g. ``"circle</w>"``).
    """
    v = vocab()
    blocked = [w.lower() for w in block_words if w.strip()]
    ids = []
    for i in range(v.size):
        if i in (v.sot, v.eot):
            continue
        piece = v.piece(i)
        text = piece.removesuffix("</w>").lower()
        if whole_words_only and not (piece.endswith("</w>") and text.isalpha()):
            continue
        if any(b in text for b in blocked):
            continue
        ids.append(i)
    return tuple(ids)
