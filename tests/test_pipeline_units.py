"""The job's pieces without Ray: config, manifest rows -> typed rows, stages called in-process."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evf.config import ConfigError
from evf.io import encode_png
from evf.manifest import resolve_url, scan_manifest
from evf.manifest_file import ManifestError
from evf.pipelines.commit import METADATA_SCHEMA, JobOutput, OutputLayout, write_metadata
from evf.pipelines.config import DEFAULT_CONFIG, SAMPLE_MANIFEST, SAMPLE_MANIFEST_ID, load_config
from evf.pipelines.decode import DecodeSettings, decode_batch
from evf.pipelines.finish import FinishSettings, finish_batch
from evf.pipelines.infer import InferenceSettings, InferenceStage
from evf.pipelines.metadata import load_committed, read_metadata
from evf.pipelines.read import (
    CommittedIndex,
    InvalidRow,
    ReadSettings,
    parse_row,
    read_task,
    request_key,
    task_ranges,
)
from evf.pipelines.rows import ROW_SCHEMA, JobRow, units_from_table
from evf.registry import describe_checkpoint
from evf.settings import ModelOptions
from evf.storage import Storage

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "evf-sam2-tiny" / "checkpoint"
CONFIGS = REPO / "configs"


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


_option_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=False),
    st.text(max_size=6),
    st.lists(st.integers(0, 9), max_size=3),
    st.tuples(st.integers(0, 2)),
)


@settings(max_examples=300, deadline=None)
@given(
    url=st.text(max_size=12),
    prompt=st.one_of(st.none(), st.text(max_size=12), st.integers()),
    options=st.dictionaries(st.sampled_from(["blur_mask", "mask_only", "points", "zz", "a"]), _option_values),
    grounding=st.one_of(st.none(), st.text(max_size=5)),
)
def test_request_key_is_the_hash_of_the_requests_json(url, prompt, options, grounding) -> None:
    """The key must stay what every committed output holds: sha256 of the sorted-key JSON of the
    request (written out here independently of the cached assembly)."""
    fields = {"image_url": url, "prompt": prompt, "options": dict(options), "model": "m"}
    if grounding is not None:
        fields["grounding"] = grounding
    payload = json.dumps(fields, sort_keys=True, default=repr, ensure_ascii=False)
    expected = hashlib.sha256(payload.encode()).hexdigest()[:32]
    assert request_key(url, prompt, options, "m", grounding) == expected
    # 1, 1.0 and True are equal as cache keys but not as JSON: each keeps its own key.
    keys = {request_key(url, prompt, {**options, "blur_mask": v}, "m") for v in (1, 1.0, True)}
    assert len(keys) == 3


@pytest.mark.parametrize("name", ["local.yaml", "s3.yaml", "cluster-gpu.yaml"])
def test_shipped_configs_are_valid(name):
    config = load_config(CONFIGS / name)
    assert config.manifest and config.output
    if name == "cluster-gpu.yaml":
        assert config.inference.num_gpus == 1 and config.device == "cuda" and config.ray.address
    else:
        assert config.inference.num_gpus == 0 and config.device == "cpu" and config.ray.address is None


def test_embedded_default_is_local_cpu_demo():
    config = load_config()
    assert config.model == "evf-sam2-demo"
    assert config.manifest == SAMPLE_MANIFEST_ID
    assert config.resolved().manifest == str(SAMPLE_MANIFEST) and SAMPLE_MANIFEST.exists()
    assert DEFAULT_CONFIG.exists()
    # The actor pool never reserves every CPU of a 2-core machine.
    assert config.inference.actors * config.inference.num_cpus + config.cpu.num_cpus <= 2


def test_config_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("manifest: m.parquet\noutput: out\ninference:\n  actors: 0\n  batchsize: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "inference.actors" in text and "inference.batchsize: unknown field" in text and str(path) in text
    path.write_text("manifest: m.parquet\noutput: out\ndefaults:\n  blur_mask: 4\n")
    with pytest.raises(ConfigError, match="blur_mask"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="num_gpus"):
        load_config(DEFAULT_CONFIG, {"inference.device": "cuda"})


def test_overrides_and_derived_values():
    config = load_config(
        DEFAULT_CONFIG, ["inference.batch_size=3", "defaults.mask_only=false", "ray.num_cpus=4"]
    )
    assert (
        config.inference.batch_size == 3
        and config.defaults["mask_only"] is False
        and config.ray.num_cpus == 4
    )
    config = load_config(DEFAULT_CONFIG, {"inference.actors": 2, "model": None})
    assert config.torch_threads(node_cpus=8) == 4  # CPU: the cores shared among the actors
    assert load_config(DEFAULT_CONFIG, {"inference.torch_threads": 3}).torch_threads(8) == 3
    gpu = load_config(CONFIGS / "cluster-gpu.yaml")
    assert gpu.torch_threads() == 1
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(DEFAULT_CONFIG, ["nonsense"])


def test_public_config_hides_credentials():
    config = load_config(DEFAULT_CONFIG, {"storage_options": {"key": "AKIAXXXX", "secret": "s3cr3t-value"}})
    text = json.dumps(config.public_dict())
    assert "s3cr3t-value" not in text and "AKIAXXXX" not in text
    assert "s3cr3t-value" not in repr(Storage.from_environment(config.storage_options))


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------


def _write(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(name for row in rows for name in row))  # every column of every row
    rows = [{name: row.get(name) for name in names} for row in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_scan_single_file_and_folder(tmp_path):
    _write(tmp_path / "one.parquet", [{"image_url": "a.png", "prompt": "x"}] * 3)
    manifest = scan_manifest(str(tmp_path / "one.parquet"))
    assert manifest.num_rows == 3 and manifest.ids.to_pylist() == [
        "one.parquet:0",
        "one.parquet:1",
        "one.parquet:2",
    ]
    assert manifest.files[0].base == str(tmp_path)

    folder = tmp_path / "folder"
    _write(folder / "part-1.parquet", [{"id": "a", "image_url": "a.png", "prompt": "x"}])
    _write(folder / "sub" / "part-2.parquet", [{"id": None, "image_url": "b.png", "prompt": "y"}])
    _write(folder / "_ignored.parquet", [{"nothing": 1}])
    (folder / "notes.txt").write_text("not a manifest file")
    manifest = scan_manifest(str(folder))
    assert [f.name for f in manifest.files] == ["part-1.parquet", "sub/part-2.parquet"]
    assert manifest.ids.to_pylist() == ["a", "sub/part-2.parquet:0"]
    assert manifest.files[1].base == str(folder / "sub")


def test_scan_rejects_unusable_manifests(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        scan_manifest(str(tmp_path / "nope.parquet"))
    _write(tmp_path / "cols.parquet", [{"image_url": "a.png", "text": "x"}])
    with pytest.raises(ManifestError, match="lacks required column.*prompt"):
        scan_manifest(str(tmp_path / "cols.parquet"))
    _write(tmp_path / "dup.parquet", [{"id": "a", "image_url": "a.png", "prompt": "x"}] * 2)
    with pytest.raises(ManifestError, match="unique.*'a' \\(2x\\)"):
        scan_manifest(str(tmp_path / "dup.parquet"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ManifestError, match="cannot read manifest file"):
        scan_manifest(str(tmp_path / "junk.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no \\*.parquet"):
        scan_manifest(str(tmp_path / "empty"))


def test_relative_image_urls_resolve_against_the_manifest_folder():
    assert resolve_url("images/a.png", "/data/set") == "/data/set/images/a.png"
    assert resolve_url("images/a.png", "s3://bucket/set") == "s3://bucket/set/images/a.png"
    assert resolve_url("/abs/a.png", "s3://bucket/set") == "/abs/a.png"
    assert resolve_url("s3://other/a.png", "/data") == "s3://other/a.png"
    assert resolve_url("data:image/png;base64,xx", "/data") == "data:image/png;base64,xx"


def test_rows_are_validated_once_at_read(tmp_path):
    _write(tmp_path / "m.parquet", [{"image_url": "a.png", "prompt": "x"}])
    file = scan_manifest(str(tmp_path / "m.parquet")).files[0]
    defaults = {"mask_only": False, "expand_mask": 1}

    def parse(model_id="m", **row):
        return parse_row({"_row": 7, **row}, file=file, defaults=defaults, model_id=model_id)

    ok = parse(image_url="a.png", prompt="the cat", blur_mask=5.0, fill_holes=None, expand_mask=float("nan"))
    assert isinstance(ok, JobRow) and ok.error is None and ok.id == "m.parquet:7"
    assert ok.image_url == str(tmp_path / "a.png")
    request = ok.request
    assert request.blur_mask == 5 and request.fill_holes is False  # 5.0 -> 5; null -> default
    assert request.mask_only is False and request.expand_mask == 1  # job defaults
    assert parse(id="x", image_url="a.png", prompt="the cat", blur_mask=5).key == ok.key
    assert parse(image_url="a.png", prompt="the cat", blur_mask=7).key != ok.key
    assert parse("other", image_url="a.png", prompt="the cat", blur_mask=5).key != ok.key
    assert len(ok.key) == 32 and int(ok.key, 16) >= 0
    assert ok.key == request_key(ok.image_url, "the cat", request.options(), "m")

    bad = parse(image_url="a.png", prompt="", blur_mask=4, expand_mask=99)
    assert isinstance(bad, InvalidRow)
    assert "prompt" in bad.error and "blur_mask=4" in bad.error and "expand_mask=99" in bad.error
    assert "image_url" in parse(image_url=None, prompt="x").error
    assert "semantic_type" in parse(image_url="a.png", prompt="x", semantic_type="yes").error


def test_read_drops_committed_rows(tmp_path):
    rows = [
        {"id": "same", "image_url": "a.png", "prompt": "the cat", "blur_mask": 5},
        {"id": "changed", "image_url": "a.png", "prompt": "the dog"},
        {"id": "new", "image_url": "a.png", "prompt": "the bird"},
    ]
    file = scan_manifest(str(_write(tmp_path / "m.parquet", rows))).files[0]
    first = read_task(file, 0, 3, ReadSettings(_output(tmp_path)))
    keys = dict(zip(first.column("id").to_pylist(), first.column("key").to_pylist(), strict=True))
    committed = CommittedIndex.build(pa.table({"id": ["same", "changed"], "key": [keys["same"], "older"]}))
    again = read_task(file, 0, 3, ReadSettings(_output(tmp_path), committed=committed))
    # Committed rows leave at read, changed (stale) or not; the e2e resume test counts the stale one.
    assert again.schema == ROW_SCHEMA and again.column("id").to_pylist() == ["new"]


def test_read_tasks_put_rows_to_do_first_and_cover_every_row_once(tmp_path):
    folder = tmp_path / "manifest"
    folder.mkdir()
    _write(folder / "a.parquet", [{"image_url": "x.png", "prompt": f"p{i}"} for i in range(10)])
    _write(folder / "b.parquet", [{"image_url": "x.png", "prompt": f"p{i}"} for i in range(7)])
    a, b = scan_manifest(str(folder)).files
    committed = np.ones(17, bool)
    committed[[4, 10 + 2]] = False  # row 4 of a.parquet, row 2 of b.parquet
    ranges = [(f.name, start, stop) for f, start, stop in task_ranges([a, b], 3, committed)]
    # The ranges holding those rows first; then the committed ones, contiguous ones merged.
    assert ranges == [("a.parquet", 3, 6), ("b.parquet", 0, 3), ("a.parquet", 0, 3), ("a.parquet", 6, 10),
                      ("b.parquet", 3, 7)]  # fmt: skip
    plain = [(f.name, start, stop) for f, start, stop in task_ranges([a, b], 3)]
    assert sorted(plain) == plain and len(plain) == 4 + 3
    for name, rows in (("a.parquet", 10), ("b.parquet", 7)):
        covered = sorted(i for n, start, stop in ranges if n == name for i in range(start, stop))
        assert covered == list(range(rows))


def test_committed_index_finds_committed_and_stale_rows():
    ids = [f"row-{i}" for i in range(5000)]
    index = CommittedIndex.build(pa.table({"id": ids, "key": [f"key-{i}" for i in range(5000)]}))
    committed, stale = index.lookup(
        ["row-5", "row-4999", "row-5000", "row-7", "x"], ["key-5", "key-4999", "key-5000", "changed", "y"]
    )
    assert committed.tolist() == [True, True, False, True, False]
    assert stale.tolist() == [False, False, False, True, False]
    empty = CommittedIndex.build(
        pa.table({"id": pa.array([], pa.string()), "key": pa.array([], pa.string())})
    )
    assert empty.lookup(["a"], ["b"])[0].tolist() == [False]


def test_readers_see_the_newest_row_of_each_id(tmp_path):
    """A retried row (a later run) replaces its earlier row for every reader; rows of one run are one."""
    layout = OutputLayout(str(tmp_path))
    write_metadata(
        layout,
        [{"id": "a", "key": "k", "status": "error", "retryable": True, "run_id": "20260101T000000Z-1"}],
        None,
    )
    write_metadata(
        layout,
        [
            {"id": "a", "key": "k", "status": "ok", "run_id": "20260102T000000Z-2"},
            {"id": "b", "key": "k", "status": "empty", "run_id": "20260101T000000Z-1"},
        ],
        None,
    )
    write_metadata(layout, [{"id": "b", "key": "k", "status": "empty", "run_id": "20260101T000000Z-1"}], None)
    table = read_metadata(str(tmp_path))
    assert table.column("id").to_pylist() == ["a", "b"] and table.column("status").to_pylist() == [
        "ok",
        "empty",
    ]
    committed = load_committed(layout)
    assert committed.duplicate_rows == 2 and committed.counts() == {"ok": 1, "empty": 1}
    assert committed.of(pa.array(["a"])).counts(run_id="20260102T000000Z-2") == {"ok": 1}


# --------------------------------------------------------------------------------------------------
# Stages in-process
# --------------------------------------------------------------------------------------------------


def _output(folder: Path) -> JobOutput:
    return JobOutput(OutputLayout(str(folder / "out")), Storage(), "m", "run-1")


@pytest.fixture(scope="module")
def checkpoint():
    return describe_checkpoint(str(TINY))


def test_checkpoint_description_matches_the_predictor(checkpoint, fixture_dir):
    from evf.io import load_image
    from evf.predictor import EvfSam2Predictor

    predictor = EvfSam2Predictor.from_pretrained(TINY)
    assert (
        checkpoint.info.facts["mode"],
        checkpoint.preprocessor.sam_size,
        checkpoint.preprocessor.beit3_size,
    ) == (
        predictor.mode,
        predictor.model.sam_image_size,
        predictor.model.beit3_image_size,
    )
    assert checkpoint.is_demo_model is False and checkpoint.supports_semantic == predictor.supports_semantic
    image = load_image(str(fixture_dir / "images" / "portrait_97x173.png"))
    prepared, expected = checkpoint.preprocessor(image), predictor.prepare_image(image)
    assert torch.equal(prepared.sam_pixels, expected.sam_pixels)
    assert torch.equal(prepared.beit3_pixels, expected.beit3_pixels)
    legacy = describe_checkpoint(str(TINY), ModelOptions(mode="legacy"))
    assert legacy.info.facts["mode"] == "legacy"
    assert torch.equal(
        legacy.preprocessor(image).sam_pixels,
        EvfSam2Predictor.from_pretrained(TINY, mode="legacy").prepare_image(image).sam_pixels,
    )


def _image_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (h, w) in {"a.png": (40, 60), "b.png": (50, 30)}.items():
        (folder / name).write_bytes(encode_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    (folder / "text.png").write_text("not an image")
    return folder


def test_decode_stage_reads_each_image_once_per_batch(tmp_path, checkpoint, monkeypatch):
    _image_dir(tmp_path)
    rows = [
        {"id": "1", "image_url": "images/a.png", "prompt": "the red circle"},
        {"id": "2", "image_url": "images/b.png", "prompt": "the star", "mask_only": False},
        {"id": "3", "image_url": "images/a.png", "prompt": "the blue square"},
        {"id": "4", "image_url": "images/text.png", "prompt": "the star"},
        {"id": "5", "image_url": "images/a.png", "prompt": ""},
        {"id": "6", "image_url": "images/a.png", "prompt": "done already"},
    ]
    file = scan_manifest(str(_write(tmp_path / "m.parquet", rows))).files[0]
    output = _output(tmp_path)
    committed = CommittedIndex.build(pa.table({"id": ["6"], "key": ["k"]}))
    to_do = read_task(file, 0, 6, ReadSettings(output, committed=committed))
    # The invalid row is committed at read and the committed one dropped: neither goes further.
    assert to_do.schema == ROW_SCHEMA and to_do.column("id").to_pylist() == ["1", "2", "3", "4"]

    reads = []
    import evf.pipelines.decode as decode

    real_read = decode.read_bytes
    monkeypatch.setattr(decode, "read_bytes", lambda url, *args: reads.append(url) or real_read(url, *args))
    units = units_from_table(decode_batch(to_do, settings=DecodeSettings(output, checkpoint.preprocessor)))
    assert sorted(reads) == sorted(str(tmp_path / "images" / n) for n in ("a.png", "b.png", "text.png"))
    by_image = {frozenset(r.id for r in u.rows): u for u in units}
    assert set(by_image) == {frozenset("13"), frozenset("2")}
    committed = {r["id"]: (r["status"], r["error"]) for r in read_metadata(output.layout.root).to_pylist()}
    assert set(committed) == {"4", "5"}
    assert committed["4"][0] == "error" and "not an image" in committed["4"][1]
    assert committed["5"][0] == "error" and "prompt" in committed["5"][1]
    assert by_image[frozenset("13")].image is None  # masks only: the image is not carried
    assert len(by_image[frozenset("2")].image) == 50 * 30 * 3  # RGBA output needs it


def test_inference_and_finish_stages(tmp_path, checkpoint):
    """One batch through the actor class and the finish step, in-process; a failing row is isolated."""
    _image_dir(tmp_path)
    rows = [
        {"id": "1", "image_url": "images/a.png", "prompt": "the red circle", "negative_prompt": "the star"},
        {"id": "2", "image_url": "images/b.png", "prompt": "the star", "mask_only": False},
        {"id": "3", "image_url": "images/a.png", "prompt": "the blue square", "use_grounding_dino": True},
        {"id": "4", "image_url": "images/a.png", "prompt": "the blue square", "revert_mask": True},
    ]
    file = scan_manifest(str(_write(tmp_path / "m.parquet", rows))).files[0]
    output = _output(tmp_path)
    to_do = read_task(file, 0, 4, ReadSettings(output))
    units = decode_batch(to_do, settings=DecodeSettings(output, checkpoint.preprocessor))
    actor = InferenceStage(InferenceSettings(checkpoint=checkpoint, storage=Storage(), torch_threads=1))
    inferred = actor(units)
    assert inferred.column("inputs").null_count == inferred.num_rows  # model inputs dropped after use

    # A model failure on one prompt costs only that row.
    real = actor.engine._run

    def flaky(images, arrays, items):
        if any(r.prompt == "the red circle" for _, r in items):
            raise RuntimeError("simulated model failure")
        return real(images, arrays, items)

    actor.engine._run = flaky
    out_rows = {r.id: r for u in units_from_table(actor(units)) for r in u.rows}
    assert "simulated model failure" in out_rows["1"].error
    assert out_rows["4"].error is None and out_rows["4"].mask_index is not None

    result = finish_batch(inferred, settings=FinishSettings(output))
    statuses = dict(zip(result.column("id").to_pylist(), result.column("status").to_pylist(), strict=True))
    assert statuses["3"] == "error" and statuses["1"] in ("ok", "empty") and statuses["2"] in ("ok", "empty")
    metadata = read_metadata(output.layout.root)
    assert metadata.schema == METADATA_SCHEMA and metadata.num_rows == 4
    rows_out = {r["id"]: r for r in metadata.to_pylist()}
    assert "GroundingDINO" in rows_out["3"]["error"] and rows_out["3"]["mask_url"] is None
    assert rows_out["1"]["negative_prompt"] == "the star" and rows_out["4"]["revert_mask"] is True
    assert Path(rows_out["2"]["mask_url"]).exists() and rows_out["2"]["width"] == 30
    files = list(Path(output.layout.metadata).iterdir())
    assert len(files) == 1 and files[0].name.startswith("part-")

    # A retried batch rewrites the same commit file: no second row per id.
    finish_batch(inferred, settings=FinishSettings(output))
    assert [p.name for p in Path(output.layout.metadata).iterdir()] == [files[0].name]
    committed = load_committed(output.layout)
    assert sorted(committed.ids.to_pylist()) == ["1", "2", "3", "4"] and committed.duplicate_rows == 0


def test_cli_rejects_bad_config(tmp_path, capsys):
    from evf.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("manifest: m.parquet\noutput: out\ninference: {actors: -1}\n")
    assert main(["run", str(path)]) == 2
    assert "inference.actors" in capsys.readouterr().err


def test_cli_job_failure_exit_code(tmp_path, capsys):
    from evf.cli import main

    code = main(["run", "--manifest", str(tmp_path / "missing.parquet"), "--output", str(tmp_path / "o")])
    assert code == 1
    assert "job failed" in capsys.readouterr().err


def _checkpoint_without_semantic(tmp_path: Path) -> Path:
    """The tiny checkpoint with the [semantic] token removed (as the non-multitask checkpoints)."""
    folder = tmp_path / "no-semantic"
    folder.mkdir()
    for file in TINY.iterdir():
        if file.name != "added_tokens.json":
            (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        k: v for k, v in config["added_tokens_decoder"].items() if v["content"] != "[semantic]"
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("semantic_rows", "warned"), [([False, True], True), ([False, False], False)])
def test_semantic_rows_on_a_checkpoint_without_the_token_warn_once_per_job(
    tmp_path, caplog, semantic_rows, warned
):
    from evf.pipelines.job import warn_if_semantic_unsupported

    manifest_path = tmp_path / "m.parquet"
    pq.write_table(
        pa.table({"image_url": ["a.png"] * 2, "prompt": ["x", "y"], "semantic_type": semantic_rows}),
        manifest_path,
    )
    checkpoint = _checkpoint_without_semantic(tmp_path)
    config = load_config(overrides={"manifest": str(manifest_path), "model": str(checkpoint)})
    info = describe_checkpoint(str(checkpoint))
    assert not info.supports_semantic and info.info.facts["mode"] == "legacy"
    with caplog.at_level("WARNING"):
        warn_if_semantic_unsupported(config, scan_manifest(str(manifest_path)), info, Storage())
    assert sum("[semantic]" in r.getMessage() for r in caplog.records) == (1 if warned else 0)


def test_a_column_mapping_reads_other_manifests_as_they_are(tmp_path):
    """An img2dataset manifest (``url``, ``caption``, ``key``) through ``columns``, unchanged on disk."""
    rows = [{"key": "k0", "url": "a.png", "caption": "the cat"}, {"key": "k1", "url": "b.png", "caption": ""}]
    path = _write(tmp_path / "img2dataset.parquet", rows)
    with pytest.raises(ManifestError, match="image_url.*--columns image_url=url"):
        scan_manifest(str(path))
    mapping = {"image_url": "url", "prompt": "caption", "id": "key"}
    manifest = scan_manifest(str(path), columns=mapping)
    assert manifest.ids.to_pylist() == ["k0", "k1"]
    output = _output(tmp_path)
    to_do = read_task(manifest.files[0], 0, 2, ReadSettings(output))
    assert to_do.column("id").to_pylist() == ["k0"] and to_do.column("prompt").to_pylist() == ["the cat"]
    assert to_do.column("image_url").to_pylist() == [str(tmp_path / "a.png")]
    invalid = read_metadata(output.layout.root).to_pylist()
    assert [(r["id"], r["status"]) for r in invalid] == [("k1", "error")] and "prompt" in invalid[0]["error"]
    config = load_config(None, None, {"manifest": str(path), "output": "o", "columns": mapping})
    assert config.columns == mapping
    with pytest.raises(ConfigError, match="unknown column"):
        load_config(None, ["columns.caption=text"])


def test_a_config_error_names_the_flag_and_the_likely_field(capsys) -> None:
    from evf.cli import main

    with pytest.raises(
        ConfigError,
        match=r"inference.batchsize \(from --set inference.batchsize=4\): unknown "
        r"field; did you mean 'batch_size'\?",
    ):
        load_config(None, ["inference.batchsize=4"])
    with pytest.raises(
        ConfigError,
        match=r"inferense \(from --set inferense.actors=2\): unknown field; did you "
        r"mean 'inference'\?",
    ):
        load_config(None, ["inferense.actors=2"])
    with pytest.raises(ConfigError, match=r"'imag': unknown column; did you mean 'image'\?"):
        load_config(None, ["columns.imag=x"])
    with pytest.raises(
        ConfigError, match=r"unknown field; allowed fields: device, dtype, mode, compile, actors, num_gpus"
    ):
        load_config(None, ["inference.zzz=1"])
    # A flag's bad value is blamed on the flag, not on the config file it overrides.
    assert main(["run", "--images", "x", "--prompt", "y", "--output", "o", "--max-error-rate", "5"]) == 2
    assert (
        "max_error_rate (from --max-error-rate): Input should be less than or equal to 1"
        in capsys.readouterr().err
    )
    assert (
        main(["run", "--images", "x", "--prompt", "y", "--output", "o", "--set", "defaults.expandmask=3"])
        == 2
    )
    assert "'expandmask': unknown option; did you mean 'expand_mask'?" in capsys.readouterr().err


def test_actor_pool_may_autoscale():
    gpu = load_config(CONFIGS / "cluster-gpu.yaml")
    assert (gpu.inference.min_actors, gpu.inference.max_actors) == (1, 8)
    fixed = load_config(None, ["inference.actors=3"])
    assert (fixed.inference.min_actors, fixed.inference.max_actors) == (3, 3)
    with pytest.raises(ConfigError, match="max .2. must be >= min .3."):
        load_config(None, ["inference.actors={min: 3, max: 2}"])
