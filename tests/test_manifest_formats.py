"""CSV and JSON Lines manifests beside Parquet: ``evf run`` over each (one metadata row per manifest
row, a re-run skips them all, ``--dry-run`` counts them), the scan's ids and rows as the read tasks
later read them, folders mixing kinds, and a malformed file naming its line."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_truncated_png

import evf.manifest_text
from evf.manifest import read_rows, scan_manifest
from evf.manifest_file import ManifestError, row_id
from evf.manifest_text import text_value
from evf.pipelines.config import DEFAULT_CONFIG, load_config
from evf.pipelines.dryrun import dry_run
from evf.pipelines.job import run_job
from evf.pipelines.metadata import read_metadata
from evf.synthetic import write_dataset

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "evf-sam2-tiny" / "checkpoint"
FAST = {
    "progress": False,
    "cpu.batch_size": 4,
    "inference.batch_size": 4,
    "inference.dtype": "float32",
    "model": str(TINY),
}


def job(manifest: Path, output: Path) -> Any:
    return load_config(DEFAULT_CONFIG, {"manifest": str(manifest), "output": str(output), **FAST})


def _dataset(root: Path) -> list[dict[str, Any]]:
    """Images of a small synthetic dataset under ``root`` (relative URLs) and a truncated PNG."""
    write_dataset(7, 3, str(root), expressions_per_scene=2)
    rows = pq.read_table(root / "manifest.parquet", columns=["id", "image_url", "prompt"]).to_pylist()
    for row in rows:
        row["image_url"] = "images/" + row["image_url"].rsplit("/", 1)[-1]
    (root / "bad").mkdir()
    make_truncated_png(root / "bad" / "truncated.png")
    return rows


def _by_id(output: Path) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in read_metadata(str(output)).to_pylist()}


def _check_run_and_rerun(manifest: Path, output: Path, expected_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The job gives exactly one metadata row per manifest row; a re-run skips every row."""
    summary = run_job(job(manifest, output))
    metadata = read_metadata(str(output)).to_pylist()
    assert sorted(row["id"] for row in metadata) == sorted(expected_ids)
    assert summary.input_rows == len(expected_ids) and summary.missing == 0
    again = run_job(job(manifest, output))
    assert again.skipped == len(expected_ids) and sum(again.this_run.values()) == 0
    assert _by_id(output) == {row["id"]: row for row in metadata}, "the re-run changed no row"
    return {row["id"]: row for row in metadata}


def test_csv_manifest_runs_resumes_and_dry_runs(ray_session, tmp_path: Path) -> None:
    data = tmp_path / "data"
    good = _dataset(data)
    header = ["id", "image_url", "prompt", "blur_mask", "mask_only", "notes"]
    lines = []
    for i, row in enumerate(good):
        blur = {1: "3", 2: "2"}.get(i, "")  # empty cells: the job's default; 2 is not a kernel size
        mask_only = {3: "false", 4: "TRUE"}.get(i, "")
        lines.append([row["id"], row["image_url"], f"{row['prompt']}, please", blur, mask_only, 'x, "y"'])
    lines.append(["", "bad/truncated.png", "the circle", "", "", ""])  # no id: "m.csv:6"
    manifest = data / "m.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *lines])
    ids = [row[0] or f"m.csv:{index}" for index, row in enumerate(lines)]

    report = dry_run(job(manifest, tmp_path / "out"))
    assert (report.rows, report.invalid, report.to_do) == (7, 1, 6)
    assert report.first_invalid == [(good[2]["id"], report.first_invalid[0][1])]
    assert "blur_mask=2" in report.first_invalid[0][1]

    rows = _check_run_and_rerun(manifest, tmp_path / "out", ids)
    invalid = rows[good[2]["id"]]
    assert invalid["status"] == "error" and "blur_mask=2" in invalid["error"], invalid
    corrupt = rows["m.csv:6"]
    assert corrupt["status"] == "error" and "truncated" in corrupt["error"].lower(), corrupt
    assert rows[good[1]["id"]]["blur_mask"] == 3 and rows[good[0]["id"]]["blur_mask"] == 0
    assert rows[good[3]["id"]]["mask_only"] is False and rows[good[4]["id"]]["mask_only"] is True
    assert rows[good[0]["id"]]["prompt"] == f"{good[0]['prompt']}, please"
    for row_id_ in ids:
        if row_id_ not in (good[2]["id"], "m.csv:6"):
            assert rows[row_id_]["status"] in ("ok", "empty"), rows[row_id_]
    assert dry_run(job(manifest, tmp_path / "out")).rows == 7


def test_jsonl_manifest_runs_and_resumes(ray_session, tmp_path: Path) -> None:
    data = tmp_path / "data"
    good = _dataset(data)[:4]
    objects: list[dict[str, Any]] = [dict(row) for row in good]
    objects[0]["blur_mask"] = 3
    objects[1].update(mask_only=False, blur_mask=None)
    objects[2]["mask_only"] = "yes"  # typed as given: text is no boolean
    del objects[3]["id"]  # "m.jsonl:3"
    manifest = data / "m.jsonl"
    manifest.write_text("".join(json.dumps(o) + "\n" for o in objects) + "\n")
    ids = [o.get("id") or f"m.jsonl:{index}" for index, o in enumerate(objects)]

    assert dry_run(job(manifest, tmp_path / "out")).rows == 4
    rows = _check_run_and_rerun(manifest, tmp_path / "out", ids)
    assert rows[good[0]["id"]]["blur_mask"] == 3 and rows[good[1]["id"]]["mask_only"] is False
    assert rows[good[2]["id"]]["status"] == "error" and "mask_only='yes'" in rows[good[2]["id"]]["error"]
    assert rows["m.jsonl:3"]["status"] in ("ok", "empty")


# --------------------------------------------------------------------------------------------------
# The scan and read_rows, without Ray
# --------------------------------------------------------------------------------------------------


def _write_csv(path: Path, rows: int) -> list[str]:
    """``rows`` rows, ids derived for every 7th (empty cell), prompts with commas, quotes and
    newlines; returns the ids."""
    ids = []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image_url", "prompt", "blur_mask"])
        for i in range(rows):
            rid = "" if i % 7 == 3 else f"row-{i}"
            prompt = f'the "thing" {i},\nsecond line' if i % 5 == 0 else f"thing {i}"
            writer.writerow([rid, f"images/{i}.png", prompt, "" if i % 2 else "3"])
            ids.append(rid or f"{path.name}:{i}")
    return ids


@pytest.mark.parametrize("chunk", [1 << 20, 500])
def test_scan_of_a_csv_gives_the_ids_and_rows_read_rows_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(evf.manifest_text, "TEXT_CHUNK_BYTES", chunk)  # 500: many chunks, values across cuts
    ids = _write_csv(tmp_path / "m.csv", 1000)
    manifest = scan_manifest(str(tmp_path / "m.csv"))
    assert manifest.num_rows == 1000 and manifest.ids.to_pylist() == ids
    (file,) = manifest.files
    assert file.format == "csv" and (len(file.row_groups) > 50) == (chunk == 500)
    rows = list(read_rows(file, 0, 1000, ["id", "image_url", "prompt", "blur_mask"]))
    assert [row["_row"] for row in rows] == list(range(1000))
    assert [row_id(row["id"], file.name, row["_row"]) for row in rows] == ids
    assert rows[10]["prompt"] == 'the "thing" 10,\nsecond line' and rows[10]["blur_mask"] == 3
    assert rows[11]["prompt"] == "thing 11" and rows[11]["blur_mask"] is None
    middle = list(read_rows(file, 333, 777, ["id", "prompt"]))
    assert [row["_row"] for row in middle] == list(range(333, 777))
    assert [row["prompt"] for row in middle] == [row["prompt"] for row in rows[333:777]]


def test_a_chunk_never_ends_inside_a_quoted_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stray quotes in unquoted fields (27" monitor) upset a count of quotes; values span lines.
    monkeypatch.setattr(evf.manifest_text, "TEXT_CHUNK_BYTES", 300)
    prompts = [
        f"two\nlines {i}" if i % 5 == 2 else f'27" monitor {i}' if i % 50 == 1 else f"thing {i}"
        for i in range(1000)
    ]
    text = "".join(f'r{i},a.png,"{p}"\n' if "\n" in p else f"r{i},a.png,{p}\n" for i, p in enumerate(prompts))
    (tmp_path / "m.csv").write_text("id,image_url,prompt\n" + text)
    manifest = scan_manifest(str(tmp_path / "m.csv"))
    assert manifest.ids.to_pylist() == [f"r{i}" for i in range(1000)]
    (file,) = manifest.files
    assert len(file.row_groups) > 50
    assert [row["prompt"] for row in read_rows(file, 0, 1000, ["prompt"])] == prompts


def test_malformed_csv_and_jsonl_name_the_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evf.manifest_text, "TEXT_CHUNK_BYTES", 4096)
    _write_csv(tmp_path / "m.csv", 1000)
    lines = (tmp_path / "m.csv").read_text().split("\n")
    bad = len(lines) - 100  # a line of one of the last chunks
    lines[bad - 1] = "row-x,images/x.png"  # a column short
    (tmp_path / "m.csv").write_text("\n".join(lines))
    with pytest.raises(ManifestError, match=rf"m\.csv' line {bad}: Expected 4 columns, got 2"):
        scan_manifest(str(tmp_path / "m.csv"))

    good = [json.dumps({"id": i, "image_url": "a.png", "prompt": "p"}) for i in range(300)]
    (tmp_path / "m.jsonl").write_text("\n".join([*good[:250], '{"id": 250, "prompt": ', *good[251:]]))
    with pytest.raises(ManifestError, match=r"m\.jsonl' line 251: not valid JSON"):
        scan_manifest(str(tmp_path / "m.jsonl"))
    (tmp_path / "m.jsonl").write_text("\n".join([*good[:10], "[1, 2]", *good[11:]]))
    with pytest.raises(ManifestError, match=r"m\.jsonl' line 11: not a JSON object"):
        scan_manifest(str(tmp_path / "m.jsonl"))
    (tmp_path / "e.csv").write_bytes(b"")
    with pytest.raises(ManifestError, match=r"e\.csv' line 1: no header line"):
        scan_manifest(str(tmp_path / "e.csv"))


def test_folder_mixes_kinds_and_jsonl_values_keep_their_types(tmp_path: Path) -> None:
    pq.write_table(pa.table({"image_url": ["a.png"], "prompt": ["p"]}), tmp_path / "a.parquet")
    (tmp_path / "b.csv").write_text("image_url,prompt,expand_mask\na.png,p,2\na.png,q,\n")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "c.ndjson").write_text(
        '{"image_url": "a.png", "prompt": "p", "id": 7, "expand_mask": 2}\n'
        '{"image_url": "a.png", "prompt": "2024-01-01", "expand_mask": "2"}\n'  # types change: as given
    )
    (tmp_path / "dates.jsonl").write_text(
        '{"image_url": "a.png", "prompt": "2024-01-01", "id": "2024-01-02"}\n'
    )
    (tmp_path / "_hidden.csv").write_text("not, a manifest\n")
    (tmp_path / "notes.txt").write_text("ignored\n")
    manifest = scan_manifest(str(tmp_path))
    assert [(f.name, f.format) for f in manifest.files] == [
        ("a.parquet", "parquet"),
        ("b.csv", "csv"),
        ("dates.jsonl", "jsonl"),
        ("deep/c.ndjson", "jsonl"),
    ]
    assert manifest.ids.to_pylist() == [
        "a.parquet:0",
        "b.csv:0",
        "b.csv:1",
        "2024-01-02",
        "7",
        "deep/c.ndjson:1",
    ]
    csv_rows = list(read_rows(manifest.files[1], 0, 2, ["image_url", "prompt", "expand_mask"]))
    assert [row["expand_mask"] for row in csv_rows] == [2, None]
    (dates,) = read_rows(manifest.files[2], 0, 1, ["id", "prompt"])  # text, never a timestamp
    assert (dates["id"], dates["prompt"]) == ("2024-01-02", "2024-01-01")
    json_rows = list(read_rows(manifest.files[3], 0, 2, ["id", "prompt", "expand_mask"]))
    assert [(row["id"], row["prompt"], row["expand_mask"]) for row in json_rows] == [
        (7, "p", 2),
        (None, "2024-01-01", "2"),
    ]


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("mask_only", "true", True),
        ("mask_only", "FALSE", False),
        ("fill_holes", "1", True),
        ("mask_only", "yes", "yes"),  # left for validation to reject, naming the field
        ("blur_mask", "3", 3),
        ("blur_mask", "5.0", 5),
        ("blur_mask", "2.5", "2.5"),
        ("blur_mask", " ", None),
        ("min_score", "0.25", 0.25),
        ("negative_prompt", "the dog", "the dog"),
        ("prompt", "1", "1"),  # not an option: text stays text
    ],
)
def test_csv_text_becomes_the_options_type(name: str, text: str, value: Any) -> None:
    converted = text_value(name, text)
    assert converted == value and type(converted) is type(value)
