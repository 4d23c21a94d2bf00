import csv
import io
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.run.images import to_tensor
from pipeline.model.tokens import vocab
from pipeline.toy.train import held_out_single_objects
from stages.ascend import AscentConfig, extract_opinions, learned_text_features, opinion_csv, prompt_frame
from stages.decode import DecodeConfig, decode_labels  # recall is measured on the labels a user sees

FAST = AscentConfig(iterations=12, candidates=4, bank_size=16, views=8, checkin_every=5)


def _images(n, res=64):
    return torch.stack([to_tensor(Image.fromarray(s.image), res) for s in held_out_single_objects(n)])


@pytest.mark.parametrize("method", ["gumbel", "pez"])
def test_same_seed_same_words(tiny, method):
    imgs = _images(1, tiny.input_resolution)
    cfg = replace(FAST, method=method)
    a = extract_opinions(tiny, imgs, [5], cfg)[0]
    b = extract_opinions(tiny, imgs, [5], cfg)[0]
    c = extract_opinions(tiny, imgs, [6], cfg)[0]
    assert a.candidates == b.candidates and a.words == b.words
    assert [x["ids"] for x in a.candidates] != [x["ids"] for x in c.candidates]


@pytest.mark.parametrize("method", ["gumbel", "pez"])
def test_batch_composition_never_changes_a_result(toy, method):
    imgs = _images(3)
    cfg = replace(FAST, method=method)
    together = extract_opinions(toy, imgs, [1, 2, 3], cfg)
    alone = extract_opinions(toy, imgs[1:2], [2], cfg)[0]
    assert alone.candidates == together[1].candidates and alone.words == together[1].words


@pytest.mark.parametrize("prefix", ["", "a photo of"])
def test_readout_feature_equals_stock_encode_text(toy, prefix):
    v = vocab()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, v.size, (6, 5), generator=g)
    ids[ids >= v.sot] = 320  # never SOT/EOT, as ascent guarantees
    prefix_ids = v.encode(prefix) if prefix else []
    ours = learned_text_features(toy, toy.model.token_embedding.weight[ids], prompt_frame(toy, prefix_ids, "eot"))
    full = torch.zeros(6, toy.model.positional_embedding.shape[0], dtype=torch.long)
    for i, row in enumerate(ids.tolist()):
        seq = [v.sot, *prefix_ids, *row, v.eot]
        full[i, : len(seq)] = torch.tensor(seq)
    with torch.no_grad():
        stock = F.normalize(toy.model.encode_text(full), dim=-1)
    assert torch.allclose(ours, stock, atol=1e-5)
    seed_mode = learned_text_features(toy, toy.model.token_embedding.weight[ids], prompt_frame(toy, prefix_ids, "seed"))
    assert not torch.allclose(seed_mode, stock, atol=1e-3)  # the original's second-EOT read-out differs


@pytest.mark.parametrize("method", ["gumbel", "pez"])
def test_block_list_is_respected(toy, method):
    cfg = AscentConfig(method=method, iterations=30, candidates=8, bank_size=16, views=8, block_words=("circle", "red", "a"))
    ops = extract_opinions(toy, _images(2), [1, 2], cfg)
    for op in ops:
        for c in op.candidates:
            for t in c["ids"]:
                piece = vocab().piece(t).removesuffix("</w>").lower()
                assert "circle" not in piece and "red" not in piece and "a" not in piece


def test_csv_has_the_original_columns(tiny):
    op = extract_opinions(tiny, _images(1, tiny.input_resolution), [0], FAST)[0]
    rows = list(csv.reader(io.StringIO(opinion_csv(op, 1000.0))))
    assert rows[0] == ["Token", "Frequency", "Temperature", "Iteration"]
    assert {int(r[3]) for r in rows[1:]} == {0, 5, 10, 11}
    assert all(float(r[2]) == 1000.0 and int(r[1]) >= 1 for r in rows[1:])


def test_word_statistics_are_consistent(tiny):
    op = extract_opinions(tiny, _images(1, tiny.input_resolution), [0], FAST)[0]
    for w, d in op.words.items():
        assert 1 <= d["candidates"] <= FAST.candidates
        assert d["frequency"] >= d["candidates"]
        assert d["appearances"] >= d["frequency"]
        assert d["first_iteration"] in {0, 5, 10, 11}


@pytest.mark.parametrize("method", ["gumbel", "pez"])
def test_true_words_recovered_on_toy_scenes(toy, method):
    scenes = held_out_single_objects(3)
    imgs = torch.stack([to_tensor(Image.fromarray(s.image), 64) for s in scenes])
    cfg = AscentConfig(method=method, iterations=100)
    for scene, op in zip(scenes, extract_opinions(toy, imgs, [11, 12, 13], cfg)):
        labels = {d["word"] for d in decode_labels(op.words, DecodeConfig())}
        colour, shape = scene.objects[0].words
        assert colour in labels and shape in labels, (scene.caption, sorted(labels))


def test_straight_through_matches_the_textbook_gumbel_softmax():
    """Forward: the embedding of argmax(logits + noise); backward: the gradient of
    ``(one_hot - y.detach() + y) @ table`` with ``y = softmax((logits + noise) / tau)``, as
    ``F.gumbel_softmax(hard=True)`` builds it, whatever the scale of the incoming gradient."""
    from pipeline.model.choosers import _GumbelStraightThrough

    g = torch.Generator().manual_seed(0)
    table = torch.randn(300, 8, generator=g, dtype=torch.float64)
    logits = torch.randn(2, 3, 4, 300, generator=g, dtype=torch.float64)
    uniform = torch.rand(2, 3, 4, 300, generator=g, dtype=torch.float64)
    noise = -(-uniform.log()).log()
    weights = torch.randn(2, 3, 4, 8, generator=g, dtype=torch.float64)
    for tau, size in ((1.0, 1.0), (1000.0, 1.0), (1000.0, 1e-9)):
        a = logits.clone().requires_grad_(True)
        emb, idx = _GumbelStraightThrough.apply(a, uniform.clone(), table, table, tau)  # it overwrites the noise
        (emb * weights * size).sum().backward()
        b = logits.clone().requires_grad_(True)
        y = ((b + noise) / tau).softmax(-1)
        hard = F.one_hot(y.argmax(-1), 300).to(y.dtype)
        ref = (hard - y.detach() + y) @ table
        (ref * weights * size).sum().backward()
        assert torch.equal(idx, y.argmax(-1))
        torch.testing.assert_close(emb, ref)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12 * size)


def test_straight_through_in_half_precision_keeps_small_gradients():
    """The backward's product with the table in fp16 (as on CUDA): an incoming gradient far below
    fp16's smallest normal number still gives the fp64 gradient to within half precision."""
    from pipeline.model.choosers import _GumbelStraightThrough

    g = torch.Generator().manual_seed(1)
    table = torch.randn(300, 8, generator=g) * 0.02
    logits = torch.randn(2, 3, 300, generator=g)
    uniform = torch.rand(2, 3, 300, generator=g)
    weights = torch.randn(2, 3, 8, generator=g) * 1e-7
    grads = []
    for dtype, fast in ((torch.float64, torch.float64), (torch.float32, torch.float16)):
        a = logits.to(dtype).requires_grad_(True)
        emb, _ = _GumbelStraightThrough.apply(a, uniform.to(dtype, copy=True), table.to(dtype), table.to(fast), 1000.0)
        (emb * weights.to(dtype)).sum().backward()
        grads.append(a.grad.double())
    assert grads[0].abs().max() > 0
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 3e-3


def test_straight_through_gradient_of_an_image_does_not_depend_on_its_batch():
    """Half precision's scaling is per row: an image batched beside one with gradients a million
    times larger gets bit for bit the gradient it gets alone."""
    from pipeline.model.choosers import _GumbelStraightThrough

    g = torch.Generator().manual_seed(3)
    table = torch.randn(300, 8, generator=g) * 0.02
    logits = torch.randn(2, 3, 300, generator=g)
    uniform = torch.rand(2, 3, 300, generator=g)
    weights = torch.randn(2, 3, 8, generator=g) * torch.tensor([1e-4, 1e2]).view(2, 1, 1)

    def grad_of(rows: slice) -> torch.Tensor:
        a = logits[rows].clone().requires_grad_(True)
        emb, _ = _GumbelStraightThrough.apply(a, uniform[rows].clone(), table, table.half(), 1000.0)
        (emb * weights[rows]).sum().backward()
        return a.grad

    assert torch.equal(grad_of(slice(0, 1))[0], grad_of(slice(0, 2))[0])


def test_compiled_and_in_place_gumbel_passes_compute_the_same():
    """CUDA runs the functional forms through torch.compile; eager runs use the in-place ones."""
    from pipeline.model.choosers import _gumbel_grad_in_place, _gumbel_sample_in_place, gumbel_grad, gumbel_sample

    g = torch.Generator().manual_seed(2)
    logits, uniform = torch.randn(3, 4, 500, generator=g) * 50, torch.rand(3, 4, 500, generator=g)
    uniform[0, 0, :3] = 0.0  # clamped, not -inf
    idx, y = gumbel_sample(logits, uniform, 1000.0)
    idx2, y2 = _gumbel_sample_in_place(logits, uniform.clone(), 1000.0)
    assert torch.equal(idx, idx2) and torch.isfinite(y).all()
    torch.testing.assert_close(y, y2)
    grad, scale = torch.randn(3, 4, 500, generator=g), torch.tensor(0.37)
    torch.testing.assert_close(gumbel_grad(grad, y, scale), _gumbel_grad_in_place(grad.clone(), y, scale))


def test_a_failed_compile_falls_back_to_the_plain_function_with_a_warning(monkeypatch):
    from pipeline.model import choosers

    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(choosers.torch, "compile", lambda fn: broken)
    run = choosers._compiled(lambda x: x + 1)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        assert run(1) == 2
    assert run(2) == 3  # and stays on the plain function


def test_progress_is_reported_at_every_check_in(tiny):
    seen = []
    cfg = replace(FAST, iterations=25, checkin_every=10)
    extract_opinions(tiny, _images(1, tiny.input_resolution), [0], cfg, on_checkin=seen.append)
    assert seen == [1 / 25, 11 / 25, 21 / 25, 1.0]  # iterations 0, 10, 20 and the last
