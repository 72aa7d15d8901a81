"""How ``evf run`` ends: an output it cannot write fails in seconds, before Ray; a failed job's last
line is its root cause; rows that all (or too many) failed exit 4; no line quotes a value's bytes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evf.cli import main
from evf.io import ImageWriteError
from evf.pipelines.commit import OutputError, check_output_writable
from evf.pipelines.job import _cause
from evf.request import InvalidRequestError, parse_request, short_repr
from evf.storage import Storage

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "evf-sam2-tiny" / "checkpoint"
IMAGES = sorted((REPO / "examples" / "sample" / "images").glob("*.png"))
FAST = ["--model", str(TINY), "--no-progress", "--batch-size", "2", "--set", "cpu.batch_size=4"]
LONGEST_LINE = 300


def _manifest(folder: Path, image_urls: list[Any], name: str = "m.parquet") -> str:
    """A manifest of one row per image URL (any Arrow-typable value: str, None, bytes, a struct)."""
    rows = {"id": [f"r{i}" for i in range(len(image_urls))], "prompt": ["the shape"] * len(image_urls)}
    pq.write_table(pa.table({**rows, "image_url": image_urls}), folder / name)
    return str(folder / name)


def _evf(
    argv: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "evf.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env or {})},
    )
    return done, time.monotonic() - started


# -- an output that cannot be written: exit 2 in seconds, Ray never imported -------------------------


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A read-only tmpfs (root ignores permission bits, not a read-only mount); skipped where the
    test may not mount one."""
    mountpoint = tmp_path / "ro"
    mountpoint.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mountpoint)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a read-only tmpfs here: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)


def _unwritable(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, str]:
    """An output that cannot be written, and the OS's words for why."""
    (tmp_path / "afile").write_text("not a folder\n")
    if kind == "under-a-file":
        return tmp_path / "afile" / "out", "Not a directory"
    if kind == "a-file":
        return tmp_path / "afile", "is a file"
    return request.getfixturevalue("read_only_dir") / "out", "Read-only file system"


def _import_s(stderr: str) -> float:
    """Seconds spent importing modules, from ``python -X importtime``'s lines (top-level imports)."""
    total = 0
    for line in stderr.splitlines():
        if line.startswith("import time:") and not line.startswith("import time: self"):
            _, cumulative, name = line.split("|")
            total += int(cumulative) if not name[1:].startswith(" ") else 0
    return total / 1e6


@pytest.mark.parametrize("kind", ["under-a-file", "a-file", "read-only"])
def test_an_output_that_cannot_be_written_exits_2_in_seconds_without_ray(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    output, cause = _unwritable(kind, tmp_path, request)
    manifest = _manifest(tmp_path, [str(IMAGES[0])])
    no_ray = tmp_path / "no-ray" / "ray"  # importing ray fails: the check must come before Ray
    no_ray.mkdir(parents=True)
    (no_ray / "__init__.py").write_text("raise ImportError('ray was imported before the output check')\n")
    argv = ["run", "--manifest", manifest, "--output", str(output), *FAST]
    env = {"PYTHONPATH": os.pathsep.join([str(no_ray.parent), str(REPO)]), "PYTHONPROFILEIMPORTTIME": "1"}
    done, elapsed = _evf(argv, env)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    # Seconds, not Ray's and the model's start: under 10 s here when the machine is not loaded, most
    # of it importing torch; what is not importing (the check itself) takes far less than a second.
    importing = _import_s(done.stderr)
    assert elapsed - importing < 5, (elapsed, importing)
    assert done.stdout == ""
    lines = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert len(lines) == 1 and lines[0].startswith("evf run: output "), done.stderr[-2000:]
    assert repr(str(output)) in lines[0] and cause in lines[0], lines[0]
    assert not list(tmp_path.glob("**/_evf-write-check-*"))


@pytest.mark.parametrize("kind", ["under-a-file", "a-file", "read-only"])
def test_dry_run_checks_the_output_too(kind: str, tmp_path: Path, request, capsys, monkeypatch) -> None:
    output, cause = _unwritable(kind, tmp_path, request)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises
    argv = ["run", "--dry-run", "--manifest", _manifest(tmp_path, [str(IMAGES[0])]), "--output", str(output)]
    assert main([*argv, *FAST]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"evf run: output {str(output)!r} ") and cause in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_the_check_leaves_nothing_behind(tmp_path: Path) -> None:
    output = tmp_path / "new" / "deeper" / "out"
    check_output_writable(str(output), Storage())
    assert not (tmp_path / "new").exists()  # the folders it made are gone (a dry run writes nothing)
    (tmp_path / "kept").mkdir()
    check_output_writable(str(tmp_path / "kept"), Storage())
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())


def test_the_check_on_s3(s3_server, s3_bucket, monkeypatch) -> None:
    bucket, options = s3_bucket
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    storage = Storage.from_environment()
    check_output_writable(f"s3://{bucket}/runs/out", storage)
    assert not s3_server.client().list_objects_v2(Bucket=bucket).get("Contents")  # the probe is deleted
    started = time.monotonic()
    with pytest.raises(OutputError) as info:
        check_output_writable(f"s3://{bucket}-missing/out", storage)
    message = str(info.value)
    assert (
        message == f"output 's3://{bucket}-missing/out' is not writable: The specified bucket does not exist"
    )
    assert time.monotonic() - started < 10


# -- a job that fails: its root cause is the last line ---------------------------------------------


def test_a_ray_task_failure_is_told_by_its_innermost_cause(ray_session) -> None:
    import ray.data

    def commit(batch: dict[str, Any]) -> dict[str, Any]:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/data/out")
        except OSError as error:
            raise ImageWriteError("cannot write '/data/out/metadata/part-1.parquet'") from error

    with pytest.raises(Exception) as info:
        ray.data.range(1).map_batches(commit).materialize()
    assert "retry attempts" in str(info.value)  # what Ray's own message would have said
    assert _cause(info.value) == "OSError: [Errno 30] Read-only file system: '/data/out'"


def test_a_write_that_fails_mid_run_ends_with_its_cause(
    ray_session, tmp_path: Path, capfd, request: pytest.FixtureRequest
) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "metadata").symlink_to(request.getfixturevalue("read_only_dir"))  # the root is writable
    manifest = _manifest(tmp_path, [str(IMAGES[0])])
    assert main(["run", "--manifest", manifest, "--output", str(output), *FAST]) == 1
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("evf run: job failed: the pipeline failed: OSError: [Errno 30] Read-only"), last
    assert "DataContext" not in last


# -- exit 4: every row, or more than --max-error-rate of them, failed -------------------------------


def test_exit_status_follows_the_rows(ray_session, tmp_path: Path, capfd) -> None:
    good, missing = [str(path) for path in IMAGES[:2]], str(tmp_path / "no-such-image.png")
    mixed = _manifest(tmp_path, [*good, missing], "mixed.parquet")

    def run(manifest: str, output: str, *flags: str) -> tuple[int, str, str]:
        status = main(["run", "--manifest", manifest, "--output", str(tmp_path / output), *FAST, *flags])
        out, err = capfd.readouterr()
        return status, out, err

    status, out, err = run(mixed, "normal")  # one permanent error of three: a normal job
    assert status == 0, err[-2000:]
    assert f"Masks written to {tmp_path / 'normal' / 'masks'}/" in out

    status, out, err = run(mixed, "strict", "--max-error-rate", "0.2")
    assert status == 4, err[-2000:]
    assert "1 of the 3 row(s) this run processed failed (more than --max-error-rate 0.2)" in err
    assert "Masks written to" in out  # two rows have masks
    status, out, err = run(mixed, "strict", "--max-error-rate", "0.2")  # nothing left to do
    assert status == 0, err[-2000:]


def test_max_error_rate_is_a_share() -> None:
    with pytest.raises(SystemExit):
        main(["run", "--max-error-rate", "x"])
    assert main(["run", "--max-error-rate", "1.5", "--dry-run"]) == 2


# -- bytes are described, never printed ------------------------------------------------------------


def test_values_in_messages_are_short_and_bytes_are_described() -> None:
    png = IMAGES[0].read_bytes()
    size = f"{len(png):,} B"
    assert short_repr(png) == f"<bytes, {size}>"
    assert short_repr(bytearray(png)) == f"<bytearray, {size}>"
    assert short_repr(memoryview(png)) == f"<memoryview, {size}>"
    assert short_repr({"bytes": png, "path": "a.png"}) == f"{{'bytes': <bytes, {size}>, 'path': 'a.png'}}"
    assert len(short_repr("x" * 10_000)) <= 120
    with pytest.raises(InvalidRequestError) as info:
        parse_request({"prompt": png, "image_url": {"bytes": png, "path": None}})
    message = str(info.value)
    assert f"prompt=<bytes, {size}>" in message and len(message) < LONGEST_LINE, message
    with pytest.raises(InvalidRequestError) as info:
        parse_request({"prompt": "x", "negative_prompt": ["y" * 1000]})
    assert len(str(info.value)) < 200, str(info.value)


def _bytes_manifests(tmp_path: Path) -> dict[str, str]:
    """image_url as PNG bytes (a binary column), and as Hugging Face's image struct."""
    pngs = [path.read_bytes() for path in IMAGES[:3]]
    structs = [{"bytes": data, "path": path.name} for data, path in zip(pngs, IMAGES, strict=False)]
    return {
        "bytes": _manifest(tmp_path, pngs, "bytes.parquet"),
        "struct": _manifest(tmp_path, structs, "struct.parquet"),
    }


def test_dry_run_of_a_bytes_column_is_short(tmp_path: Path, capsys) -> None:
    for kind, manifest in _bytes_manifests(tmp_path).items():
        assert (
            main(["run", "--dry-run", "--manifest", manifest, "--output", str(tmp_path / kind), *FAST]) == 0
        )
        text = "".join(capsys.readouterr())
        assert "invalid      3 row(s)" in text and "<bytes, " in text, text[-2000:]
        assert max(map(len, text.splitlines())) <= LONGEST_LINE, text[-3000:]


def test_a_job_whose_rows_all_failed_exits_4_and_quotes_no_bytes(tmp_path: Path) -> None:
    manifest = _bytes_manifests(tmp_path)["bytes"]
    output = tmp_path / "out"
    no_ray = tmp_path / "no-ray" / "ray"  # importing ray fails: no valid row, so neither Ray nor model
    no_ray.mkdir(parents=True)
    (no_ray / "__init__.py").write_text("raise ImportError('ray was imported for a run with no valid row')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(no_ray.parent), str(REPO)])}
    done, _ = _evf(["run", "--manifest", manifest, "--output", str(output), *FAST], env)
    text = done.stdout + done.stderr
    assert done.returncode == 4, text[-3000:]  # every row failed: exit 4
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("evf run: 3 of the 3 row(s) this run processed failed (all of them)"), last
    assert "Masks written to" not in done.stdout  # there are none
    lines = text.splitlines()
    assert max(map(len, lines)) <= LONGEST_LINE, max(lines, key=len)[:1000]
    errors = pq.read_table(output / "metadata").column("error").to_pylist()
    assert len(errors) == 3 and all(e.startswith("invalid request: image_url=<bytes, ") for e in errors), (
        errors
    )
    assert all("--columns image=COLUMN" in e for e in errors), errors[0]
