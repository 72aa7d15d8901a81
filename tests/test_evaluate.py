"""``evf eval`` / ``evf.pipelines.evaluate``: IoU of the tiny fixture model over a small synthetic manifest.

The model runs through the real job (Ray, local); per-row IoUs are recomputed here from the written
mask files and the ground-truth PNGs (read with Pillow, not with the module's OpenCV readers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from evf.cli import main
from evf.metrics import EvalReport, RowResult, Scores, derive_kind, evaluate_synthetic
from evf.pipelines.evaluate import EvalError, evaluate, read_ground_truth
from evf.pipelines.metadata import read_metadata
from evf.synthetic import write_dataset

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "evf-sam2-tiny" / "checkpoint"
# float32: the job's masks are compared with the in-process float32 predictor's
FAST = {"progress": False, "cpu.batch_size": 16, "inference.batch_size": 4, "inference.dtype": "float32"}
FAST_SET = [f"{key}={value}" for key, value in FAST.items()]
# Mean IoU the shipped demo model must keep on scenes 0..5 of seed 9999 (it reaches 0.68 / 0.90 /
# 0.77 there; its stage 1 alone 0.64 / 0.87 / 0.71). Issue 15's bar is 0.90 / 0.85 / 0.85.
DEMO_FLOOR = {"referring": 0.63, "semantic": 0.82, "negative": 0.70}


@pytest.fixture(scope="module")
def ray_running(request: pytest.FixtureRequest) -> Any:
    """The session's Ray (``ray_session`` in conftest) if there is one, else one local Ray for the module."""
    try:
        yield request.getfixturevalue("ray_session")
        return
    except pytest.FixtureLookupError:
        pass
    import ray
    import ray.data  # noqa: F401

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """3 scenes x 2 expressions, plus one row whose image does not exist (an ``error`` row, no kind)."""
    path = write_dataset(3, 3, str(tmp_path_factory.mktemp("eval-data")), expressions_per_scene=2)
    table = pq.read_table(path)
    first = table.slice(0, 1).to_pylist()[0]
    broken = {**first, "id": "broken", "image_url": "/nonexistent/evf-eval.png", "kind": None}
    pq.write_table(pa.concat_tables([table, pa.Table.from_pylist([broken], schema=table.schema)]), path)
    return path


@pytest.fixture(scope="module")
def report(ray_running: Any, manifest: str, tmp_path_factory: pytest.TempPathFactory) -> EvalReport:
    output = str(tmp_path_factory.mktemp("eval-out"))
    return evaluate(manifest, model=str(TINY), output=output, overrides=FAST)


def _png(path: str, alpha: bool = False) -> np.ndarray:
    image = Image.open(path)
    return np.asarray(image.getchannel("A") if alpha else image.convert("L"))


def test_report_matches_masks_recomputed(report: EvalReport, manifest: str) -> None:
    rows = pq.read_table(manifest).to_pylist()
    assert report.output is not None
    meta = {r["id"]: r for r in read_metadata(report.output).to_pylist()}
    assert len(report.rows) == len(rows) == 7
    assert report.errors == 1 and meta["broken"]["status"] == "error"
    by_id = {r.id: r for r in report.rows}
    ious, inter_sum, union_sum = [], 0, 0
    for row in rows:
        truth = _png(row["mask_url"]) > 127
        result = by_id[row["id"]]
        assert result.kind == (row["kind"] or "referring")
        if row["id"] == "broken":
            assert result.status == "error" and result.iou == 0.0
            inter, union = 0, int(truth.sum())
        else:
            predicted = _png(meta[row["id"]]["mask_url"]) >= 128
            inter, union = int((predicted & truth).sum()), int((predicted | truth).sum())
            assert (result.intersection, result.union) == (inter, union)
        iou = 0.0 if row["id"] == "broken" else (inter / union if union else 1.0)
        assert result.iou == pytest.approx(iou)
        ious.append(iou)
        inter_sum, union_sum = inter_sum + inter, union_sum + union
    assert report.miou == pytest.approx(np.mean(ious))
    assert report.ciou == pytest.approx(inter_sum / union_sum)
    kinds = {r["kind"] or "referring" for r in rows}
    assert set(report.by_kind) == kinds
    assert sum(s.rows for s in report.by_kind.values()) == 7
    assert report.by_kind["referring"].errors == 1


def test_cli_prints_table_and_json_last_line(report: EvalReport, manifest: str, capsys) -> None:
    args = ["eval", "--manifest", manifest, "--model", str(TINY), "--output", str(report.output)]
    assert main([*args, *(a for s in FAST_SET for a in ("--set", s))]) == 0  # resumes: no row recomputed
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.split()[:1] == ["referring"] for line in lines)  # the table
    result = json.loads(lines[-1])
    assert result["model"] == report.model
    assert (result["rows"], result["errors"]) == (7, 1)
    assert result["mIoU"] == pytest.approx(report.miou) and result["cIoU"] == pytest.approx(report.ciou)
    assert result["by_kind"] == {k: s.to_dict() for k, s in report.by_kind.items()}


def test_temp_output_gives_the_same_scores(ray_running: Any, manifest: str, report: EvalReport) -> None:
    again = evaluate(manifest, model=str(TINY), overrides=FAST_SET)
    assert again.output is None and not Path(again.rows[0].mask_url).exists()  # temp dir deleted
    assert [(r.id, r.status) for r in again.rows] == [(r.id, r.status) for r in report.rows]
    assert again.miou == pytest.approx(report.miou, abs=1e-3)


# --------------------------------------------------------------------------------------------------
# Without the model
# --------------------------------------------------------------------------------------------------


def test_scores_edge_cases() -> None:
    rows = [
        RowResult("a", "referring", "ok", 30, 40, "m", "g"),
        RowResult("b", "referring", "empty", 0, 0, "m", "g"),  # empty prediction of empty truth: IoU 1
        RowResult("c", "semantic", "error", 0, 20, None, "g"),  # error: IoU 0, truth area in the union
    ]
    assert [r.iou for r in rows] == [0.75, 1.0, 0.0]
    total = Scores.of(rows)
    assert (total.rows, total.errors) == (3, 1)
    assert total.miou == pytest.approx(1.75 / 3) and total.ciou == pytest.approx(30 / 60)
    report = EvalReport("m", "x", None, rows, 0.0, 0.0)
    assert list(report.by_kind) == ["referring", "semantic"]
    assert report.to_dict()["by_kind"]["semantic"] == {"rows": 1, "errors": 1, "mIoU": 0.0, "cIoU": 0.0}
    assert Scores.of(rows[1:2]).ciou == 1.0


def test_kind_derived_without_kind_column(tmp_path: Path) -> None:
    assert derive_kind(None, True, "x") == "semantic"
    assert derive_kind(None, None, "the circle") == "negative"
    assert derive_kind("", False, " ") == "referring"
    assert derive_kind("custom", True, None) == "custom"
    table = pa.table(
        {
            "image_url": ["a.png"] * 3,
            "prompt": ["p"] * 3,
            "semantic_type": [True, False, None],
            "negative_prompt": [None, "q", None],
            "mask_url": ["gt/0.png", "/abs/1.png", "gt/2.png"],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    truth = read_ground_truth(str(tmp_path / "m.parquet"))
    assert truth == {
        "m.parquet:0": ("semantic", str(tmp_path / "gt" / "0.png")),
        "m.parquet:1": ("negative", "/abs/1.png"),
        "m.parquet:2": ("referring", str(tmp_path / "gt" / "2.png")),
    }


def test_manifest_without_ground_truth_fails_before_the_job(tmp_path: Path) -> None:
    pq.write_table(pa.table({"image_url": ["a.png"], "prompt": ["p"]}), tmp_path / "m.parquet")
    with pytest.raises(EvalError, match="mask_url"):
        evaluate(str(tmp_path / "m.parquet"), model=str(TINY))
    assert main(["eval", "--manifest", str(tmp_path / "m.parquet"), "--set", "progress=false"]) == 1


def test_demo_model_scores_through_the_pipeline(ray_running: Any, tmp_path: Path) -> None:
    """The shipped demo model on held-out scenes (seed 9999), through the whole Ray job.

    The job's scores must equal the in-process predictor's (so decoding, batching, post-processing
    and writing change nothing) and stay at the level the shipped model reaches (docs/demo-model.md).
    """
    from evf.predictor import EvfSam2Predictor

    count = 6
    manifest = write_dataset(9999, count, str(tmp_path / "data"))
    report = evaluate(manifest, model="evf-sam2-demo", overrides=FAST)
    direct = evaluate_synthetic(EvfSam2Predictor.from_pretrained("evf-sam2-demo"), seed=9999, count=count)
    assert report.errors == 0
    for kind, scores in report.by_kind.items():
        assert scores.rows == direct.by_kind[kind].rows
        assert scores.miou == pytest.approx(direct.by_kind[kind].miou, abs=0.01), kind
    assert report.by_kind["referring"].miou >= DEMO_FLOOR["referring"], report.by_kind
    assert report.by_kind["semantic"].miou >= DEMO_FLOOR["semantic"], report.by_kind
    assert report.by_kind["negative"].miou >= DEMO_FLOOR["negative"], report.by_kind
