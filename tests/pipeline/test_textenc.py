"""pipeline.model.textenc: the causal-prefix text encoder equals stock encode_text, at any read-out."""

import torch

from pipeline.model.textenc import encode_text_embeddings, encode_tokens
from pipeline.model.tokens import tokenize


def test_prefix_encoder_equals_stock_encode_text(toy):
    model = toy.model
    ids = tokenize(["a red circle.", "a blue ring and a green cross.", ""], model.positional_embedding.shape[0])
    with torch.no_grad():
        torch.testing.assert_close(encode_tokens(model, ids), model.encode_text(ids), rtol=1e-4, atol=1e-5)


def test_readout_at_any_position_matches_a_truncated_stock_pass(toy):
    model = toy.model
    ids = tokenize(["a red circle."], model.positional_embedding.shape[0])
    eot = int(ids.argmax())
    with torch.no_grad():
        emb = model.token_embedding(ids[:, : eot + 1])
        at_eot = encode_text_embeddings(model, emb, eot)
        torch.testing.assert_close(at_eot, model.encode_text(ids), rtol=1e-4, atol=1e-5)
        earlier = encode_text_embeddings(model, emb, eot - 1)
    assert not torch.allclose(earlier, at_eot)  # the read-out position matters
