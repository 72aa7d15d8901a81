"""The ``evf`` entry point: every subcommand is wired, and user errors exit 2 with a message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evf.cli import SUBCOMMANDS, main

IMAGE = Path(__file__).resolve().parent.parent / "examples" / "sample" / "images" / "2024-000000.png"


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(name: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    assert "usage: evf " + name in capsys.readouterr().out


def test_synth_writes_a_manifest(tmp_path: Path) -> None:
    assert main(["synth", "--seed", "3", "--count", "2", "--output", str(tmp_path)]) == 0
    table = pq.read_table(tmp_path / "manifest.parquet")
    assert table.num_rows > 0 and {"image_url", "prompt", "mask_url"} <= set(table.column_names)


def test_train_with_an_invalid_recipe_exits_2(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("steps: -1\n")
    assert main(["train", str(recipe)]) == 2
    assert "evf train: invalid training config" in capsys.readouterr().err


# -- the contract: errors on stderr as "evf <command>: ...", exit 1 or 2, never a traceback ---------


def _bad_recipe(tmp_path: Path) -> list[str]:
    (tmp_path / "bad.yaml").write_text("steps: -1\n")
    return ["train", str(tmp_path / "bad.yaml")]


def _no_ground_truth(tmp_path: Path) -> list[str]:
    pq.write_table(pa.table({"image_url": ["a.png"], "prompt": ["p"]}), tmp_path / "m.parquet")
    return ["eval", "--manifest", str(tmp_path / "m.parquet"), "--set", "progress=false"]


CASES = {
    # name: (argv from tmp_path, exit status, words the one-line message must hold)
    "segment-no-gpu": (
        lambda t: ["segment", str(IMAGE), "--prompt", "x", "-o", str(t / "o.png"), "--device", "cuda"],
        2,
        ("no CUDA GPU", "--device cpu"),
    ),
    "segment-missing-image": (
        lambda t: ["segment", str(t / "nope.png"), "--prompt", "x", "-o", str(t / "o.png")],
        2,
        ("cannot read", "file not found"),
    ),
    "segment-bad-option": (
        lambda t: ["segment", str(IMAGE), "--prompt", "x", "-o", str(t / "o.png"), "--blur-mask", "4"],
        2,
        ("blur_mask=4",),
    ),
    "run-bad-config": (lambda t: ["run", "--set", "inference.actors=-1"], 2, ("inference.actors",)),
    "run-missing-manifest": (
        lambda t: ["run", "--manifest", str(t / "none.parquet"), "--output", str(t / "o")],
        1,
        ("job failed", "not found"),
    ),
    "eval-bad-config": (
        lambda t: ["eval", "--manifest", "m", "--set", "cpu.nonsense=1"],
        2,
        ("unknown field",),
    ),
    "eval-no-ground-truth": (_no_ground_truth, 1, ("mask_url",)),
    "synth-bad-count": (
        lambda t: ["synth", "--seed", "1", "--count", "0", "--output", str(t)],
        2,
        ("--count",),
    ),
    "train-bad-recipe": (_bad_recipe, 2, ("invalid training config", "steps")),
    "review-no-output": (lambda t: ["review", str(t / "nothing")], 2, ("no committed rows",)),
    "export-no-output": (
        lambda t: ["export", "coco", str(t / "nothing"), "-o", str(t / "c.json")],
        2,
        ("no committed rows",),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_errors_follow_the_contract(case: str, tmp_path: Path) -> None:
    make_argv, status, words = CASES[case]
    argv = make_argv(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "evf.cli", *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == status, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith(f"evf {argv[0]}: ")]
    assert errors, done.stderr[-2000:]
    assert all(word in done.stderr for word in words), done.stderr[-2000:]
    assert not any(line.startswith(f"evf {argv[0]}: ") for line in done.stdout.splitlines())


def test_version() -> None:
    done = subprocess.run([sys.executable, "-m", "evf.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("evf-sam ")
