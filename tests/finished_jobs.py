"""Finished jobs for the review page and export tests: real ``run_job`` outputs, built once per
session on the session's Ray (``conftest.ray_session``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# --------------------------------------------------------------------------------------------------
# Finished jobs (for the review page and the exports)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinishedJob:
    """A real job's manifest and output, and a category map for its prompts."""

    manifest: Path
    output: Path
    categories: dict[str, str]


_MANIFEST_TYPES = {
    "id": "string",
    "image_url": "string",
    "prompt": "string",
    "negative_prompt": "string",
    "mask_url": "string",
    "kind": "string",
    "blur_mask": "int32",
    "use_grounding_dino": "bool",
}


def _run_finished_job(root: Path, rows: list[dict[str, Any]], **overrides: Any) -> FinishedJob:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from evf.pipelines.config import DEFAULT_CONFIG, load_config
    from evf.pipelines.job import run_job

    schema = pa.schema([(name, pa.type_for_alias(kind)) for name, kind in _MANIFEST_TYPES.items()])
    table = pa.Table.from_pylist([{n: row.get(n) for n in _MANIFEST_TYPES} for row in rows], schema=schema)
    manifest, output = root / "manifest.parquet", root / "output"
    pq.write_table(table, manifest)
    config = {"manifest": str(manifest), "output": str(output), "progress": False, **overrides}
    run_job(load_config(DEFAULT_CONFIG, {"cpu.batch_size": 16, "inference.batch_size": 4, **config}))
    prompts = sorted({row["prompt"] for row in rows})
    categories = {prompt: "square" if "square" in prompt else "other shape" for prompt in prompts}
    return FinishedJob(manifest=manifest, output=output, categories=categories)


@pytest.fixture(scope="session")
def finished_job(ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> FinishedJob:
    """The shipped demo model on three synthetic scenes with ground truth (``mask_url``) and a
    ``kind`` column: six ``ok`` rows, an ``empty`` row (negative prompt = prompt) and three ``error``
    rows (a missing image, a text file named .png, an invalid option)."""
    import pyarrow.parquet as pq

    from evf.synthetic import write_dataset

    root = tmp_path_factory.mktemp("finished-job")
    base = pq.read_table(write_dataset(11, 3, str(root / "data"), expressions_per_scene=2)).to_pylist()
    first = base[0]
    text_file = root / "data" / "not_an_image.png"
    text_file.write_text("this is not an image, just text in a file named .png\n")
    extra = [
        {**first, "id": "empty-negative", "negative_prompt": first["prompt"]},
        {"id": "error-missing-image", "image_url": str(root / "data" / "images" / "absent.png"),
         "prompt": "the red square"},
        {"id": "error-not-an-image", "image_url": str(text_file), "prompt": "the red square"},
        {"id": "error-bad-option", "image_url": first["image_url"], "prompt": "a circle", "blur_mask": -4},
    ]  # fmt: skip
    return _run_finished_job(root, [*base, *extra])


@pytest.fixture(scope="session")
def grounded_job(
    ray_session: Any, tmp_path_factory: pytest.TempPathFactory, grounding_dino_dir: Path
) -> FinishedJob:
    """Two GroundingDINO rows (the tiny random detector with every box kept, so many instances per
    row) and one EVF row on one synthetic scene, with the tiny fixture checkpoint (whose box-prompted
    masks are not empty, unlike the demo model's)."""
    import pyarrow.parquet as pq

    from evf.synthetic import write_dataset

    root = tmp_path_factory.mktemp("grounded-job")
    # Scene 1 of seed 11 is 264x147: the tiny GroundingDINO fails on square images (1x1 feature maps).
    image = pq.read_table(write_dataset(11, 2, str(root / "data"), expressions_per_scene=1)).to_pylist()[1]
    url, grounded = image["image_url"], True
    rows = [
        {"id": "g-square", "image_url": url, "prompt": "red square", "use_grounding_dino": grounded},
        {"id": "g-circle", "image_url": url, "prompt": "the blue circle", "use_grounding_dino": grounded},
        {"id": "evf-row", "image_url": url, "prompt": image["prompt"]},
    ]
    overrides = {
        "model": str(Path(__file__).parent / "fixtures" / "evf-sam2-tiny" / "checkpoint"),
        "grounding.model": str(grounding_dino_dir),
        "grounding.box_threshold": 0.0,
        "grounding.text_threshold": 0.0,
    }
    return _run_finished_job(root, rows, **overrides)
