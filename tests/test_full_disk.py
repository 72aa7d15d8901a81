"""A full disk fails writes cleanly: no partial file is left that a later run would trust.

Runs on a small tmpfs the test mounts (needs root with CAP_SYS_ADMIN; skipped, with the reason, where
mounting is not allowed).
"""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from evf.checkpoints import CheckpointError, resolve_checkpoint
from evf.io import ImageWriteError, write_bytes

CHECKPOINT = Path(__file__).parent / "fixtures" / "evf-sam2-tiny" / "checkpoint"


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at ``tmp_path / "disk"`` for the test, unmounted afterwards."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    try:
        result = _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint))
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"cannot mount a tmpfs here: {error}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` until about ``leave`` bytes are free."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    (disk / "filler").write_bytes(b"\0" * max(free - leave, 0))


def test_a_write_that_runs_out_of_space_leaves_no_partial_file(small_disk: Path) -> None:
    target = small_disk / "masks" / "a.png"
    write_bytes(str(target), b"old mask")
    fill(small_disk, leave=64 * 1024)
    for uri in (str(target), target.as_uri(), str(small_disk / "masks" / "b.png")):
        with pytest.raises(ImageWriteError) as info:
            write_bytes(uri, os.urandom(512 * 1024))
        assert info.value.errno == errno.ENOSPC
        assert "No space left on device" in str(info.value) and "gave up" not in str(info.value)
    assert target.read_bytes() == b"old mask"  # the earlier file is untouched
    assert sorted(os.listdir(small_disk / "masks")) == ["a.png"]  # no temporary or partial file


def test_the_model_cache_never_trusts_a_copy_that_ran_out_of_space(small_disk: Path) -> None:
    root = f"/evf-test-{uuid.uuid4().hex[:8]}/ckpt"
    memory = fsspec.filesystem("memory")
    try:
        for file in CHECKPOINT.iterdir():
            memory.pipe_file(f"{root}/{file.name}", file.read_bytes())
        uri = f"memory://{root}"
        cache = small_disk / "cache"  # the fixture checkpoint (~2 MB) does not fit in 1 MiB
        for _ in range(2):  # a second run meets the same clean state, not a half copy
            with pytest.raises(CheckpointError) as info:
                resolve_checkpoint(uri, cache_dir=cache)
            assert "No space left on device" in str(info.value) and uri in str(info.value)
            assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []

        assert _mount("-o", "remount,size=8m", str(small_disk)).returncode == 0
        folder = resolve_checkpoint(uri, cache_dir=cache)
        for file in CHECKPOINT.iterdir():
            assert (folder / file.name).read_bytes() == file.read_bytes(), file.name
    finally:
        memory.rm(root.rsplit("/", 1)[0], recursive=True)
