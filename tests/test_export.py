"""COCO and Label Studio exports of real finished jobs (``conftest.finished_job`` / ``grounded_job``).

Every exported mask is checked against what the job itself wrote: the mask PNG of the row (read with
OpenCV, not through the exporter's code path). COCO files are read back with pycocotools' ``COCO()``;
Label Studio's brush RLE is decoded with label-studio-converter's own decoder.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from label_studio_converter.brush import decode_rle as decode_brush_rle
from pycocotools.coco import COCO

from evf.pipelines.export import export_coco, export_labelstudio, write_coco, write_labelstudio
from evf.pipelines.job_rows import CategoryError
from evf.pipelines.metadata import read_metadata


def job_rows(output: Path) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in read_metadata(str(output)).to_pylist()}


def mask_file(row: dict[str, Any]) -> np.ndarray:
    """bool (H, W): the job's own mask PNG of a row (pixels >= 128)."""
    image = cv2.imread(row["mask_url"], cv2.IMREAD_UNCHANGED)
    assert image is not None and image.ndim == 2, row["mask_url"]
    return image >= 128


def box_of(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def plain_json(value: Any) -> None:
    """Every leaf is a plain JSON type (no numpy scalars hiding behind int/float subclasses)."""
    if isinstance(value, dict):
        for item in value.values():
            plain_json(item)
    elif isinstance(value, list):
        for item in value:
            plain_json(item)
    else:
        assert value is None or type(value) in (str, int, float, bool), (type(value), value)


# --------------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------------


def test_coco_annotations_are_the_jobs_masks(finished_job, tmp_path):
    rows = job_rows(finished_job.output)
    statuses = Counter(row["status"] for row in rows.values())
    assert statuses["ok"] >= 4 and statuses["empty"] == 1 and statuses["error"] == 3, statuses

    path = tmp_path / "coco.json"
    written = write_coco(str(path), str(finished_job.output), categories=finished_job.categories)
    plain_json(written)
    coco = COCO(str(path))  # pycocotools reads the file itself

    annotations = coco.loadAnns(coco.getAnnIds())
    annotated = {ann["evf_id"] for ann in annotations}
    assert annotated == {i for i, row in rows.items() if row["status"] == "ok"}, "one annotation per ok row"
    assert len(annotations) == len(annotated)
    for ann in annotations:
        row = rows[ann["evf_id"]]
        expected = mask_file(row)
        assert np.array_equal(coco.annToMask(ann).astype(bool), expected), ann["evf_id"]
        assert ann["area"] == int(expected.sum()) == row["area"]
        assert ann["bbox"] == box_of(expected)
        assert ann["iscrowd"] == 0 and ann["score"] == pytest.approx(row["score"])
        assert coco.loadCats(ann["category_id"])[0]["name"] == finished_job.categories[row["prompt"]]
        image = coco.loadImgs(ann["image_id"])[0]
        assert (image["height"], image["width"]) == expected.shape
        assert image["coco_url"] == row["image_url"] == image["file_name"]

    exported_images = {image["coco_url"] for image in coco.loadImgs(coco.getImgIds())}
    kept = {row["image_url"] for row in rows.values() if row["status"] in ("ok", "empty")}
    assert exported_images == kept, "images of ok and empty rows; the error rows' unreadable images are out"
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == sorted(
        {finished_job.categories[row["prompt"]] for row in rows.values() if row["status"] == "ok"}
    )


def test_coco_categories_from_prompts_or_a_manifest_column(finished_job):
    rows = job_rows(finished_job.output)
    by_prompt = export_coco(str(finished_job.output))
    names = {c["id"]: c["name"] for c in by_prompt["categories"]}
    assert {a["evf_id"]: names[a["category_id"]] for a in by_prompt["annotations"]} == {
        i: row["prompt"] for i, row in rows.items() if row["status"] == "ok"
    }

    import pyarrow.parquet as pq

    kinds = {r["id"]: r["kind"] for r in pq.read_table(finished_job.manifest).to_pylist()}
    by_column = export_coco(
        str(finished_job.output), category_column="kind", manifest=str(finished_job.manifest)
    )
    names = {c["id"]: c["name"] for c in by_column["categories"]}
    assert {a["evf_id"]: names[a["category_id"]] for a in by_column["annotations"]} == {
        i: kinds[i] for i, row in rows.items() if row["status"] == "ok"
    }


def test_coco_refuses_prompts_missing_from_the_map(finished_job):
    ok_prompt = next(r["prompt"] for r in job_rows(finished_job.output).values() if r["status"] == "ok")
    partial = {prompt: name for prompt, name in finished_job.categories.items() if prompt != ok_prompt}
    with pytest.raises(CategoryError, match=f"no category: '{ok_prompt}'"):
        export_coco(str(finished_job.output), categories=partial)


def test_coco_file_names_relative_to_an_image_root(finished_job):
    root = str(finished_job.manifest.parent / "data")
    coco = export_coco(str(finished_job.output), image_root=root)
    for image in coco["images"]:
        assert not image["file_name"].startswith("/")
        assert Path(root, image["file_name"]).as_posix() == image["coco_url"]


def test_grounding_rows_give_one_annotation_per_instance(grounded_job, tmp_path):
    rows = job_rows(grounded_job.output)
    assert {row["status"] for row in rows.values()} == {"ok"}
    path = tmp_path / "coco.json"
    write_coco(str(path), str(grounded_job.output))
    coco = COCO(str(path))
    for row_id, row in rows.items():
        annotations = [a for a in coco.loadAnns(coco.getAnnIds()) if a["evf_id"] == row_id]
        if row["instances"] is None:
            assert len(annotations) == 1 and "instance" not in annotations[0]
            continue
        masks = [coco.annToMask(a).astype(bool) for a in annotations]
        assert len(annotations) == sum(m.any() for m in masks) > 1
        assert [a["instance"] for a in annotations] == list(range(len(row["instances"])))
        # No negative prompt and no post-processing: the row's mask file is the union of its instances.
        assert np.array_equal(np.logical_or.reduce(masks), mask_file(row)), row_id
        for ann, mask, instance in zip(annotations, masks, row["instances"], strict=True):
            assert ann["area"] == int(mask.sum()) and ann["bbox"] == box_of(mask)
            assert ann["score"] == pytest.approx(instance["mask_score"])
            assert ann["detector_score"] == pytest.approx(instance["detector_score"])


# --------------------------------------------------------------------------------------------------
# Label Studio
# --------------------------------------------------------------------------------------------------


def brush_masks(task: dict[str, Any], from_name: str, to_name: str) -> list[tuple[str, np.ndarray]]:
    """(label, bool mask) of each brush result of a task, decoded by label-studio-converter."""
    decoded = []
    for result in task["predictions"][0]["result"]:
        assert (result["from_name"], result["to_name"], result["type"]) == (from_name, to_name, "brushlabels")
        assert result["value"]["format"] == "rle"
        height, width = result["original_height"], result["original_width"]
        pixels = decode_brush_rle(result["value"]["rle"]).reshape(height, width, 4)
        decoded.append((result["value"]["brushlabels"][0], pixels[:, :, 3] > 0))
    return decoded


def test_labelstudio_tasks_decode_to_the_jobs_masks(finished_job, tmp_path):
    rows = job_rows(finished_job.output)
    path = tmp_path / "tasks.json"
    write_labelstudio(
        str(path),
        str(finished_job.output),
        from_name="seg",
        to_name="img",
        categories=finished_job.categories,
    )
    tasks = json.loads(path.read_text())
    plain_json(tasks)
    kept = {row["image_url"] for row in rows.values() if row["status"] in ("ok", "empty")}
    assert sorted(task["data"]["image"] for task in tasks) == sorted(kept), "one task per image"
    regions = 0
    for task in tasks:
        expected = [
            (finished_job.categories[row["prompt"]], mask_file(row))
            for row in rows.values()
            if row["image_url"] == task["data"]["image"] and row["status"] == "ok"
        ]
        decoded = brush_masks(task, "seg", "img")
        assert len(decoded) == len(expected)
        for label, mask in decoded:  # the same masks with the same labels, in any order
            match = next(
                i for i, (lab, exp) in enumerate(expected) if lab == label and np.array_equal(exp, mask)
            )
            expected.pop(match)
        regions += len(decoded)
        scores = [r["score"] for r in task["predictions"][0]["result"]]
        assert task["predictions"][0]["score"] == min(scores, default=0.0)
        assert task["predictions"][0]["model_version"]
    assert regions == sum(row["status"] == "ok" for row in rows.values())


def test_labelstudio_grounding_instances_are_regions(grounded_job):
    rows = job_rows(grounded_job.output)
    tasks = export_labelstudio(str(grounded_job.output))
    assert len(tasks) == 1
    decoded = brush_masks(tasks[0], "label", "image")
    expected = sum(len(row["instances"] or [None]) for row in rows.values())
    assert len(decoded) == expected
    union = np.logical_or.reduce([mask for label, mask in decoded if label == "red square"])
    assert np.array_equal(union, mask_file(rows["g-square"]))


def test_labelstudio_image_urls_under_a_served_root(finished_job):
    root = str(finished_job.manifest.parent / "data")
    tasks = export_labelstudio(
        str(finished_job.output), image_root=root, image_base_url="/data/local-files/?d=data/"
    )
    assert all(task["data"]["image"].startswith("/data/local-files/?d=data/images/") for task in tasks)


def test_exports_read_and_write_object_storage(finished_job, s3_bucket):
    """The same export from a copy of the output in S3 (moto), written back to S3."""
    import fsspec

    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    fs.put(str(finished_job.output / "metadata"), f"{bucket}/job/metadata", recursive=True)
    output = f"s3://{bucket}/job"
    local = export_coco(str(finished_job.output), categories=finished_job.categories)
    remote = write_coco(
        f"{output}/coco.json", output, categories=finished_job.categories, storage_options=options
    )
    stored = json.loads(fs.cat_file(f"{bucket}/job/coco.json"))
    for coco in (remote, stored):
        assert {k: coco[k] for k in ("images", "annotations", "categories")} == {
            k: local[k] for k in ("images", "annotations", "categories")
        }
    tasks = write_labelstudio(f"{output}/tasks.json", output, storage_options=options)
    assert json.loads(fs.cat_file(f"{bucket}/job/tasks.json")) == tasks and tasks


def test_export_and_review_commands(finished_job, tmp_path, capsys):
    """``evf export coco|labelstudio`` and ``evf review`` on a finished job: the files they write are
    the ones the functions above make (the category map read from a YAML file)."""
    import yaml

    from evf.cli import main

    categories = tmp_path / "categories.yaml"
    categories.write_text(yaml.safe_dump(finished_job.categories))
    coco_file, tasks_file = tmp_path / "coco.json", tmp_path / "tasks.json"
    output = str(finished_job.output)
    assert main(["export", "coco", output, "-o", str(coco_file), "--categories", str(categories)]) == 0
    assert json.loads(coco_file.read_text()) == export_coco(output, categories=finished_job.categories)
    assert main(["export", "labelstudio", output, "-o", str(tasks_file), "--from-name", "seg"]) == 0
    assert json.loads(tasks_file.read_text()) == export_labelstudio(output, from_name="seg")
    page = tmp_path / "page" / "review.html"
    assert main(["review", output, "-o", str(page), "--no-progress"]) == 0
    assert page.exists() and f"review page: {page}" in capsys.readouterr().out
