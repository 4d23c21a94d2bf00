"""CLIP's BPE tokenizer, with the special ids read from it rather than written as literals."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from clip.simple_tokenizer import SimpleTokenizer

SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"


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
        keep = [i for i in ids if i not in (self.sot, self.eot)]
        return self.tokenizer.decode(keep)

    def piece(self, token_id: int) -> str:
        """The raw BPE piece of one id, e.g. ``"circle</w>"``."""
        return self.tokenizer.decoder[token_id]


@lru_cache(maxsize=1)
def vocab() -> Vocab:
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
