"""``evf run --images SOURCE --prompt TEXT``: a folder, a glob or an S3 prefix of images, no manifest.

Through the real job: every image file under the source is a row (per prompt) with the file's path
relative to the source as its id; a corrupt file is an error row and the job goes on; a re-run
resumes (only images added since run). The expected ids are the files this test wrote.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import interrupted_then_rerun, make_exif_jpeg, make_gray_png, make_rgba_png, make_truncated_png
from PIL import Image

from evf.pipelines.config import DEFAULT_CONFIG, load_config
from evf.pipelines.job import run_job
from evf.pipelines.metadata import read_metadata
from evf.pipelines.sources import default_output
from evf.sources import IMAGE_SUFFIXES, NoFilesError, find_files

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "evf-sam2-tiny" / "checkpoint"
FAST = {"progress": False, "cpu.batch_size": 8, "inference.batch_size": 4, "model": str(TINY)}


def _square(path: Path, colour: tuple[int, int, int] = (220, 30, 30)) -> None:
    image = np.full((40, 56, 3), 200, np.uint8)
    image[8:28, 10:34] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def image_folder(root: Path) -> tuple[set[str], set[str]]:
    """A folder as users have them: PNG, EXIF JPEG, grayscale, RGBA, a subfolder, an upper-case
    suffix, a corrupt PNG, and files that are not images (left out). Returns (good ids, bad ids)."""
    root.mkdir(parents=True)
    _square(root / "a.png")
    make_exif_jpeg(root / "b.jpg")
    make_gray_png(root / "gray.png")
    make_rgba_png(root / "rgba.png")
    _square(root / "sub" / "deeper" / "c.PNG", (30, 30, 220))
    make_truncated_png(root / "broken.png")
    (root / "notes.txt").write_text("not an image")
    _square(root / ".hidden" / "d.png")
    _square(root / "_cache.png")
    return {"a.png", "b.jpg", "gray.png", "rgba.png", "sub/deeper/c.PNG"}, {"broken.png"}


def test_find_files_takes_a_folder_a_glob_or_a_file(tmp_path: Path) -> None:
    good, bad = image_folder(tmp_path / "imgs")
    names = [f.name for f in find_files(str(tmp_path / "imgs"), IMAGE_SUFFIXES, what="images")]
    assert names == sorted(good | bad)
    assert all(
        os.path.isabs(f.uri) for f in find_files(str(tmp_path / "imgs"), IMAGE_SUFFIXES, what="images")
    )
    globbed = find_files(str(tmp_path / "imgs" / "*.png"), IMAGE_SUFFIXES, what="images")
    assert [f.name for f in globbed] == ["a.png", "broken.png", "gray.png", "rgba.png"]
    one = find_files(str(tmp_path / "imgs" / "a.png"), IMAGE_SUFFIXES, what="images")
    assert [(f.name, f.uri) for f in one] == [("a.png", str(tmp_path / "imgs" / "a.png"))]
    with pytest.raises(NoFilesError, match="holds no images"):
        find_files(str(tmp_path / "imgs" / "*.txt"), IMAGE_SUFFIXES, what="images")
    with pytest.raises(NoFilesError, match="not found"):
        find_files(str(tmp_path / "absent"), IMAGE_SUFFIXES, what="images")


def test_default_output_lies_beside_the_images() -> None:
    assert default_output("/data/photos") == "/data/photos-evf"
    assert default_output("/data/photos/") == "/data/photos-evf"
    assert default_output("/data/photos/*.jpg") == "/data/photos-evf"
    assert default_output("s3://bucket/imgs/") == "s3://bucket/imgs-evf"
    assert default_output(".") == "./evf-output"
    assert default_output("runs/mine.parquet") == "runs/mine-evf"
    assert default_output("runs/mine.ndjson") == "runs/mine-evf"


def test_a_folder_of_images_runs_and_resumes(ray_session, tmp_path: Path) -> None:
    good, bad = image_folder(tmp_path / "imgs")
    flags = {"images": str(tmp_path / "imgs"), "prompts": ["the red square"], "output": str(tmp_path / "out")}
    summary = run_job(load_config(DEFAULT_CONFIG, {**FAST, **flags}))
    assert summary.counts["error"] == 1 and summary.counts["ok"] + summary.counts["empty"] == len(good)
    rows = {r["id"]: r for r in read_metadata(str(tmp_path / "out")).to_pylist()}
    assert set(rows) == good | bad
    assert rows["broken.png"]["status"] == "error" and "decode" in rows["broken.png"]["error"]
    assert rows["sub/deeper/c.PNG"]["image_url"] == str(tmp_path / "imgs" / "sub" / "deeper" / "c.PNG")
    assert all(r["prompt"] == "the red square" for r in rows.values())

    # A re-run lists the folder anew: the image added since is the only row that runs.
    _square(tmp_path / "imgs" / "new.png")
    again = run_job(load_config(DEFAULT_CONFIG, {**FAST, **flags}))
    assert again.skipped == len(good | bad) and again.this_run["ok"] + again.this_run["empty"] == 1
    assert "new.png" in {r["id"] for r in read_metadata(str(tmp_path / "out")).to_pylist()}


def test_several_prompts_make_a_row_each(ray_session, tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _square(root / "a.png")
    _square(root / "b.png", (30, 30, 220))
    prompts = ["the red square", "the blue square"]
    flags = {"images": str(root), "prompts": prompts, "output": str(tmp_path / "o")}
    summary = run_job(load_config(DEFAULT_CONFIG, {**FAST, **flags}))
    assert summary.counts["error"] == 0
    ids = {r["id"] for r in read_metadata(str(tmp_path / "o")).to_pylist()}
    assert ids == {f"{name}|{prompt}" for name in ("a.png", "b.png") for prompt in prompts}


def test_an_s3_prefix_of_images(ray_session, s3_server, s3_bucket, monkeypatch, tmp_path: Path) -> None:
    import fsspec

    bucket, storage_options = s3_bucket
    fs = fsspec.filesystem("s3", **storage_options)
    for name, colour in (("x/one.png", (220, 30, 30)), ("x/two/three.jpg", (30, 30, 220))):
        image = np.full((32, 32, 3), 200, np.uint8)
        image[4:20, 6:26] = colour
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG" if name.endswith(".png") else "JPEG")
        fs.pipe(f"{bucket}/imgs/{name}", buffer.getvalue())
    fs.pipe(f"{bucket}/imgs/x/corrupt.png", b"\x89PNG\r\n\x1a\n not really")
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    flags = {"images": f"s3://{bucket}/imgs/", "prompts": ["the square"], "output": f"s3://{bucket}/out"}
    summary = run_job(load_config(DEFAULT_CONFIG, {**FAST, **flags}))
    rows = {r["id"]: r for r in read_metadata(f"s3://{bucket}/out", storage_options).to_pylist()}
    assert set(rows) == {"x/one.png", "x/two/three.jpg", "x/corrupt.png"}
    assert rows["x/corrupt.png"]["status"] == "error" and summary.counts["error"] == 1
    assert rows["x/one.png"]["image_url"] == f"s3://{bucket}/imgs/x/one.png"
    assert fs.exists(f"{bucket}/out/inputs/images.parquet")


def test_the_command_line_derives_the_output_and_dry_runs(tmp_path: Path) -> None:
    good, bad = image_folder(tmp_path / "imgs")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the red square\n\nthe blue square\n")
    command = [sys.executable, "-m", "evf.cli", "run", "--images", str(tmp_path / "imgs")]
    command += ["--prompts", str(prompts), "--fill-holes", "--dry-run"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"output {tmp_path / 'imgs'}-evf" in done.stderr
    assert f"{2 * len(good | bad)} rows" in done.stdout
    assert not (tmp_path / "imgs-evf").exists(), "a dry run writes nothing"
    missing = subprocess.run(
        [*command[:6], "--dry-run"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert missing.returncode == 2 and "images needs at least one prompt" in missing.stderr


def write_shards(folder: Path) -> dict[str, str]:
    """Two WebDataset shards written by the ``webdataset`` package itself (as img2dataset writes
    them): samples of a PNG or JPEG and a caption, one corrupt image, one sample without a caption.
    Returns {id: caption} of the samples that have an image."""
    import webdataset as wds

    folder.mkdir(parents=True)
    captions = {}
    for shard in range(2):
        with wds.TarWriter(str(folder / f"shard-{shard:03d}.tar")) as sink:
            for index in range(3):
                key = f"{shard:03d}{index:03d}"
                image = np.full((24, 32, 3), 200, np.uint8)
                image[4:16, 6:20] = (220, 30, 30)
                buffer = io.BytesIO()
                kind = "png" if index % 2 else "jpg"
                Image.fromarray(image).save(buffer, "PNG" if kind == "png" else "JPEG")
                data = buffer.getvalue() if (shard, index) != (1, 2) else b"not an image at all"
                sample = {"__key__": key, kind: data}
                if (shard, index) != (0, 1):
                    sample["txt"] = f"the red square {key}"
                    captions[f"shard-{shard:03d}/{key}"] = sample["txt"]
                else:
                    captions[f"shard-{shard:03d}/{key}"] = None
                sink.write(sample)
            sink.write({"__key__": f"{shard:03d}999", "txt": "a caption without an image"})
    return captions


def test_webdataset_shards_are_read_sample_by_sample(ray_session, tmp_path: Path) -> None:
    captions = write_shards(tmp_path / "shards")
    flags = {
        "images": str(tmp_path / "shards" / "*.tar"),
        "columns": {"prompt": "txt"},
        "output": str(tmp_path / "o"),
    }
    summary = run_job(load_config(DEFAULT_CONFIG, {**FAST, **flags}))
    rows = {r["id"]: r for r in read_metadata(str(tmp_path / "o")).to_pylist()}
    assert set(rows) == set(captions)
    assert rows["shard-000/000001"]["status"] == "error" and "prompt" in rows["shard-000/000001"]["error"]
    assert rows["shard-001/001002"]["status"] == "error" and "decode" in rows["shard-001/001002"]["error"]
    good = {i for i, caption in captions.items() if caption and i != "shard-001/001002"}
    assert all(rows[i]["status"] in ("ok", "empty") and rows[i]["prompt"] == captions[i] for i in good)
    assert summary.counts["error"] == 2
    again = run_job(load_config(DEFAULT_CONFIG, {**FAST, **flags}))
    assert again.skipped == len(captions) and sum(again.this_run.values()) == 0


def test_an_interrupted_images_run_resumes_with_every_row_once(tmp_path: Path) -> None:
    """Ctrl-C part-way through a folder of images and a WebDataset shard, then the same command again."""
    source = tmp_path / "imgs"
    captions = write_shards(source / "shards")
    for index in range(10):
        _square(source / f"p{index:02d}.png")
    expected = {f"p{i:02d}.png" for i in range(10)} | {f"shards/{name}" for name in captions}
    interrupted_then_rerun(
        ["--images", str(source), "--prompt", "the red square"], str(tmp_path / "out"), expected
    )


def test_an_interrupted_s3_prefix_run_resumes_with_every_row_once(s3_server, s3_bucket) -> None:
    """Ctrl-C part-way through a prefix of images on S3 (a corrupt one among them), then again."""
    import fsspec

    bucket, storage_options = s3_bucket
    fs = fsspec.filesystem("s3", **storage_options)
    for index in range(12):
        buffer = io.BytesIO()
        Image.fromarray(np.full((24, 32, 3), 20 * index, np.uint8)).save(buffer, "PNG")
        fs.pipe(f"{bucket}/imgs/p{index:02d}.png", buffer.getvalue())
    fs.pipe(f"{bucket}/imgs/corrupt.png", b"\x89PNG\r\n\x1a\n not really")
    expected = {f"p{i:02d}.png" for i in range(12)} | {"corrupt.png"}
    args = ["--images", f"s3://{bucket}/imgs/", "--prompt", "a thing"]
    rows = interrupted_then_rerun(args, f"s3://{bucket}/out", expected, s3_server.env, fs)
    assert rows["corrupt.png"]["status"] == "error"
