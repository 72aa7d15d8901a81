"""Training: tokenizer files, config validation, data targets, a tiny from-scratch run that learns,
saves loadable checkpoints and resumes exactly, and the shipped demo model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evf.checkpoints import DEMO_MODEL_DIR
from evf.config import ConfigError
from evf.metrics import evaluate_synthetic, iou_of, mask_counts
from evf.model.evf_sam2 import ImageEmbeddings
from evf.predictor import EvfSam2Predictor, Prompt
from evf.synthetic import ARTICLE, SHAPES, SPATIAL, generate_scene, vocabulary_corpus, write_dataset
from evf.tokenizer import UNK_ID, EvfTokenizer
from evf.training import TrainConfig, build_tokenizer, train
from evf.training.config import DataSpec
from evf.training.data import ManifestImages, StepBatches, SyntheticScenes, phrase_mask, scene_targets
from evf.training.dense_head import COLOUR_NAMES, SIZE_NAMES, DenseHead, cell_labels, label_maps
from evf.training.init import AttentionWeights, beit3_attention, hiera_attention
from evf.training.location_head import GRID, LocationHead
from evf.training.tokenizer import tokenizer_files
from evf.training.trainer import CHECKPOINT_PREFIX, LOG_FILE, STATE_FILE, Trainer, lr_factor, make_source

FIXTURE_CHECKPOINT = Path(__file__).parent / "fixtures" / "evf-sam2-tiny" / "checkpoint"
REPO = Path(__file__).resolve().parent.parent

# A very small model: 64 px SAM 2 input, 32 px BEiT-3 input, a few thousand parameters per part.
TINY_MODEL = {
    "inference_mode": "multitask",
    "beit3": {
        "embed_dim": 32,
        "layers": 1,
        "attention_heads": 2,
        "ffn_embed_dim": 64,
        "img_size": 32,
        "patch_size": 16,
        "max_source_positions": 32,
    },
    "sam2": {
        "config": "configs/sam2/sam2_hiera_t.yaml",
        "overrides": [
            "++model.image_size=64",
            "++model.image_encoder.trunk.embed_dim=8",
            "++model.image_encoder.trunk.num_heads=1",
            "++model.image_encoder.trunk.stages=[1,1,2,1]",
            "++model.image_encoder.trunk.global_att_blocks=[3]",
            "++model.image_encoder.trunk.window_spec=[8,4,4,2]",
            "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
            "++model.image_encoder.neck.d_model=16",
            "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
            "++model.image_encoder.neck.position_encoding.num_pos_feats=16",
            "++model.memory_attention.d_model=16",
            "++model.memory_attention.num_layers=1",
            "++model.memory_attention.layer.d_model=16",
            "++model.memory_attention.layer.dim_feedforward=16",
            "++model.memory_attention.layer.self_attention.embedding_dim=16",
            "++model.memory_attention.layer.cross_attention.embedding_dim=16",
            "++model.memory_attention.layer.cross_attention.kv_in_dim=8",
            "++model.memory_encoder.in_dim=16",
            "++model.memory_encoder.out_dim=8",
            "++model.memory_encoder.position_encoding.num_pos_feats=8",
            "++model.memory_encoder.mask_downsampler.embed_dim=16",
            "++model.memory_encoder.fuser.layer.dim=16",
            "++model.memory_encoder.fuser.num_layers=1",
        ],
    },
}


def tiny_config(output_dir: Path, **changes: object) -> dict:
    """A recipe that overfits two synthetic scenes in a few seconds."""
    config = {
        "output_dir": str(output_dir),
        "seed": 3,
        "threads": 1,
        "model": TINY_MODEL,
        "tokenizer": {"vocab_size": 128},
        "data": {"synthetic": {"seed": 5, "count": 2}, "prompts_per_image": 4},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.0, "warmup_steps": 2, "min_lr_ratio": 0.1},
        "steps": 30,
        "batch_size": 2,
        "checkpoint_every": 15,
        "log_every": 5,
    }
    config.update(changes)
    return config


DENSE_LOSS = {"dense": 1.0}
TRAINING_HEADS_LOSS = {"dense": 1.0, "location": 1.0}


def write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / LOG_FILE).read_text().splitlines()]


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_files_have_the_fixture_layout() -> None:
    for name, content in tokenizer_files(320).items():
        assert json.loads((FIXTURE_CHECKPOINT / name).read_text()) == content, name


def test_built_tokenizer_loads_and_covers_the_generator_vocabulary(tmp_path: Path) -> None:
    folder = build_tokenizer(vocabulary_corpus(), tmp_path / "tok", vocab_size=128)
    tokenizer = EvfTokenizer.from_folder(folder)
    pieces = len(tokenizer.sp)
    assert tokenizer.supports_semantic
    assert tokenizer.added["<mask>"].id == pieces + 1
    assert tokenizer.added["[semantic]"].id == pieces + 2
    for sentence in vocabulary_corpus():
        assert UNK_ID not in tokenizer.encode(sentence, semantic=True)
    assert tokenizer.encode("all circles", semantic=True)[1] == pieces + 2


# ----------------------------------------------------------------------------- config


def test_config_errors_are_listed(tmp_path: Path) -> None:
    bad = tiny_config(tmp_path / "out", steps=0, train=["beit3"], data={"prompts_per_image": 2})
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(write_config(tmp_path / "bad.yaml", bad))
    message = str(err.value)
    assert "steps" in message
    assert "exactly one of data.manifest and data.synthetic" in message

    both = tiny_config(tmp_path / "out", init_from=str(FIXTURE_CHECKPOINT))
    with pytest.raises(ConfigError, match="exactly one of model"):
        TrainConfig.from_yaml(write_config(tmp_path / "both.yaml", both))

    sizes = tiny_config(tmp_path / "out", model={"beit3": TINY_MODEL["beit3"]})
    with pytest.raises(ConfigError, match="sam2"):
        TrainConfig.from_yaml(write_config(tmp_path / "sizes.yaml", sizes))

    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        TrainConfig.from_yaml(tmp_path / "list.yaml")


def test_demo_recipes_validate_and_stage_two_starts_from_stage_one() -> None:
    stage1 = TrainConfig.from_yaml(REPO / "configs" / "train-demo.yaml")
    stage2 = TrainConfig.from_yaml(REPO / "configs" / "train-demo-finetune.yaml")
    assert Path(stage2.init_from) == Path(stage1.output_dir) / f"{CHECKPOINT_PREFIX}{stage1.steps}"
    assert stage2.output_dir != stage1.output_dir and stage2.seed != stage1.seed


def test_fine_tune_config_may_freeze_the_image_encoder(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "out", model=None, init_from=str(FIXTURE_CHECKPOINT), steps=1)
    config["train"] = ["beit3", "projector", "mask_decoder"]
    trainer = Trainer(TrainConfig.from_yaml(write_config(tmp_path / "ft.yaml", config)))
    frozen = [n for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("visual_model.image_encoder.") for n in frozen)
    assert not any(n.startswith(("mm_extractor.", "visual_model.sam_mask_decoder.")) for n in frozen)
    assert trainer.tokenizer_dir == FIXTURE_CHECKPOINT


def test_new_model_may_freeze_parts_and_scale_their_learning_rate(tmp_path: Path) -> None:
    optimizer = {**tiny_config(tmp_path)["optimizer"], "lr_scale": {"mask_decoder": 0.5}}
    config = tiny_config(tmp_path / "out", steps=2, checkpoint_every=2, optimizer=optimizer)
    config["train"] = ["beit3", "projector", "mask_decoder", "prompt_encoder"]
    trainer = Trainer(TrainConfig.from_yaml(write_config(tmp_path / "frozen.yaml", config)))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert not any(n.startswith("visual_model.image_encoder.") for n in changed)
    assert any(n.startswith("mm_extractor.") for n in changed)
    assert any(n.startswith("visual_model.sam_mask_decoder.") for n in changed)
    decoder = {id(p) for p in trainer.model.visual_model.sam_mask_decoder.parameters()}
    lrs = {any(id(p) in decoder for p in g["params"]): g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs[True] == pytest.approx(0.5 * lrs[False])

    config["optimizer"]["lr_scale"] = {"image_encoder": 0.1}
    with pytest.raises(ConfigError, match="not trained: image_encoder"):
        TrainConfig.from_yaml(write_config(tmp_path / "bad-scale.yaml", config))

    config["optimizer"]["lr_scale"] = {}
    config["loss"] = DENSE_LOSS
    with pytest.raises(ConfigError, match="loss.dense .* image_encoder in train"):
        TrainConfig.from_yaml(write_config(tmp_path / "frozen-shape.yaml", config))

    config["loss"] = {"location": 1.0}
    config["train"] = ["mask_decoder", "prompt_encoder"]
    with pytest.raises(ConfigError, match="loss.location .* beit3 or projector in train"):
        TrainConfig.from_yaml(write_config(tmp_path / "frozen-prompt.yaml", config))


def test_new_model_image_encoder_tells_positions_apart(tmp_path: Path) -> None:
    """sam2 builds Hiera's positional embeddings as zeros (they always come from a checkpoint); a new
    model gets sine-cosine ones, so no two window positions or background cells look the same."""
    config = tiny_config(tmp_path / "out", steps=1)
    trainer = Trainer(TrainConfig.from_yaml(write_config(tmp_path / "new.yaml", config)))
    trunk = trainer.model.visual_model.image_encoder.trunk
    for table in (trunk.pos_embed, trunk.pos_embed_window):
        vectors = table.detach()[0].flatten(1).T  # (positions, channels)
        distances = torch.cdist(vectors, vectors) + torch.eye(len(vectors)) * 1e3
        assert distances.min() > 0.1


def attention_layers(model: torch.nn.Module) -> list[AttentionWeights]:
    return [*hiera_attention(model), *beit3_attention(model)]


def test_mimetic_init_gives_attention_the_intended_structure(tmp_path: Path) -> None:
    """Per head, W_q^T W_k ~ 0.7 Z + 0.7 I (its best rank-head_dim approximation where a head is
    narrower than its input), zero query/key biases, and W_v^T W_o^T ~ 0.4 Z - 0.4 I where the value
    path keeps the width; a new model without ``init.mimetic_attention`` has none of it."""
    init = {"mimetic_attention": ["image_encoder", "beit3"]}
    mimetic = Trainer(
        TrainConfig.from_yaml(write_config(tmp_path / "m.yaml", tiny_config(tmp_path, init=init)))
    )
    default = Trainer(TrainConfig.from_yaml(write_config(tmp_path / "d.yaml", tiny_config(tmp_path / "d"))))
    full_rank_heads = 0
    for layer in attention_layers(mimetic.model):
        for query, key, query_bias, key_bias in zip(
            layer.query, layer.key, layer.query_bias, layer.key_bias, strict=True
        ):
            head_dim, in_dim = query.shape
            product = query.detach().T @ key.detach()
            diagonal = float(product.diagonal().mean())
            off_diagonal = float((product - torch.diag(product.diagonal())).abs().mean())
            if head_dim == in_dim:
                full_rank_heads += 1
                assert diagonal == pytest.approx(0.7, abs=0.25)
            assert diagonal > 0.35 * head_dim / in_dim, (head_dim, in_dim, diagonal)
            assert off_diagonal < 0.4 * diagonal
            assert not query_bias.any() and not key_bias.any()
        value = torch.cat(layer.value).detach()
        if value.shape[0] == value.shape[1]:
            value_output = value.T @ layer.output.detach().T
            assert float(value_output.diagonal().mean()) == pytest.approx(-0.4, abs=0.15)
    assert full_rank_heads >= 2
    for layer in attention_layers(default.model):
        for query, key in zip(layer.query, layer.key, strict=True):
            assert abs(float((query.detach().T @ key.detach()).diagonal().mean())) < 0.05

    config = tiny_config(tmp_path / "ft", model=None, init_from=str(FIXTURE_CHECKPOINT), init=init)
    with pytest.raises(ConfigError, match="initialises a new model"):
        TrainConfig.from_yaml(write_config(tmp_path / "ft.yaml", config))


def test_optimizer_decays_matrices_only_and_warms_up_then_decays(tmp_path: Path) -> None:
    optimizer = {**tiny_config(tmp_path)["optimizer"], "weight_decay": 0.05}
    config = tiny_config(tmp_path, steps=1, optimizer=optimizer)
    trainer = Trainer(TrainConfig.from_yaml(write_config(tmp_path / "c.yaml", config)))
    decayed = {
        p.ndim >= 2 for g in trainer.optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]
    }
    kept = {
        p.ndim >= 2 for g in trainer.optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]
    }
    assert decayed == {True} and kept == {False}
    assert lr_factor(0, warmup_steps=100, total_steps=1000, min_ratio=0.02) == pytest.approx(0.01)
    assert lr_factor(99, 100, 1000, 0.02) == pytest.approx(1.0)
    assert lr_factor(550, 100, 1000, 0.02) == pytest.approx(0.51)
    assert lr_factor(1000, 100, 1000, 0.02) == pytest.approx(0.02)


# ----------------------------------------------------------------------------- data


def test_negative_expressions_become_two_positive_targets() -> None:
    checked = 0
    for index in range(40):
        scene = generate_scene(11, index)
        targets = {(t.prompt, t.semantic): t.mask for t in scene_targets(scene)}
        for expr in scene.expressions:
            if expr.kind != "negative":
                assert np.array_equal(targets[(expr.prompt, expr.semantic)], expr.mask)
                continue
            positive = targets[(expr.prompt, expr.semantic)]
            negative = targets[(expr.negative_prompt, False)]
            assert np.array_equal(positive & ~negative, expr.mask)
            assert np.array_equal(negative, phrase_mask(scene, expr.negative_prompt))
            checked += 1
    assert checked > 10


def test_no_article_share_shortens_a_share_of_referring_phrases_only() -> None:
    plain = SyntheticScenes(5, 100, every_phrase=True)
    dropped = SyntheticScenes(5, 100, every_phrase=True, no_article_share=0.3)
    referring = shortened = 0
    for index in range(60):
        before, after = plain.load(index).targets, dropped.load(index).targets
        assert len(before) == len(after)
        for b, a in zip(before, after, strict=True):
            assert np.array_equal(a.mask, b.mask) and a.semantic == b.semantic
            if b.semantic:
                assert a.prompt == b.prompt
                continue
            referring += 1
            assert a.prompt in (b.prompt, b.prompt.removeprefix(f"{ARTICLE} "))
            shortened += a.prompt != b.prompt
        assert [t.prompt for t in dropped.load(index).targets] == [t.prompt for t in after]
    assert 0.2 < shortened / referring < 0.4


def test_synthetic_options_reach_the_source_and_are_checked() -> None:
    def data(**options: object) -> DataSpec:
        return DataSpec(synthetic={"seed": 5, "count": 100, **options})

    def position_targets(spec: DataSpec) -> int:
        source = make_source(spec)
        targets = [t for index in range(20) for t in source.load(index).targets]
        return sum(any(t.prompt.endswith(phrase) for phrase in SPATIAL.values()) for t in targets)

    assert position_targets(data(every_phrase=True, every_position=True)) > 2 * position_targets(
        data(every_phrase=True)
    )
    with pytest.raises(ValueError, match="set every_phrase: true too"):
        data(every_position=True)


def test_manifest_source_groups_by_image_and_skips_negatives(tmp_path: Path) -> None:
    manifest = write_dataset(7, 3, str(tmp_path / "data"))
    source = ManifestImages(manifest)
    assert len(source) == 3
    scene = generate_scene(7, 1)
    example = source.load(1)
    targets = example.targets
    assert np.array_equal(example.image, scene.image) and example.labels is None
    expected = [e for e in scene.expressions if e.kind != "negative"]
    assert [(t.prompt, t.semantic) for t in targets] == [(e.prompt, e.semantic) for e in expected]
    for target, expr in zip(targets, expected, strict=True):
        assert np.array_equal(target.mask, expr.mask)


def test_dense_labels_name_the_shape_colour_and_size_on_top_in_each_cell() -> None:
    scene = generate_scene(5, 3)
    assert {o.size_word for o in scene.objects} == set(SIZE_NAMES)  # a scene with both sizes
    maps = label_maps(scene)
    for obj in scene.objects:  # visible masks: later objects are cut out of earlier ones
        assert (maps[0][obj.mask] == SHAPES.index(obj.shape) + 1).all()
        assert (maps[1][obj.mask] == COLOUR_NAMES.index(obj.colour) + 1).all()
        assert (maps[2][obj.mask] == SIZE_NAMES.index(obj.size_word) + 1).all()
    assert (maps[:, ~np.logical_or.reduce([o.mask for o in scene.objects])] == 0).all()
    labels = maps[0]
    h, w = labels.shape
    every = cell_labels(maps, 64)
    assert every.shape == (3, 64, 64) and every.dtype == torch.int64
    assert set(every[1].unique().tolist()) == {0, *(COLOUR_NAMES.index(o.colour) + 1 for o in scene.objects)}
    assert set(every[2].unique().tolist()) == {0, 1, 2}
    cells = every[0]
    # a cell wholly inside one label (scaled to the 64x64 grid: image y = (row + 0.5) * h / 64)
    for row, col in [(r, c) for r in range(0, 64, 7) for c in range(0, 64, 7)]:
        ys = slice(int(row * h / 64), int(np.ceil((row + 1) * h / 64)))
        xs = slice(int(col * w / 64), int(np.ceil((col + 1) * w / 64)))
        values = np.unique(labels[ys, xs])
        if len(values) == 1:
            assert cells[row, col] == values[0], (row, col)
    assert set(cells.unique().tolist()) == {0, *(SHAPES.index(o.shape) + 1 for o in scene.objects)}


def test_dense_head_classifies_the_kinds_it_is_given() -> None:
    labels = cell_labels(label_maps(generate_scene(5, 3)), 16)[None]
    levels = [torch.randn(1, 64, 4, 4), torch.randn(1, 8, 16, 16), torch.randn(1, 16, 8, 8)]
    embeddings = ImageEmbeddings(levels[0], [levels[1], levels[2]])
    shape_colour = DenseHead(64, ["colour", "shape"])
    with_size = DenseHead(64, ["size", "shape", "colour"])
    assert [log.shape[1] for log in shape_colour(embeddings)] == [len(SHAPES) + 1, len(COLOUR_NAMES) + 1]
    assert [log.shape[1] for log in with_size(embeddings)] == [len(SHAPES) + 1, len(COLOUR_NAMES) + 1, 3]
    _, metrics = with_size.loss(embeddings, labels)
    assert set(metrics) == {"shape", "shape_acc", "colour", "colour_acc", "size", "size_acc"}
    # the size logits are the last channels: a head that always says "big" is right where it is big
    with torch.no_grad():
        with_size.classify.weight.zero_()
        with_size.classify.bias.zero_()
        with_size.classify.bias[-1] = 5.0
    _, metrics = with_size.loss(embeddings, labels)
    on_object = labels[0, 2] > 0
    assert metrics["size_acc"] == pytest.approx(float((labels[0, 2][on_object] == 2).float().mean()))


def test_dense_head_copies_the_kinds_it_shares_with_another() -> None:
    shape_rows, colour_rows = len(SHAPES) + 1, len(COLOUR_NAMES) + 1
    torch.manual_seed(0)
    stage_one = DenseHead(64, ["shape", "colour"])
    torch.manual_seed(1)
    with_size = DenseHead(64, ["shape", "colour", "size"])
    colour_size = DenseHead(64, ["colour", "size"])
    fresh_size = with_size.classify.weight[-3:].detach().clone()
    fresh_colour_size = colour_size.classify.weight[colour_rows:].detach().clone()
    theirs = stage_one.state_dict()

    assert with_size.load_kinds(theirs, stage_one.kinds) == ["shape", "colour"]
    assert colour_size.load_kinds(theirs, stage_one.kinds) == ["colour"]
    for name in ("weight", "bias"):
        source = theirs[f"classify.{name}"]
        assert source.shape[0] == shape_rows + colour_rows
        torch.testing.assert_close(getattr(with_size.classify, name)[: shape_rows + colour_rows], source)
        torch.testing.assert_close(getattr(colour_size.classify, name)[:colour_rows], source[shape_rows:])
    # the size rows, which stage one never had, keep their initialisation
    torch.testing.assert_close(with_size.classify.weight[-3:], fresh_size)
    torch.testing.assert_close(colour_size.classify.weight[colour_rows:], fresh_colour_size)


def test_location_head_scores_the_cells_that_hold_the_target() -> None:
    # Three prompts on a 64x64 coverage grid: the target fills the top-left 8x8 cells (= grid cell
    # 0), the bottom-right ones (cell GRID*GRID - 1), or nothing (left out of the loss).
    coverage = torch.zeros(3, 64, 64)
    coverage[0, :8, :8] = 1
    coverage[1, -8:, -8:] = 1
    head = LocationHead(dim=4)
    with torch.no_grad():
        head.predict.weight.zero_()
        head.predict.bias.zero_()
        head.predict.bias[0] = 10.0  # every prompt: "the top-left cell"
    loss, metrics = head.loss(torch.randn(3, 1, 4), coverage)
    cells = GRID * GRID
    top_left = -(10 - np.log(np.exp(10) + cells - 1))  # -log softmax at the top-left cell
    bottom_right = -(0 - np.log(np.exp(10) + cells - 1))
    assert float(loss.detach()) == pytest.approx((top_left + bottom_right) / 2, rel=1e-5)
    assert metrics["location_acc"] == 0.5 and metrics["location"] == pytest.approx(float(loss.detach()))


def test_step_batches_depend_only_on_the_step() -> None:
    full = list(StepBatches(5, 3, seed=1, start=0, steps=6))
    assert list(StepBatches(5, 3, seed=1, start=4, steps=6)) == full[4:]
    assert all(step == k for k, batch in enumerate(full) for _, step in batch)
    first_epochs = [index for batch in full[:5] for index, _ in batch][:15]
    assert sorted(first_epochs) == sorted(list(range(5)) * 3)


# ----------------------------------------------------------------------------- training


def test_training_learns_saves_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An uninterrupted run.
    straight = tmp_path / "straight"
    # With both training-only heads, so that resuming covers their weights too.
    final = train(write_config(tmp_path / "a.yaml", tiny_config(straight, loss=TRAINING_HEADS_LOSS)))
    assert final == straight / "checkpoint-30"
    log = read_log(straight)
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30]
    assert log[-1]["loss"] < 0.7 * log[0]["loss"], log
    assert log[-1]["shape"] < log[0]["shape"] and log[-1]["colour"] < log[0]["colour"], log
    assert log[-1]["location"] < log[0]["location"], log
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-30"]

    predictor = EvfSam2Predictor.from_pretrained(final)
    assert predictor.mode == "multitask" and predictor.supports_semantic
    scene = generate_scene(5, 0)
    prediction = predictor.predict(scene.image, scene.expressions[0].prompt)
    assert prediction.mask.shape == scene.image.shape[:2]

    # The same recipe, interrupted after the checkpoint at step 15, then re-run.
    resumed = tmp_path / "resumed"
    config_path = write_config(tmp_path / "b.yaml", tiny_config(resumed, loss=TRAINING_HEADS_LOSS))
    original_step = Trainer._step
    calls = {"n": 0}

    def crash_at_step_18(self: Trainer, batch: list) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] > 18:
            raise KeyboardInterrupt
        return original_step(self, batch)

    monkeypatch.setattr(Trainer, "_step", crash_at_step_18)
    with pytest.raises(KeyboardInterrupt):
        train(config_path)
    monkeypatch.setattr(Trainer, "_step", original_step)
    assert [r["step"] for r in read_log(resumed)] == [5, 10, 15]

    with pytest.raises(FileExistsError, match="checkpoint-15"):
        train(config_path, resume=False)
    assert train(config_path) == resumed / "checkpoint-30"
    assert [r["step"] for r in read_log(resumed)] == [5, 10, 15, 20, 25, 30]
    state_a = torch.load(straight / "checkpoint-30" / STATE_FILE, weights_only=True)
    state_b = torch.load(resumed / "checkpoint-30" / STATE_FILE, weights_only=True)
    heads = ("dense_head", "location_head")
    a = {**state_a["model"], **{f"{h}.{k}": v for h in heads for k, v in state_a[h].items()}}
    b = {**state_b["model"], **{f"{h}.{k}": v for h in heads for k, v in state_b[h].items()}}
    assert len(a) == len(b) == len(state_a["model"]) + 4
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert train(config_path) == resumed / "checkpoint-30"  # already done: nothing to do


def test_fine_tune_may_start_the_dense_head_from_its_checkpoint(tmp_path: Path) -> None:
    stage_one = tiny_config(tmp_path / "a", loss=DENSE_LOSS, steps=2, checkpoint_every=2)
    first = train(write_config(tmp_path / "a.yaml", stage_one))
    saved = torch.load(first / STATE_FILE, weights_only=True)
    assert saved["dense_head_kinds"] == ["shape", "colour"]

    fine_tune = tiny_config(
        tmp_path / "b",
        model=None,
        init_from=str(first),
        init={"dense_head": "init_from"},
        loss={"dense": 1.0, "dense_labels": ["shape", "colour", "size"]},
    )
    head = Trainer(TrainConfig.from_yaml(write_config(tmp_path / "b.yaml", fine_tune))).dense_head
    assert head is not None and head.kinds == ["shape", "colour", "size"]
    rows = saved["dense_head"]["classify.weight"].shape[0]
    torch.testing.assert_close(head.classify.weight[:rows], saved["dense_head"]["classify.weight"])

    # a checkpoint without a trainer state (the official layout alone) has no head to start from
    no_state = {**fine_tune, "init_from": str(FIXTURE_CHECKPOINT), "output_dir": str(tmp_path / "c")}
    with pytest.raises(ValueError, match="init.dense_head: init_from: .* holds no dense head"):
        Trainer(TrainConfig.from_yaml(write_config(tmp_path / "c.yaml", no_state)))
    # and a new model has no checkpoint to start it from
    new_model = tiny_config(tmp_path / "d", init={"dense_head": "init_from"}, loss=DENSE_LOSS)
    with pytest.raises(ConfigError, match="init.dense_head: init_from .* needs init_from"):
        TrainConfig.from_yaml(write_config(tmp_path / "d.yaml", new_model))


# ----------------------------------------------------------------------------- the demo model


def test_demo_model_is_shipped_small_and_loads() -> None:
    files = list(DEMO_MODEL_DIR.iterdir())
    assert {f.name for f in files} >= {
        "config.json",
        "model.safetensors",
        "sentencepiece.bpe.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    }
    assert sum(f.stat().st_size for f in files) <= 15 * 1024 * 1024
    predictor = EvfSam2Predictor.from_pretrained("evf-sam2-demo")
    assert predictor.mode == "multitask" and predictor.supports_semantic
    assert (
        EvfSam2Predictor.from_pretrained(str(REPO / "evf" / "assets" / "evf-sam2-demo")).mode == "multitask"
    )
    # A regression guard at the level the shipped model reaches (held-out seed 9999, 500 scenes:
    # referring 0.73, semantic 0.87, negative 0.63; these 8 scenes: 0.69, 0.88, 0.76); issue 15's
    # bar (0.90 / 0.85 / 0.85) is not met yet for referring and negative (docs/demo-model.md).
    scores = evaluate_synthetic(predictor, seed=9999, count=8)
    assert scores.by_kind["referring"].miou > 0.65, scores.by_kind
    assert scores.by_kind["semantic"].miou > 0.80, scores.by_kind
    assert scores.by_kind["negative"].miou > 0.70, scores.by_kind


def test_demo_model_follows_referring_phrases_without_the_article() -> None:
    """Users write "red circle" where the generator writes "the red circle". On these 12 held-out
    scenes the shipped model scores 0.666 with the article and 0.613 without; stage 1 alone (never
    trained without it) scores 0.635 and 0.404."""
    predictor = EvfSam2Predictor.from_pretrained("evf-sam2-demo")
    scenes = [generate_scene(9999, index) for index in range(12)]
    expressions = [[e for e in scene.expressions if e.kind == "referring"] for scene in scenes]
    mean_iou = {}
    for form, text in (("with", lambda p: p), ("without", lambda p: p.removeprefix(f"{ARTICLE} "))):
        requests = [[Prompt(text(e.prompt)) for e in exprs] for exprs in expressions]
        results = predictor.predict_batch([scene.image for scene in scenes], requests)
        ious = [
            iou_of(*mask_counts(r.mask, e.mask))
            for exprs, predictions in zip(expressions, results, strict=True)
            for e, r in zip(exprs, predictions, strict=True)
        ]
        mean_iou[form] = float(np.mean(ious))
    assert mean_iou["without"] > 0.52, mean_iou
    assert mean_iou["with"] - mean_iou["without"] < 0.10, mean_iou
