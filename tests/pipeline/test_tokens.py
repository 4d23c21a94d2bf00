"""pipeline.model.tokens: special ids read from the tokenizer, stock tokenisation, the original's word cleaning."""

import clip
import torch

from pipeline.model.tokens import allowed_token_ids, clean_words, tokenize, vocab


def test_special_ids_come_from_the_tokenizer():
    v = vocab()
    assert v.piece(v.sot) == "<|startoftext|>" and v.piece(v.eot) == "<|endoftext|>"
    assert v.size == len(v.tokenizer.encoder) and v.eot == v.size - 1  # stock CLIP pools at argmax: EOT is the largest id


def test_tokenize_equals_stock_clip_tokenize():
    texts = ["a red circle.", "", "sprinkorange " * 40]
    assert torch.equal(tokenize(texts, 77), clip.tokenize(texts, context_length=77, truncate=True))


def test_decode_drops_special_ids_and_clean_words_strips_the_original_characters():
    v = vocab()
    assert v.decode([v.sot, *v.encode("a red circle"), v.eot]).strip() == "a red circle"
    assert clean_words("a (red), circle!! \x00 -- blue_ring") == ["a", "red", "circle", "bluering"]


def test_allowed_ids_never_hold_special_or_blocked_tokens():
    v = vocab()
    every = allowed_token_ids()
    assert v.sot not in every and v.eot not in every and len(every) == v.size - 2
    blocked = allowed_token_ids(("red",))
    assert v.encode("red")[0] not in blocked and all("red" not in v.piece(i).lower() for i in blocked)
    whole = allowed_token_ids(whole_words_only=True)
    assert all(v.piece(i).endswith("</w>") and v.piece(i)[:-4].isalpha() for i in whole[:500])


def test_pieces_cut_inside_a_character_join_when_they_can_and_show_their_bytes_when_not():
    v = vocab()
    e = v.tokenizer.encoder
    assert v.decode([e["â"], e["ľ"], e["ĵ</w>"], e["ring</w>"]]) == "✓ ring "  # e2 9c 93: one character again
    assert v.decode([e["â"], e["ring</w>"]]) == "<0xe2>ring "  # a lead byte with nothing to finish it
    assert v.decode([e["ľ"], e["â</w>"]]) == "<0x9c><0xe2> "
    assert clean_words("(<0xe2>ring), a<0x9c>!") == ["<0xe2>ring", "a<0x9c>"]  # the marks survive cleaning whole
