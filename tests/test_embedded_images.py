"""Manifests that hold their images: a binary column, or the struct{bytes, path} that Hugging Face
``datasets`` writes for an ``Image()`` feature, mapped with ``columns: {image: COL}``.

The Parquet files here are written by the ``datasets`` package itself (``Dataset.from_dict(...)
.cast_column(..., Image()).to_parquet``), as users hold them; the expected ids and statuses follow
from the rows this test wrote.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import interrupted_then_rerun
from PIL import Image

from evf.io import ImageReadError, read_bytes
from evf.manifest import read_embedded_images, read_rows, scan_manifest
from evf.manifest_file import ManifestError
from evf.pipelines.config import DEFAULT_CONFIG, load_config
from evf.pipelines.dryrun import dry_run, format_dry_run
from evf.pipelines.job import run_job
from evf.pipelines.metadata import read_metadata

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "evf-sam2-tiny" / "checkpoint"
FAST = {"progress": False, "cpu.batch_size": 4, "inference.batch_size": 4, "model": str(TINY)}
MAPPING = {"image": "picture", "prompt": "caption"}


def _png(value: int, size: tuple[int, int] = (24, 32)) -> bytes:
    image = np.full((*size, 3), 200, np.uint8)
    image[4:16, 6:20] = (value, 30, 255 - value)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def write_datasets_parquet(path: Path, good: int) -> dict[str, str]:
    """A ``datasets`` Parquet (columns picture: Image(), caption: str): ``good`` embedded PNGs, a
    corrupt one, one stored by path only (as ``datasets`` writes images it loaded from files) and
    a null image. Returns each row's derived id -> what the job must make of it."""
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    on_disk = path.parent / "loose.png"
    on_disk.write_bytes(_png(90))
    pictures: list[Any] = [{"bytes": _png(20 * i), "path": f"img{i}.png"} for i in range(good)]
    pictures += [{"bytes": b"\x89PNG\r\n\x1a\n not really", "path": "corrupt.png"}]
    pictures += [{"bytes": None, "path": str(on_disk)}, None]
    captions = [f"the square {i}" for i in range(len(pictures))]
    table = datasets.Dataset.from_dict({"picture": pictures, "caption": captions})
    table.cast_column("picture", datasets.Image()).to_parquet(str(path))
    outcomes = {f"{path.name}:{i}": "ok" for i in range(good)}
    outcomes.update(
        {
            f"{path.name}:{good}": "decode",
            f"{path.name}:{good + 1}": "ok",
            f"{path.name}:{good + 2}": "no image",
        }
    )
    return outcomes


def test_scan_tells_embedded_images_from_urls(tmp_path: Path) -> None:
    write_datasets_parquet(tmp_path / "hf.parquet", 2)
    file = scan_manifest(str(tmp_path / "hf.parquet"), columns=MAPPING).files[0]
    assert file.embedded and file.source_column("image") == "picture"
    rows = list(read_rows(file, 0, file.num_rows, ("id", "image_url", "prompt")))
    assert [r["image_url"] for r in rows] == [f"{file.uri}#row={i}&column=picture" for i in range(5)]
    assert all("picture" not in r for r in rows), "the bytes are read for the rows to do only"
    images = read_embedded_images(file, [0, 3, 4])
    assert images[0] == _png(0)
    assert images[1] == str(tmp_path / "loose.png")
    assert isinstance(images[2], ManifestError) and "holds no image" in str(images[2])

    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(pa.table({"image": [b"\x89PNG..."], "prompt": ["x"]}), plain / "bytes.parquet")
    assert scan_manifest(str(plain / "bytes.parquet")).files[0].embedded
    pq.write_table(pa.table({"image": ["a.png"], "prompt": ["x"]}), plain / "text.parquet")
    text = scan_manifest(str(plain / "text.parquet")).files[0]
    assert not text.embedded and text.source_column("image_url") == "image"
    (plain / "text.csv").write_text("image,prompt\na.png,x\n")
    assert scan_manifest(str(plain / "text.csv")).files[0].source_column("image_url") == "image"
    pq.write_table(pa.table({"image": [3], "prompt": ["x"]}), plain / "number.parquet")
    with pytest.raises(ManifestError, match=r"'image' holds int64: expected the images' bytes"):
        scan_manifest(str(plain / "number.parquet"))
    pq.write_table(pa.table({"photo": ["a.png"], "prompt": ["x"]}), plain / "none.parquet")
    with pytest.raises(ManifestError, match=r"image_url \(or image: the image's bytes\)"):
        scan_manifest(str(plain / "none.parquet"))


def test_a_datasets_parquet_runs_with_its_images_embedded(ray_session, tmp_path: Path) -> None:
    outcomes = write_datasets_parquet(tmp_path / "data" / "train.parquet", 4)
    flags = {"manifest": str(tmp_path / "data" / "train.parquet"), "columns": MAPPING}
    config = load_config(DEFAULT_CONFIG, {**FAST, **flags, "output": str(tmp_path / "o")})
    shown = format_dry_run(dry_run(config))
    assert "\\x89PNG" not in shown and max(map(len, shown.splitlines())) < 300

    summary = run_job(config)
    rows = {r["id"]: r for r in read_metadata(str(tmp_path / "o")).to_pylist()}
    assert set(rows) == set(outcomes)
    for rid, outcome in outcomes.items():
        row = rows[rid]
        if outcome == "ok":
            assert row["status"] in ("ok", "empty") and row["prompt"] == f"the square {rid.rsplit(':')[1]}"
        else:
            assert row["status"] == "error" and outcome in row["error"], (rid, row["error"])
    parquet_uri = str(tmp_path / "data" / "train.parquet")
    assert rows["train.parquet:0"]["image_url"] == f"{parquet_uri}#row=0&column=picture"
    assert read_bytes(rows["train.parquet:0"]["image_url"]) == _png(0), "any reader gets the image back"
    with pytest.raises(ImageReadError, match="holds no image"):
        read_bytes(rows["train.parquet:6"]["image_url"])
    assert rows["train.parquet:5"]["image_url"] == str(tmp_path / "data" / "loose.png")
    assert summary.counts["error"] == 2
    again = run_job(config)
    assert again.skipped == len(outcomes) and sum(again.this_run.values()) == 0


def test_an_interrupted_manifest_run_resumes_with_every_row_once(tmp_path: Path) -> None:
    """Ctrl-C part-way through a manifest folder of a ``datasets`` Parquet and a CSV (each with a
    corrupt image among good ones), then the same command again: every row exactly once."""
    manifest = tmp_path / "manifest"
    outcomes = write_datasets_parquet(manifest / "hf.parquet", 6)
    with open(manifest / "more.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_url", "caption"])
        for index in range(6):
            (manifest / f"c{index}.png").write_bytes(_png(25 * index))
            writer.writerow([f"c{index}.png", f"the square {index}"])
            outcomes[f"more.csv:{index}"] = "ok"
        (manifest / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
        writer.writerow(["broken.png", "the square"])
        outcomes["more.csv:6"] = "decode"
    args = ["--manifest", str(manifest), "--columns", "image=picture,prompt=caption"]
    rows = interrupted_then_rerun(args, str(tmp_path / "out"), set(outcomes))
    assert {i for i, r in rows.items() if r["status"] == "error"} == {
        i for i, outcome in outcomes.items() if outcome != "ok"
    }
