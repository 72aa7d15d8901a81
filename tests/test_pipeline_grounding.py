"""The batch job with GroundingDINO rows (``use_grounding_dino``) beside EVF rows.

The EVF model is the tiny fixture checkpoint; the detector is the tiny random-weights GroundingDINO
of ``conftest.write_tiny_grounding_dino`` (random boxes). The main job's ``box_threshold`` is chosen
from that detector's own scores so that it keeps some boxes and drops others; a second small job
with ``box_threshold: 1.0`` finds no box at all (``empty`` rows with ``instances == []``).

The jobs run on the session's Ray (``conftest.ray_session``); the actor's detector loading is
checked in-process on the stage classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import rle_to_mask
from test_pipeline_e2e import check_outputs

from evf.manifest import scan_manifest
from evf.pipelines.commit import (
    METADATA_SCHEMA,
    JobOutput,
    OutputLayout,
    metadata_table,
    write_metadata,
)
from evf.pipelines.config import DEFAULT_CONFIG, load_config
from evf.pipelines.decode import DecodeSettings, decode_batch
from evf.pipelines.infer import InferenceSettings, InferenceStage
from evf.pipelines.job import run_job
from evf.pipelines.metadata import load_committed, read_metadata
from evf.pipelines.read import ReadSettings, grounding_id, parse_row, read_task
from evf.pipelines.rows import JobRow, units_from_table
from evf.pipelines.summary import JobSummary
from evf.postprocess import postprocess
from evf.registry import describe_checkpoint
from evf.request import parse_request
from evf.settings import GroundingSettings
from evf.storage import Storage

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "evf-sam2-tiny" / "checkpoint"
# Small batches: the rows span two decode tasks and several model calls.
FAST = {
    "progress": False,
    "cpu.batch_size": 5,
    "inference.batch_size": 2,
    "inference.dtype": "float32",  # the job's masks are compared with a float32 predictor's
    "model": str(TINY),
}

Row = tuple[str, str, str, dict[str, Any]]  # (id, image, prompt, options); "g*" rows use GroundingDINO
GD = {"use_grounding_dino": True}
ROWS: list[Row] = [
    ("e1", "a.png", "the red square", {}),
    ("g1", "a.png", "red square", GD),
    ("g2", "b.png", "dog", {**GD, "negative_prompt": "cat"}),
    ("e2", "b.png", "circle", {"negative_prompt": "left"}),
    ("g3", "c.png", "big dog", {**GD, "mask_only": False, "expand_mask": 3}),
    ("g4", "c.png", "green circle", {**GD, "fill_holes": True}),
    ("g5", "a.png", "the blue circle", GD),
    ("g6", "b.png", "left cat", GD),
    ("g7", "c.png", "the square", GD),
    ("e3", "c.png", "blue circle", {"revert_mask": True}),
]
NO_BOX_ROWS: list[Row] = [
    ("e1", "a.png", "the red square", {}),
    ("g1", "a.png", "red square", GD),
    ("g3", "c.png", "big dog", {**GD, "mask_only": False, "expand_mask": 3}),
    ("g8", "b.png", "dog", {**GD, "revert_mask": True}),
]


def _grounding(rows: list[Row]) -> list[str]:
    return [row_id for row_id, _, _, options in rows if options.get("use_grounding_dino")]


def _image(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[height // 4 : height // 2, width // 5 : width // 2] = (200, 30, 30)
    return image


def _write_manifest(path: Path, rows: list[Row]) -> Path:
    records = [{"id": i, "image_url": f"images/{name}", "prompt": p, **o} for i, name, p, o in rows]
    names = list(dict.fromkeys(k for r in records for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in names} for r in records]), path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """Three images of different sizes and the manifests ``m.parquet`` (``ROWS``) and
    ``no-box.parquet`` (``NO_BOX_ROWS``) beside them (relative image URLs)."""
    root = tmp_path_factory.mktemp("grounding-data")
    images = {"a.png": _image(1, 90, 140), "b.png": _image(2, 120, 70), "c.png": _image(3, 64, 96)}
    (root / "images").mkdir()
    for name, image in images.items():
        assert cv2.imwrite(str(root / "images" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    _write_manifest(root / "no-box.parquet", NO_BOX_ROWS)
    return _write_manifest(root / "m.parquet", ROWS), images


@pytest.fixture(scope="module")
def threshold(grounding_dino_dir: Path, dataset: tuple[Path, dict[str, np.ndarray]]) -> float:
    """A box threshold that keeps some of the tiny detector's boxes, in the widest gap between its
    scores (so no box is near it: batching moves scores by ~1e-6)."""
    from evf.grounding import GroundingDetector

    _, images = dataset
    detector = GroundingDetector.from_pretrained(grounding_dino_dir, box_threshold=0.0)
    queries = [(name, prompt) for _, name, prompt, o in ROWS if o.get("use_grounding_dino")]
    queries += [(name, o["negative_prompt"]) for _, name, _, o in ROWS if o.get("negative_prompt")]
    scores = sorted(
        float(score)
        for name, text in queries
        for score in detector.detect([images[name]], [(0, text)])[0].scores
    )
    gaps = [
        (b - a, (a + b) / 2) for a, b in zip(scores, scores[1:], strict=False) if 0.3 < (a + b) / 2 < 0.98
    ]
    width, middle = max(gaps)
    assert width > 1e-3, scores
    return middle


@pytest.fixture(scope="module")
def predictor():
    from evf.predictor import EvfSam2Predictor

    return EvfSam2Predictor.from_pretrained(TINY)


def _run(manifest: Path, output: Path, **overrides: Any) -> tuple[Any, JobSummary]:
    config = load_config(
        DEFAULT_CONFIG, {"manifest": str(manifest), "output": str(output), **FAST, **overrides}
    )
    return config, run_job(config)


def _written(row: dict[str, Any]) -> np.ndarray:
    """The written output as the library returns it (uint8 mask, or RGBA)."""
    image = cv2.imread(row["mask_url"], cv2.IMREAD_UNCHANGED)
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)


def check_rows(
    spec: list[Row], metadata: pa.Table, images: dict[str, np.ndarray], predictor: Any, detector: Any
) -> dict[str, dict[str, Any]]:
    """Every metadata row against ``evf.segment`` on the same row, and each GroundingDINO row's mask
    against its instances. Returns the rows by id."""
    from evf.segment import segment

    rows = {r["id"]: r for r in metadata.to_pylist()}
    assert sorted(rows) == sorted(r[0] for r in spec)
    for row_id, name, prompt, options in spec:
        row, grounding = rows[row_id], bool(options.get("use_grounding_dino"))
        assert row["use_grounding_dino"] is grounding and row["status"] in ("ok", "empty"), row
        written = _written(row)
        mask = written if written.ndim == 2 else written[:, :, 3]

        # The same row through evf.segment directly: the same output, score, status and instances.
        request = {"prompt": prompt, **options}
        expected = segment(images[name], request, predictor, detector=detector)
        np.testing.assert_array_equal(written, expected.image, err_msg=row_id)
        assert row["score"] == pytest.approx(expected.score, abs=1e-4), row_id
        assert row["status"] == ("empty" if expected.empty else "ok"), row_id
        if not grounding:
            assert row["instances"] is None and expected.instances is None, row_id
            continue

        instances = row["instances"]
        assert isinstance(instances, list) and len(instances) == len(expected.instances), row_id
        union = np.zeros(images[name].shape[:2], bool)
        for got, want in zip(instances, expected.instances, strict=True):
            assert set(got) == {"box", "detector_score", "mask_score", "label", "rle"}
            assert got["box"] == pytest.approx(want["box"], abs=1e-3)
            assert got["detector_score"] == pytest.approx(want["detector_score"], abs=1e-5)
            assert got["detector_score"] > detector.box_threshold
            assert got["mask_score"] == pytest.approx(want["mask_score"], abs=1e-4)
            assert got["label"] == want["label"]
            assert got["rle"]["size"] == [row["height"], row["width"]]
            instance_mask = rle_to_mask(got["rle"]).astype(bool)
            assert instance_mask.shape == images[name].shape[:2]
            np.testing.assert_array_equal(
                instance_mask, rle_to_mask(want["rle"]).astype(bool), err_msg=row_id
            )
            union |= instance_mask
        scores = [i["detector_score"] for i in instances]
        assert scores == sorted(scores, reverse=True), row_id  # highest detector score first
        best = max((i["mask_score"] for i in instances), default=0.0)
        assert row["score"] == pytest.approx(best, abs=1e-6), row_id

        # The written mask is the union of the instance masks, post-processed with the row's options.
        parsed = parse_request(request)
        if parsed.negative_prompt:
            assert not mask[~union].any(), row_id  # the negative's boxes only remove pixels
            continue
        expected_mask = postprocess(
            union,
            fill_holes=parsed.fill_holes,
            expand_mask=parsed.expand_mask,
            blur_mask=parsed.blur_mask,
            revert_mask=parsed.revert_mask,
        )
        np.testing.assert_array_equal(mask, expected_mask, err_msg=row_id)
        if options == GD:  # no options: exactly the union
            np.testing.assert_array_equal(mask > 0, union, err_msg=row_id)
    return rows


def test_mixed_evf_and_grounding_rows_in_one_job(
    ray_session, tmp_path, dataset, grounding_dino_dir, threshold, predictor
):
    from evf.grounding import GroundingDetector

    manifest, images = dataset
    output = tmp_path / "out"
    config, summary = _run(
        manifest, output, **{"grounding.model": str(grounding_dino_dir), "grounding.box_threshold": threshold}
    )
    metadata = check_outputs(str(output), [r[0] for r in ROWS], summary)
    assert metadata.schema == METADATA_SCHEMA and summary.error == 0
    detector = GroundingDetector.from_pretrained(grounding_dino_dir, box_threshold=threshold)
    rows = check_rows(ROWS, metadata, images, predictor, detector)
    counts = [len(rows[i]["instances"]) for i in _grounding(ROWS)]
    assert min(counts) > 0 and len(set(counts)) > 1, counts  # the threshold kept some boxes, not all

    # Resume: a re-run commits nothing new and rewrites no file.
    files = {p.name: p.stat().st_mtime_ns for p in (output / "metadata").iterdir()}
    again = run_job(config)
    assert again.skipped == len(ROWS) and again.processed == 0 and again.counts == summary.counts
    assert {p.name: p.stat().st_mtime_ns for p in (output / "metadata").iterdir()} == files


def test_rows_without_any_box_are_empty(ray_session, tmp_path, dataset, grounding_dino_dir, predictor):
    """box_threshold 1.0: GroundingDINO finds nothing. Empty rows with ``instances == []``, not errors;
    ``revert_mask`` still applies (a full mask, status ok)."""
    from evf.grounding import GroundingDetector

    manifest, images = dataset
    output = tmp_path / "out"
    _, summary = _run(
        manifest.parent / "no-box.parquet",
        output,
        **{"grounding.model": str(grounding_dino_dir), "grounding.box_threshold": 1.0},
    )
    metadata = check_outputs(str(output), [r[0] for r in NO_BOX_ROWS], summary)
    detector = GroundingDetector.from_pretrained(grounding_dino_dir, box_threshold=1.0)
    rows = check_rows(NO_BOX_ROWS, metadata, images, predictor, detector)
    for row_id in ("g1", "g3"):
        assert rows[row_id]["instances"] == [] and rows[row_id]["status"] == "empty", rows[row_id]
        assert rows[row_id]["area"] == 0 and rows[row_id]["score"] == 0.0
    reverted = rows["g8"]
    assert reverted["instances"] == [] and reverted["status"] == "ok"
    assert reverted["area"] == reverted["width"] * reverted["height"]
    assert rows["e1"]["instances"] is None
    assert summary.error == 0 and summary.empty >= 2


# --------------------------------------------------------------------------------------------------
# The actor's detector, in-process (no Ray)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint():
    return describe_checkpoint(str(TINY))


def _units(manifest: Path, checkpoint, ids: set[str]) -> pa.Table:
    file = scan_manifest(str(manifest)).files[0]
    output = JobOutput(OutputLayout(str(manifest.parent / "out")), Storage(), "m", "run-1")
    rows = read_task(file, 0, file.num_rows, ReadSettings(output))
    keep = [i for i, row_id in enumerate(rows.column("id").to_pylist()) if row_id in ids]
    return decode_batch(rows.take(keep), settings=DecodeSettings(output, checkpoint.preprocessor))


def _rows(table: pa.Table) -> dict[str, JobRow]:
    return {row.id: row for unit in units_from_table(table) for row in unit.rows}


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, Any]]]:
    """Calls of ``GroundingDetector.from_pretrained`` (which still loads)."""
    from evf.grounding import GroundingDetector

    calls: list[tuple[Any, dict[str, Any]]] = []
    real = GroundingDetector.from_pretrained.__func__

    def counting(cls, path, *args, **kwargs):
        calls.append((path, kwargs))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(GroundingDetector, "from_pretrained", classmethod(counting))
    return calls


def test_actor_loads_the_detector_once_and_only_when_needed(dataset, checkpoint, grounding_dino_dir, loads):
    manifest, _ = dataset
    settings = InferenceSettings(
        checkpoint=checkpoint,
        storage=Storage(),
        torch_threads=1,
        grounding=GroundingSettings(str(grounding_dino_dir), box_threshold=0.0, text_threshold=0.4),
    )
    actor = InferenceStage(settings)
    evf_only = _rows(actor(_units(manifest, checkpoint, {"e1", "e2", "e3"})))
    assert loads == [] and actor.engine._detector is None, "EVF batches never load the detector"
    assert all(r.error is None and r.instances is None for r in evf_only.values())

    first = _rows(actor(_units(manifest, checkpoint, {"e1", "g1", "g2"})))
    assert len(loads) == 1
    path, kwargs = loads[0]
    assert path == str(grounding_dino_dir)
    assert (kwargs["box_threshold"], kwargs["text_threshold"]) == (0.0, 0.4)  # the job's thresholds
    detector = actor.engine.detector()
    assert (detector.box_threshold, detector.text_threshold) == (0.0, 0.4)
    assert first["e1"].instances is None
    assert all(first[i].error is None and len(first[i].instances) > 0 for i in ("g1", "g2"))

    second = _rows(actor(_units(manifest, checkpoint, {"g3", "g4", "e3"})))
    assert len(loads) == 1, "loaded once per actor"
    assert all(len(second[i].instances) > 0 for i in ("g3", "g4"))


def test_grounding_rows_without_a_model_are_error_rows(dataset, checkpoint, tmp_path, loads):
    manifest, _ = dataset
    actor = InferenceStage(InferenceSettings(checkpoint=checkpoint, storage=Storage(), torch_threads=1))
    out = _rows(actor(_units(manifest, checkpoint, {"e1", "g1", "g2", "e2"})))
    assert loads == []
    for row_id in ("g1", "g2"):
        assert out[row_id].mask_index is None
        assert "grounding.model" in out[row_id].error and "--grounding-model" in out[row_id].error
    assert out["e1"].error is None and out["e2"].error is None and out["e1"].mask_index is not None

    # A model that cannot be loaded: its rows are errors saying so; the load is not retried per batch.
    missing = InferenceSettings(
        checkpoint=checkpoint,
        storage=Storage(),
        torch_threads=1,
        grounding=GroundingSettings(str(tmp_path / "absent")),
    )
    actor = InferenceStage(missing)
    for ids in ({"g1", "e1"}, {"g3"}):
        out = _rows(actor(_units(manifest, checkpoint, ids)))
        for row_id in ids - {"e1"}:
            assert out[row_id].mask_index is None
            assert "GroundingDINO model could not be loaded" in out[row_id].error
    assert len(loads) == 1
    assert out.get("e1") is None or out["e1"].error is None


# --------------------------------------------------------------------------------------------------
# Keys and metadata files
# --------------------------------------------------------------------------------------------------


def test_grounding_settings_are_part_of_grounding_rows_keys(dataset):
    manifest, _ = dataset
    file = scan_manifest(str(manifest)).files[0]
    rows = {
        r[0]: {"_row": k, "id": r[0], "image_url": r[1], "prompt": r[2], **r[3]} for k, r in enumerate(ROWS)
    }

    def key(row_id: str, grounding: str | None) -> str:
        return parse_row(rows[row_id], file=file, defaults={}, model_id="m", grounding=grounding).key

    setups = [
        grounding_id(None, 0.35, 0.25),
        grounding_id("dino", 0.35, 0.25),
        grounding_id("dino", 0.3, 0.25),
    ]
    assert len({key("g1", g) for g in setups}) == 3  # a changed detector or threshold: a stale row
    assert len({key("e1", g) for g in setups} | {key("e1", None)}) == 1  # EVF rows: unaffected


def test_metadata_files_without_instances_read_as_null(tmp_path):
    """Metadata written before the ``instances`` column existed still reads (and resumes)."""
    layout = OutputLayout(str(tmp_path))
    row = {"id": "x", "key": "k", "status": "error", "error": "boom", "instances": None}
    new = {"id": "y", "key": "k2", "status": "empty", "instances": []}
    write_metadata(layout, [new], None)
    pq.write_table(
        metadata_table([row]).drop_columns(["instances"]), tmp_path / "metadata" / "part-old.parquet"
    )
    table = read_metadata(str(tmp_path))
    assert table.schema == METADATA_SCHEMA
    assert {r["id"]: r["instances"] for r in table.to_pylist()} == {"x": None, "y": []}
    committed = load_committed(layout).table
    assert dict(zip(committed["id"].to_pylist(), committed["status"].to_pylist(), strict=True)) == {
        "x": "error",
        "y": "empty",
    }
