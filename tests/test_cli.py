"""The ``evf`` entry point: every subcommand is wired, and user errors exit 2 with a message."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from evf.cli import SUBCOMMANDS, main


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
    assert "error:" in capsys.readouterr().out
