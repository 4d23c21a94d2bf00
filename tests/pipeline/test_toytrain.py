"""pipeline.toy.train: the patch term's targets, and a resumed training equal to an uninterrupted one."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline.toy.train import (
    RECIPES,
    build_toy_model,
    class_prompts,
    class_targets,
    dense_captions,
    patch_targets,
    train_toy_clip,
)
from pipeline.toy.world import SceneSpec, make_scene, scene_rng


def test_patch_targets_follow_the_masks():
    scene = make_scene(scene_rng(0, 3), SceneSpec(min_objects=2, max_objects=2))
    idx = patch_targets(scene, 4).reshape(16, 16)
    for i, obj in enumerate(scene.objects):
        cover = obj.mask.reshape(16, 4, 16, 4).mean((1, 3))
        assert np.array_equal(idx == i, cover >= 0.5)
    assert (idx == -1).sum() == 256 - sum((idx == i).sum() for i in range(2))


def test_dense_captions_fit_exactly_the_consistent_objects():
    captions, by_colour, by_shape = dense_captions()
    assert len(captions) == 36 + 6 + 6 and "a red circle." in captions and "a red." in captions and "a ring." in captions
    fits = by_colour[0] & by_shape[0]  # red circle
    assert [captions[j] for j in np.flatnonzero(fits)] == ["a red circle.", "a red.", "a circle."]


def test_class_targets_share_out_each_scenes_own_pairs():
    scenes = [make_scene(scene_rng(0, i), SceneSpec()) for i in range(20)]
    target = class_targets(scenes)
    captions, pairs = class_prompts()
    assert captions == dense_captions()[0][:36]  # the class term reads the leading 36 dense captions
    for scene, row in zip(scenes, target):
        mine = {pairs.index(o.words) for o in scene.objects}
        assert set(torch.nonzero(row).flatten().tolist()) == mine
        assert torch.allclose(row[sorted(mine)], torch.full((len(mine),), 1 / len(mine)))


def test_the_class_term_teaches_the_image_embedding_the_36_prompts():
    """Six steps with the class term (contrastive loss kept, no patch terms) lower the 36-way loss on
    the first batch they trained on; the same six steps without the term lower it less."""
    import torch.nn.functional as F

    from pipeline.run.images import normalize
    from pipeline.toy.train import _batch, encode_tokens, tokenize

    def class_loss(state, cfg) -> float:
        from pipeline.toy.train import build_toy_model

        model = build_toy_model(cfg.arch)
        model.load_state_dict({k: v.float() for k, v in state.items()})
        images, *_, classes = _batch(cfg.seed, 0, cfg, SceneSpec(size=64, max_scale=cfg.max_scale), 77)
        with torch.no_grad():
            img = F.normalize(model.encode_image(normalize(images.permute(0, 3, 1, 2).float() / 255)), dim=-1)
            txt = F.normalize(encode_tokens(model, tokenize(class_prompts()[0], 77)), dim=-1)
        return float(-(classes * (100 * img @ txt.T).log_softmax(1)).sum(1).mean())

    base = dataclasses.replace(RECIPES["fine-cpu"], steps=6, batch_size=16, noise_captions=4, warmup=1, eval_every=0,
                               dense_weight=0.0, lr=2e-3)
    with_term = dataclasses.replace(base, class_weight=1.0)
    before = class_loss(train_toy_clip(dataclasses.replace(base, steps=1, lr=0.0), torch.device("cpu"))[0], with_term)
    trained = class_loss(train_toy_clip(with_term, torch.device("cpu"))[0], with_term)
    plain = class_loss(train_toy_clip(base, torch.device("cpu"))[0], with_term)
    assert trained < before and trained < plain, (before, trained, plain)


def test_resumed_training_equals_an_uninterrupted_one(tmp_path):
    cfg = dataclasses.replace(RECIPES["fine-cpu"], steps=4, batch_size=4, noise_captions=4, warmup=2, eval_every=0,
                              checkpoint_every=2)
    full, _ = train_toy_clip(cfg, torch.device("cpu"))

    def stop_after_two(step, loss, metrics):
        if step == 1:
            raise KeyboardInterrupt

    ckpt = tmp_path / "t.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_toy_clip(cfg, torch.device("cpu"), stop_after_two, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    resumed, card = train_toy_clip(cfg, torch.device("cpu"), checkpoint=ckpt, resume=True)
    assert card["resumed_at"] == 2
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match="another recipe"):
        train_toy_clip(dataclasses.replace(cfg, lr=1.0), torch.device("cpu"), checkpoint=ckpt, resume=True)


def test_distillation_copies_and_freezes_the_teachers_text_tower(tmp_path):
    from pipeline.model.load import TOY_CHECKPOINT
    from pipeline.toy.train import TEXT_TOWER, resolve_recipe

    with pytest.raises(ValueError, match="pass --teacher"):
        resolve_recipe("distill-cpu", torch.device("cpu"))
    with pytest.raises(ValueError, match="no such file"):
        resolve_recipe("distill-cpu", torch.device("cpu"), teacher=str(tmp_path / "none.pt"))
    _, cfg = resolve_recipe("distill-cpu", torch.device("cpu"), teacher=str(TOY_CHECKPOINT))
    cfg = dataclasses.replace(cfg, steps=2, batch_size=4, noise_captions=4, warmup=1, eval_every=0)
    state, card = train_toy_clip(cfg, torch.device("cpu"))
    teacher = torch.load(TOY_CHECKPOINT, map_location="cpu")
    text = [k for k in state if k.startswith(TEXT_TOWER)]
    assert text and all(torch.equal(state[k], teacher[k]) for k in text)  # copied, and not trained
    assert state["visual.conv1.weight"].shape[-1] == 4  # the student's own 16x16-grid vision tower
    assert card["recipe"]["teacher"]["file"] == TOY_CHECKPOINT.name and len(card["recipe"]["teacher"]["sha256"]) == 64
    assert str(TOY_CHECKPOINT.parent) not in json.dumps(card) and card["recipe"]["distill_weight"] > 0


def test_a_finer_grid_starts_from_the_teachers_vision_tower():
    from pipeline.toy.train import FINE4, _init_vision, build_toy_model

    torch.manual_seed(0)
    teacher = build_toy_model().eval()  # an 8x8-grid toy (random weights serve: the test follows them)
    student = build_toy_model(FINE4)
    _init_vision(student, teacher)
    flat = torch.rand(1, 3, 1, 1).expand(1, 3, 64, 64)  # one colour: every patch of either grid embeds alike
    t, s = teacher.visual.conv1(flat), student.visual.conv1(flat)  # [1, C, 8, 8] and [1, C, 16, 16]
    assert torch.allclose(s[0, :, 0, 0], t[0, :, 0, 0], atol=1e-5)
    assert torch.equal(student.visual.proj, teacher.visual.proj)
    assert torch.equal(student.visual.transformer.resblocks[3].mlp.c_fc.weight, teacher.visual.transformer.resblocks[3].mlp.c_fc.weight)
    pos = student.visual.positional_embedding
    assert pos.shape[0] == 1 + 16 * 16 and torch.equal(pos[0], teacher.visual.positional_embedding[0])
    with pytest.raises(ValueError, match="init_from_teacher"):
        _init_vision(build_toy_model(dataclasses.replace(FINE4, vision_layers=3)), teacher)


def test_word_masks_mark_each_words_objects():
    from pipeline.toy.train import word_patch_masks
    from pipeline.toy.world import COLOURS, SHAPES

    scenes = [make_scene(scene_rng(0, i), SceneSpec(min_objects=2, max_objects=3)) for i in range(4)]
    masks = word_patch_masks(scenes, 4)  # [B, 12, 256]
    words = list(COLOURS) + list(SHAPES)
    for scene, m in zip(scenes, masks):
        idx = patch_targets(scene, 4)
        for w, row in zip(words, m):
            expect = np.isin(idx, [i for i, o in enumerate(scene.objects) if w in o.words])
            assert np.array_equal(row.numpy(), expect), w


def test_surgery_pointing_loss_is_low_when_a_words_map_sits_on_its_object():
    from pipeline.toy.train import surgery_pointing_loss

    words, patches = 12, 16
    text = torch.eye(words)  # word j's feature is the j-th axis
    masks = torch.zeros(1, words, patches, dtype=torch.bool)
    masks[0, [0, 6], :2] = True  # one object, colour word 0 and shape word 6, on patches 0 and 1
    masks[0, [1, 7], 2:4] = True  # another, words 1 and 7, on patches 2 and 3

    def tokens(a: list[int], b: list[int]) -> torch.Tensor:
        t = torch.full((1, 1 + patches, words), 0.05)
        t[0, 0, [0, 1, 6, 7]] = 1.0  # the class token sees both objects
        t[0, 1 + torch.tensor(a), 0] = t[0, 1 + torch.tensor(a), 6] = 1.0
        t[0, 1 + torch.tensor(b), 1] = t[0, 1 + torch.tensor(b), 7] = 1.0
        return t

    scale = torch.tensor(100.0)
    right = surgery_pointing_loss(tokens([0, 1], [2, 3]), text, masks, scale, 2, torch.Generator().manual_seed(0))
    swapped = surgery_pointing_loss(tokens([2, 3], [0, 1]), text, masks, scale, 2, torch.Generator().manual_seed(0))
    elsewhere = surgery_pointing_loss(tokens([8, 9], [10, 11]), text, masks, scale, 2, torch.Generator().manual_seed(0))
    assert right < 0.1 and swapped > 10 and elsewhere > 10


def test_a_start_checkpoint_must_have_the_recipes_architecture(tmp_path):
    from pipeline.model.load import TOY_CHECKPOINT
    from pipeline.toy.train import build_toy_model, resolve_recipe

    with pytest.raises(ValueError, match="pass --start-from"):
        resolve_recipe("surgery-cpu", torch.device("cpu"), teacher=str(TOY_CHECKPOINT))
    with pytest.raises(ValueError, match="no such file"):
        resolve_recipe("surgery-cpu", torch.device("cpu"), teacher=str(TOY_CHECKPOINT), start_from=str(tmp_path / "none.pt"))
    other = tmp_path / "other.pt"
    torch.save(build_toy_model(dataclasses.replace(RECIPES["surgery-cpu"].arch, vision_layers=3)).state_dict(), other)
    _, cfg = resolve_recipe("surgery-cpu", torch.device("cpu"), teacher=str(TOY_CHECKPOINT), start_from=str(other))
    cfg = dataclasses.replace(cfg, steps=1, batch_size=2, noise_captions=2, eval_every=0)
    with pytest.raises(ValueError, match="not a toy checkpoint of the recipe's architecture"):
        train_toy_clip(cfg, torch.device("cpu"))
    start = tmp_path / "start.pt"  # a first stage, with its card beside it
    torch.save(build_toy_model(cfg.arch).state_dict(), start)
    start.with_suffix(".json").write_text(json.dumps({"recipe": {"name": "first"}, "history": [{"step": 1}]}))
    _, card = train_toy_clip(dataclasses.replace(cfg, start_from=str(start)), torch.device("cpu"))
    assert card["recipe"]["start_from"]["file"] == "start.pt" and card["recipe"]["start_from"]["card"]["recipe"]["name"] == "first"
    assert str(tmp_path) not in json.dumps(card)


def test_scratch_recipe_keeps_the_text_tower_and_starts_the_vision_tower_afresh():
    from pipeline.model.load import TOY_CHECKPOINT
    from pipeline.toy.train import TEXT_TOWER, resolve_recipe

    _, cfg = resolve_recipe("scratch-gpu", torch.device("cpu"), start_from=str(TOY_CHECKPOINT), steps=1, batch_size=4)
    cfg = dataclasses.replace(cfg, noise_captions=4, warmup=1, eval_every=0, lr=0.0)  # lr 0: the start, unchanged
    state, _ = train_toy_clip(cfg, torch.device("cpu"))
    shipped = torch.load(TOY_CHECKPOINT, map_location="cpu")
    text = [k for k in state if k.startswith(TEXT_TOWER)]
    vision = [k for k in state if k.startswith("visual.") and state[k].is_floating_point() and state[k].numel() > 64]
    assert text and all(torch.equal(state[k], shipped[k]) for k in text)
    assert vision and not any(torch.equal(state[k], shipped[k]) for k in vision)  # no trained vision weight survives
    fresh = build_toy_model(cfg.arch).state_dict()
    assert all(state[k].shape == fresh[k].shape for k in vision)


def test_a_time_limit_stops_training_with_a_checkpoint_and_its_last_score(tmp_path):
    cfg = dataclasses.replace(RECIPES["fine-cpu"], steps=50, batch_size=4, noise_captions=4, warmup=2, eval_every=1000,
                              checkpoint_every=1000)
    ckpt = tmp_path / "t.ckpt"
    state, card = train_toy_clip(cfg, torch.device("cpu"), checkpoint=ckpt, time_limit=0.0)
    assert card["stopped_at"] == 1  # the first step passes a limit of 0 s
    saved = torch.load(ckpt, weights_only=False)
    assert saved["step"] == 1 and [h["step"] for h in card["history"]] == [1] and "joint36" in card["history"][0]
    for key in state:
        assert torch.equal(saved["model"][key].half() if saved["model"][key].is_floating_point() else saved["model"][key],
                           state[key]), key
    _, whole = train_toy_clip(dataclasses.replace(cfg, steps=2), torch.device("cpu"))
    assert whole["stopped_at"] is None
