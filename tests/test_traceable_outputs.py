"""Outputs a person can trace: masks named by the row's id (``mask_name: id``) that never leave the
output folder and never collide, overlays beside them (``overlays: true``), the image's file name
on the review page and in the COCO export, and ``evf segment`` on several images, JPEG or PNG by
the output's suffix.

The job is the real one (``run_job`` on the session's Ray, the tiny fixture checkpoint); the files
are checked on disk, independently of the code that named them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from evf.cli import main
from evf.io import load_image
from evf.pipelines.commit import MAX_NAME_SEGMENT, id_name
from evf.pipelines.config import DEFAULT_CONFIG, load_config
from evf.pipelines.export import export_coco
from evf.pipelines.job import run_job
from evf.pipelines.metadata import read_metadata
from evf.pipelines.review import write_review

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "evf-sam2-tiny" / "checkpoint"
IMAGES = REPO / "tests" / "fixtures" / "evf-sam2-tiny" / "images"
SHAPES, PORTRAIT = "shapes_320x240.png", "portrait_97x173.png"
LONG_ID = "x" * 300
HOSTILE_IDS = {
    # id: the image it names (both fixture images are used, so that file names differ per row)
    "../escape": SHAPES,
    "/abs/path": PORTRAIT,
    "a/../../b": SHAPES,
    "..": PORTRAIT,
    "CON": SHAPES,
    LONG_ID: PORTRAIT,
    "Case": SHAPES,
    "case": PORTRAIT,
    "clash": SHAPES,
    "clash.png/inner": PORTRAIT,  # a folder named like the file of the id "clash"
    "spaces and é/100%": SHAPES,
    "nested/dir/plain-1": PORTRAIT,
}
MISSING_ID = "missing/../../image"  # its image does not exist: an error row, no mask


# --------------------------------------------------------------------------------------------------
# The naming rule alone
# --------------------------------------------------------------------------------------------------


def _stays_inside(name: str) -> bool:
    segments = name.split("/")
    return not name.startswith("/") and all(s not in ("", ".", "..") for s in segments)


@pytest.mark.parametrize("row_id", [*HOSTILE_IDS, MISSING_ID, "", "a//b", "a/", "nul.txt", "x\x00y", "C:\\w"])
def test_id_names_stay_inside_their_folder(row_id: str) -> None:
    name = id_name(row_id)
    assert _stays_inside(name), name
    assert all(len(segment) <= MAX_NAME_SEGMENT + 17 for segment in name.split("/")), name
    assert "\x00" not in name and "\\" not in name and ":" not in name
    if "~" not in name:  # not hashed: percent-decoding gives the id back
        assert unquote(name) == row_id


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=40), min_size=2, max_size=6, unique=True))
def test_id_names_never_collide_even_ignoring_case(ids: list[str]) -> None:
    ids = list(dict.fromkeys([*ids, *(i.swapcase() for i in ids), *(i.upper() for i in ids)]))
    names = [id_name(i) for i in ids]
    assert len({n.lower() for n in names}) == len(ids), dict(zip(ids, names, strict=True))
    assert all(_stays_inside(n) for n in names)


def test_plain_ids_keep_their_readable_name() -> None:
    assert id_name("shots/day-1/img_0001.jpg") == "shots/day-1/img_0001.jpg"
    assert id_name("../escape") == "%2E%2E/escape"
    assert id_name("/abs/path") == "%2Fabs/path"
    assert id_name("Case").startswith("Case~") and id_name("case") == "case"


# --------------------------------------------------------------------------------------------------
# A real job with hostile ids, masks named by id, overlays on
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdJob:
    root: Path
    data: Path
    manifest: Path
    output: Path
    config: Any
    summary: Any


def _id_job_config(manifest: Path, output: Path, **extra: Any) -> Any:
    return load_config(
        DEFAULT_CONFIG,
        {
            "manifest": str(manifest),
            "output": str(output),
            "model": str(TINY),
            "progress": False,
            "cpu.batch_size": 16,
            "inference.batch_size": 4,
            "mask_name": "id",
            "overlays": True,
            **extra,
        },
    )


@pytest.fixture(scope="module")
def id_job(ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> IdJob:
    root = tmp_path_factory.mktemp("traceable")
    data = root / "data"
    data.mkdir()
    for name in (SHAPES, PORTRAIT):
        shutil.copy(IMAGES / name, data / name)
    rows = [
        {"id": row_id, "image_url": image, "prompt": "the shape", "mask_only": row_id != "clash"}
        for row_id, image in HOSTILE_IDS.items()
    ]  # "clash" writes the RGBA image (mask_only false): its overlay is the same drawing
    rows.append({"id": MISSING_ID, "image_url": "absent.png", "prompt": "the shape", "mask_only": True})
    schema = pa.schema([("id", pa.string()), ("image_url", pa.string()), ("prompt", pa.string()),
                        ("mask_only", pa.bool_())])  # fmt: skip
    manifest = data / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), manifest)
    output = root / "deep" / "output"  # "../.." from masks/ would still be inside root: checked below
    config = _id_job_config(manifest, output)
    return IdJob(root, data, manifest, output, config, run_job(config))


def _files(folder: Path) -> set[Path]:
    return {Path(p, f) for p, _, names in os.walk(folder) for f in names}


def test_masks_named_by_id_stay_under_masks_one_per_row(id_job: IdJob) -> None:
    rows = {r["id"]: r for r in read_metadata(str(id_job.output)).to_pylist()}
    assert set(rows) == {*HOSTILE_IDS, MISSING_ID}
    statuses = Counter(r["status"] for r in rows.values())
    assert rows[MISSING_ID]["status"] == "error" and rows[MISSING_ID]["mask_url"] is None
    assert statuses["error"] == 1, {i: r["error"] for i, r in rows.items() if r["error"]}

    # Nothing was written outside the output, except the inputs themselves.
    outside = _files(id_job.root) - _files(id_job.output) - _files(id_job.data)
    assert not outside, sorted(map(str, outside))

    masks = id_job.output / "masks"
    mask_files = {p.resolve() for p in _files(masks)}
    with_mask = {i: r for i, r in rows.items() if r["status"] != "error"}
    assert len(mask_files) == len(with_mask), "one mask file per ok/empty row, no two rows share one"
    urls = {i: Path(r["mask_url"]).resolve() for i, r in with_mask.items()}
    assert set(urls.values()) == mask_files, "mask_url points at each row's own file"
    assert len({str(p).lower() for p in mask_files}) == len(mask_files), "distinct ignoring case"
    for row_id, path in urls.items():
        assert path.is_relative_to(masks.resolve()), (row_id, path)
        assert path.suffix == ".png" and all(len(part.encode()) <= 255 for part in path.parts)
        with Image.open(path) as mask:
            assert mask.size == (with_mask[row_id]["width"], with_mask[row_id]["height"])
    # The readable ids are readable in the file names.
    assert urls["nested/dir/plain-1"] == (masks / "nested" / "dir" / "plain-1.png").resolve()
    assert urls["case"] == (masks / "case.png").resolve()
    assert urls["clash"] == (masks / "clash.png").resolve()


def test_overlays_are_jpegs_of_the_image_size_beside_the_masks(id_job: IdJob) -> None:
    rows = [r for r in read_metadata(str(id_job.output)).to_pylist() if r["status"] != "error"]
    assert len(rows) == len(HOSTILE_IDS) and any(r["status"] == "ok" for r in rows)
    overlays = id_job.output / "overlays"
    expected = set()
    for row in rows:
        relative = Path(row["mask_url"]).relative_to(id_job.output / "masks")
        path = overlays / relative.with_suffix(".jpg")
        expected.add(path.resolve())
        with Image.open(path) as drawn:
            assert drawn.format == "JPEG" and drawn.size == (row["width"], row["height"])
            pixels = np.asarray(drawn.convert("RGB"), np.int16)
        image = load_image(row["image_url"]).astype(np.int16)
        mask = np.asarray(Image.open(row["mask_url"]))
        mask = (mask[..., 3] if mask.ndim == 3 else mask) >= 128
        if mask.sum() > 50:  # the mask is drawn: the masked pixels moved towards magenta
            assert np.abs(pixels[mask] - image[mask]).mean() > 20
    assert {p.resolve() for p in _files(overlays)} == expected, "one overlay per row with a mask"
    record = json.loads((id_job.output / "_job.json").read_text())
    assert record["outputs"]["overlays"] == str(overlays)


def test_a_rerun_with_id_names_resumes_on_the_key(id_job: IdJob) -> None:
    before = {p: p.stat().st_mtime_ns for p in _files(id_job.output / "masks")}
    summary = run_job(_id_job_config(id_job.manifest, id_job.output, retry_errors="none"))
    assert summary.processed == 0 and summary.skipped == len(HOSTILE_IDS) + 1
    assert {p: p.stat().st_mtime_ns for p in _files(id_job.output / "masks")} == before


# --------------------------------------------------------------------------------------------------
# The image's name on the review page and in COCO
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is not installed (scripts/ci-deps.sh installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
        )
        yield browser
        browser.close()


def test_review_cards_show_the_image_file_name(id_job: IdJob, browser: Any, tmp_path: Path) -> None:
    rows = {r["id"]: r for r in read_metadata(str(id_job.output)).to_pylist()}
    page_path = write_review(str(id_job.output), page=str(tmp_path / "review.html"), threads=2)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(Path(page_path).as_uri())
    page.wait_for_selector("#rows .card")
    cards = page.eval_on_selector_all(
        ".card",
        "cards => cards.map(c => [c.dataset.id, c.querySelector('.name').textContent,"
        " (c.querySelector('.id') || {}).textContent])",
    )
    page.close()
    assert len(cards) == len(rows)
    for row_id, name, shown_id in cards:
        assert name == Path(rows[row_id]["image_url"]).name  # shapes_320x240.png, not the id
        assert shown_id is not None and row_id in shown_id, "the id stays on the card"


def test_coco_file_names_are_the_image_file_names(id_job: IdJob) -> None:
    rows = {r["id"]: r for r in read_metadata(str(id_job.output)).to_pylist()}
    coco = export_coco(str(id_job.output))
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    assert sorted(Path(n).name for n in names.values()) == sorted({SHAPES, PORTRAIT})
    assert all(isinstance(i, int) for i in names)
    relative = export_coco(str(id_job.output), image_root=str(id_job.data))
    assert sorted(image["file_name"] for image in relative["images"]) == sorted({SHAPES, PORTRAIT})
    for annotation in coco["annotations"]:
        row = rows[annotation["evf_id"]]  # the row's id stays on its annotation
        assert Path(names[annotation["image_id"]]).name == Path(row["image_url"]).name


# --------------------------------------------------------------------------------------------------
# evf segment: several images, JPEG or PNG by suffix, overlays
# --------------------------------------------------------------------------------------------------

SEGMENT = ["--prompt", "the shape", "--model", str(TINY), "--device", "cpu"]


def test_segment_several_images_into_a_folder_with_overlays(tmp_path: Path, capsys) -> None:
    images = [str(IMAGES / SHAPES), str(IMAGES / PORTRAIT)]
    out, drawn = tmp_path / "masks", tmp_path / "overlays"
    assert main(["segment", *images, *SEGMENT, "-o", f"{out}/", "--overlay", f"{drawn}/"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for image in images:
        stem = Path(image).stem
        with Image.open(image) as source:
            size = source.size
        with Image.open(out / f"{stem}.png") as mask:
            assert mask.format == "PNG" and mask.size == size and mask.mode == "L"
        with Image.open(drawn / f"{stem}.jpg") as overlay:
            assert overlay.format == "JPEG" and overlay.size == size
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{Path(i).stem}.png" for i in images)


def test_segment_writes_a_jpeg_for_a_jpg_output(tmp_path: Path) -> None:
    assert main(["segment", str(IMAGES / SHAPES), *SEGMENT, "-o", str(tmp_path / "x.jpg")]) == 0
    data = (tmp_path / "x.jpg").read_bytes()
    assert data[:3] == b"\xff\xd8\xff"
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.size == (320, 240)
    overlay = tmp_path / "o.png"
    assert main(["segment", str(IMAGES / SHAPES), *SEGMENT, "-o", str(tmp_path / "y.png"), "--overlay",
                 str(overlay)]) == 0  # fmt: skip
    with Image.open(overlay) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (320, 240)


@pytest.mark.parametrize(
    ("output", "extra", "words"),
    [
        ("x.gif", [], (".gif", ".png, .jpg, .jpeg")),
        ("x", [], ("no suffix", ".png")),
        ("x.jpg", ["--no-mask-only"], ("JPEG cannot hold", "alpha")),
        ("x.png", ["--overlay", "o.tiff"], (".tiff", ".png, .jpg, .jpeg")),
    ],
)
def test_segment_refuses_outputs_it_cannot_write(tmp_path: Path, capsys, output, extra, words) -> None:
    argv = ["segment", str(IMAGES / SHAPES), *SEGMENT, "-o", str(tmp_path / output), *extra]
    assert main([a if a != "o.tiff" else str(tmp_path / a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evf segment: "), err
    assert all(word in err[0] for word in words), err
    assert not list(tmp_path.iterdir()), "nothing written"


def test_segment_refuses_several_images_into_one_file(tmp_path: Path, capsys) -> None:
    argv = ["segment", str(IMAGES / SHAPES), str(IMAGES / PORTRAIT), *SEGMENT, "-o", str(tmp_path / "x.png")]
    assert main(argv) == 2
    assert "2 images need a folder" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_segment_refuses_two_images_of_one_name_into_a_folder(tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(IMAGES / SHAPES, other / SHAPES)
    argv = ["segment", str(IMAGES / SHAPES), str(other / SHAPES), *SEGMENT, "-o", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "same file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
