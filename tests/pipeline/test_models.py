import json
import urllib.error

import pytest
import torch
from clip.model import build_model

from pipeline.model.load import ModelError, cached_file, load_model
from pipeline.model.tokens import tokenize

CPU = torch.device("cpu")


def _outputs(model):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, model.visual.input_resolution, model.visual.input_resolution, generator=g)
    text = tokenize(["a", "a"], model.positional_embedding.shape[0])  # [SOT, "a", EOT, 0...]
    with torch.no_grad():
        return model.encode_image(image), model.encode_text(text)


def test_random_model_is_frozen_eval_and_seeded():
    a = load_model("random:tiny", CPU, seed=1)
    b = load_model("random:tiny", CPU, seed=1)
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    assert a.dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_random_resnet_builds():
    lm = load_model("random:tiny-rn", CPU)
    assert not lm.is_vit and lm.input_resolution == 64


def test_state_dict_file_loads_with_architecture_from_weights(tmp_path, tiny):
    path = tmp_path / "sd.pt"
    torch.save(tiny.model.state_dict(), path)
    lm = load_model(str(path), CPU)
    assert lm.input_resolution == tiny.input_resolution
    for x, y in zip(_outputs(lm.model), _outputs(tiny.model)):
        assert torch.allclose(x, y, atol=1e-5)


def test_whole_pickled_model_loads(tmp_path, tiny):
    path = tmp_path / "whole.pt"
    torch.save(tiny.model, path)
    lm = load_model(str(path), CPU)
    assert torch.allclose(_outputs(lm.model)[0], _outputs(tiny.model)[0], atol=1e-5)


def test_jit_archive_loads(tmp_path, tiny):
    model = tiny.model
    image, text = torch.rand(1, 3, 32, 32), tokenize([""], model.positional_embedding.shape[0])  # [SOT, EOT, 0...]
    traced = torch.jit.trace(model, (image, text), check_trace=False)
    path = tmp_path / "jit.pt"
    traced.save(str(path))
    lm = load_model(str(path), CPU)
    assert torch.allclose(_outputs(lm.model)[0], _outputs(model)[0], atol=1e-5)


def test_missing_file_and_unknown_name():
    with pytest.raises(ModelError, match="unknown model 'no/such/file.pt'"):
        load_model("no/such/file.pt", CPU)


def test_not_a_clip_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ModelError, match="OpenAI's key layout"):
        load_model(str(path), CPU)


def test_offline_name_names_expected_file(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(ModelError) as e:
        load_model("ViT-B/16", CPU, cache_dir=tmp_path)
    msg = str(e.value)
    expected = cached_file("ViT-B/16", tmp_path)
    assert str(expected) in msg and "https://" in msg and "copy it to that path" in msg


def test_toy_checkpoint_loads_with_stock_build_model():
    from pipeline.model.load import TOY_CHECKPOINT

    state = torch.load(TOY_CHECKPOINT, map_location="cpu", weights_only=True)
    model = build_model(state)
    assert model.visual.input_resolution == 64
    assert TOY_CHECKPOINT.stat().st_size <= 25 * 2**20
    assert all(v.dtype == torch.float16 for k, v in state.items() if v.is_floating_point())


def test_half_precision_cast_keeps_layernorm_fp32_and_runs():
    from pipeline.model.load import _cast_like_openai
    from pipeline.model.textenc import encode_tokens
    from pipeline.model.tokens import tokenize

    model = _cast_like_openai(load_model("random:tiny", CPU).model, torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.ln_final.weight.dtype == torch.float32
    with torch.no_grad():
        assert model.encode_image(torch.rand(1, 3, 32, 32).to(model.dtype)).shape == (1, 32)
        assert encode_tokens(model, tokenize(["a red circle."], 77)).shape == (1, 32)


def test_shipped_toy_zero_shot_on_the_cpu_matches_its_card(toy):
    """The shipped toy's held-out zero-shot accuracy, measured here on the CPU, is what its card records."""
    from pipeline.model.load import TOY_CHECKPOINT
    from pipeline.toy.train import held_out_single_objects, zero_shot_accuracy

    from tests.benchmarks.heldout import heldout_scenes

    card = json.loads(TOY_CHECKPOINT.with_suffix(".json").read_text())
    recorded = card["metrics"]["zero_shot_held_out_500_single_object"]
    scenes = {f"{style}_style": held_out_single_objects(500, style) for style in ("train", "alt", "varied")}
    scenes["heldout_renderer"] = heldout_scenes(500)
    assert set(recorded) == set(scenes)
    with torch.no_grad():
        for name, these in scenes.items():
            measured = zero_shot_accuracy(toy.model, these, toy.device)
            for key, value in recorded[name].items():
                assert abs(measured[key] - value) <= 0.01, (name, key, measured, recorded)
    # Floors that a broken checkpoint cannot pass: the alt renderer's target, and today's figures on the
    # others. The targets for the training style (0.97) and the held-out renderer (0.93) are not met yet
    # (docs/toy-world.md says what was tried).
    assert recorded["alt_style"]["joint36"] >= 0.95 and recorded["train_style"]["joint36"] >= 0.94
    assert recorded["heldout_renderer"]["joint36"] >= 0.8
