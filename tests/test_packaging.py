"""The wheel of this checkout: one installed top-level name (`evf`), every file of the folders it is
built from (the layers and the data they ship) inside it, and a build that prints no setuptools warning.

The layers stand at the repository root (cli/, pipelines/, training/, configs/, examples/sample/) and
pyproject.toml maps them into `evf` by an explicit `packages` list and package-data patterns, so a new
subpackage or data folder is silently left out of the wheel unless it is named there; an editable
install does not show this (it imports straight from the folders).
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The folders the wheel is built from and where their files land in it ([tool.setuptools.package-dir]).
SOURCE_FOLDERS = {
    "evf": "evf",
    "cli": "evf/cli",
    "pipelines": "evf/pipelines",
    "training": "evf/training",
    "configs": "evf/configs",
    "examples/sample": "evf/sample",
}

# Named on their own too, so that the check does not depend on the source folders being where
# SOURCE_FOLDERS says.
MUST_SHIP = [
    "evf/cli/__init__.py",
    "evf/pipelines/job.py",
    "evf/training/trainer.py",
    "evf/configs/local.yaml",
    "evf/sample/manifest.parquet",
    "evf/pipelines/review_page/review.html",
    "evf/assets/evf-sam2-demo/model.safetensors",
]

# What is not part of the source: the .gitignore'd build outputs, caches and virtual environments.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".*_cache",
    ".hypothesis",
    "outputs",
    ".ipynb_checkpoints",
)

# Lines of the build's output that are not setuptools speaking: pip's own lines about this machine's
# pip configuration (an index folder that does not exist), and -v's list of the files copied into the
# wheel (whose names may hold "warning").
_NOT_A_WARNING = re.compile(r"Location '.*' is ignored|^\s*(copying|adding|creating) ")


@dataclass
class Built:
    src: Path  # the copy of the checkout the wheel was built from
    names: set[str] = field(repr=False)  # the wheel's entries
    top_level: list[list[str]]  # the names each top_level.txt lists
    log: str = field(repr=False)  # what pip printed


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Builds the wheel of a copy of the checkout.

    A copy, because an in-tree build reuses ./build: setuptools puts everything under build/lib in
    the wheel, so a module moved or deleted since the last build would still ship (and the build
    would write into the checkout). -v so that setuptools' logged warnings show too; without
    PYTHONDONTWRITEBYTECODE, which only adds setuptools' "byte-compiling is disabled" notes."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    out = tmp / "wheel"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation"]
    proc = subprocess.run(
        [*cmd, "--no-index", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    (wheel,) = out.glob("evf_sam-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        top_level = [zf.read(n).decode().split() for n in names if n.endswith(".dist-info/top_level.txt")]
    return Built(src, names, top_level, log)


def test_wheel_installs_one_top_level_name(built):
    firsts = {n.split("/", 1)[0] for n in built.names}
    dist_info = {f for f in firsts if f.endswith(".dist-info")}
    assert len(dist_info) == 1, sorted(firsts)
    assert firsts - dist_info == {"evf"}, sorted(firsts)
    assert {n.split("/", 1)[0] for n in built.names if n.endswith(".py")} == {"evf"}
    for listed in built.top_level:
        assert listed == ["evf"], listed


def test_wheel_holds_every_file_of_the_source_folders(built):
    src = built.src
    missing = [path for path in MUST_SHIP if path not in built.names]
    for folder, target in SOURCE_FOLDERS.items():
        for path in sorted((src / folder).rglob("*")):
            if path.is_file():
                in_wheel = f"{target}/{path.relative_to(src / folder).as_posix()}"
                if in_wheel not in built.names:
                    missing.append(in_wheel)
    assert not missing, (
        "not in the wheel (name the package in [tool.setuptools] packages, or the file's pattern "
        f"in [tool.setuptools.package-data]): {missing}"
    )


def test_wheel_build_prints_no_setuptools_warning(built):
    warnings = [
        line
        for line in built.log.splitlines()
        if "warning" in line.lower() and not _NOT_A_WARNING.search(line)
    ]
    assert not warnings, "\n".join(warnings)
