"""A second model family, defined here and registered through the public registry, runs through
``evf.segment``, the engine and the whole Ray job with no line of ``pipelines/`` or ``cli/`` written
for it (issue 27's seam).

The family is a tiny torch module: a palette of named colours (its only weights, in
``model.safetensors``); a prompt naming a colour segments the pixels near it, each connected
component one instance. Its expected masks are computed here from the drawn rectangles, not by the
family's own code.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from evf.checkpoints import CheckpointLayout
from evf.engine import InferenceEngine, RequestFailed
from evf.registry import FamilyInfo, ModelFamily, describe_checkpoint, family_of, register_family
from evf.request import parse_request
from evf.result import Instance, RawMasks
from evf.settings import ModelOptions, ModelSettings

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}
SIZE = 48  # the family's input resolution


@dataclass
class PaletteInputs:
    """The family's prepared inputs: (3, SIZE, SIZE) float32 pixels in 0..255 and the original size."""

    pixels: np.ndarray
    size: tuple[int, int]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"pixels": self.pixels}


@dataclass(frozen=True)
class PalettePreprocessor:
    size: int = SIZE

    def __call__(self, image: np.ndarray) -> PaletteInputs:
        resized = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_NEAREST)
        return PaletteInputs(resized.transpose(2, 0, 1).astype(np.float32), image.shape[:2])


class PaletteModel(nn.Module):
    """Segments the pixels within ``radius`` of a named colour of its palette."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = list(names)
        self.palette = nn.Parameter(torch.zeros(len(self.names), 3))
        self.radius = nn.Parameter(torch.tensor(60.0))
        self.preprocessor = PalettePreprocessor()

    def forward(self, pixels: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S), (N, 3) -> (N, S, S) logits (positive near the colour)."""
        distance = (pixels - colour[:, :, None, None]).norm(dim=1)
        return self.radius - distance


@register_family
class PaletteFamily(ModelFamily):
    name = "palette-test"
    architectures = ("PaletteTestModel",)
    layout = CheckpointLayout("palette", ("config.json", "model.safetensors"), (("config.json",),))
    prompt_kinds = frozenset({"text"})

    @classmethod
    def describe(cls, folder: Path, options: ModelOptions) -> FamilyInfo:
        return FamilyInfo(PalettePreprocessor(), facts={"size": SIZE})

    @classmethod
    def load(cls, folder: Path, options: ModelOptions, model_id: str) -> PaletteModel:
        from safetensors.torch import load_file

        names = json.loads((folder / "config.json").read_text())["colours"]
        model = PaletteModel(names)
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model.to(options.device).eval()

    @classmethod
    def owns(cls, model: Any) -> bool:
        return isinstance(model, PaletteModel)

    @classmethod
    def prepared_from_arrays(cls, arrays: Mapping[str, np.ndarray], size: tuple[int, int]) -> PaletteInputs:
        return PaletteInputs(np.array(arrays["pixels"]), size)

    @classmethod
    def infer(cls, model: PaletteModel, images: Sequence[Any], items: Sequence[Any], grounding=None):
        pixels = torch.stack([torch.from_numpy(images[i].pixels) for i, _ in items])
        out = []
        with torch.inference_mode():
            for prompt_of in (lambda r: r.prompt, lambda r: r.negative_prompt):
                colours = [_colour(model, prompt_of(r)) for _, r in items]
                logits = model(pixels, torch.stack([c if c is not None else torch.zeros(3) for c in colours]))
                out.append([(lg.numpy(), c is not None) for lg, c in zip(logits, colours, strict=True)])
        results = []
        for (image_index, _), (positive, _), (negative, has_negative) in zip(items, *out, strict=True):
            size = images[image_index].size
            mask = _upsample(positive, size)
            instances = _instances(mask)
            score = 1.0 if instances else 0.0
            neg = _upsample(negative, size) if has_negative else None
            results.append(RawMasks(mask, score, neg, instances))
        return results


def _colour(model: PaletteModel, text: str | None) -> torch.Tensor | None:
    if text is None:
        return None
    words = text.lower().split()
    for index, name in enumerate(model.names):
        if name in words:
            return model.palette[index]
    if "fail" in words:
        raise RuntimeError("the palette model was asked to fail")
    return torch.full((3,), -1000.0)  # a colour no pixel has: an empty mask


def _upsample(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(logits, (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 0


def _instances(mask: np.ndarray) -> list[Instance]:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    found = []
    for label in range(1, count):
        x, y, w, h, _area = stats[label]
        found.append(Instance((float(x), float(y), float(x + w), float(y + h)), 1.0, 1.0, labels == label))
    return found


# --------------------------------------------------------------------------------------------------


def write_palette_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    (folder / "config.json").write_text(json.dumps({"architectures": ["PaletteTestModel"], "colours": names}))
    palette = torch.tensor([COLOURS[n] for n in names], dtype=torch.float32)
    save_file({"palette": palette, "radius": torch.tensor(60.0)}, str(folder / "model.safetensors"))
    return folder


# Rectangles (x0, y0, x1, y1) per colour on a 96 x 128 grey image: two red, one green, one blue.
RECTS = {"red": [(8, 8, 40, 32), (80, 56, 120, 88)], "green": [(56, 8, 88, 40)], "blue": [(8, 56, 48, 90)]}


def draw_scene(path: Path) -> np.ndarray:
    image = np.full((96, 128, 3), 128, np.uint8)
    for colour, rects in RECTS.items():
        for x0, y0, x1, y1 in rects:
            image[y0:y1, x0:x1] = COLOURS[colour]
    Image.fromarray(image).save(path)
    return image


def expected_mask(colour: str) -> np.ndarray:
    mask = np.zeros((96, 128), bool)
    for x0, y0, x1, y1 in RECTS[colour]:
        mask[y0:y1, x0:x1] = True
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def palette_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_palette_checkpoint(tmp_path_factory.mktemp("palette") / "checkpoint")


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    return path, draw_scene(path)


def test_the_registry_finds_the_family_from_config_json(palette_dir: Path) -> None:
    assert family_of(palette_dir) is PaletteFamily
    info = describe_checkpoint(str(palette_dir))
    assert info.family is PaletteFamily and info.facts() == {
        "model_id": str(palette_dir),
        "family": "palette-test",
        "size": SIZE,
    }
    (palette_dir.parent / "unknown").mkdir(exist_ok=True)
    (palette_dir.parent / "unknown" / "config.json").write_text('{"architectures": ["NoSuchModel"]}')
    with pytest.raises(Exception, match="no known model family.*PaletteTestModel"):
        family_of(palette_dir.parent / "unknown")


def test_evf_segment_runs_the_family(palette_dir: Path, scene: tuple[Path, np.ndarray]) -> None:
    from evf.segment import segment

    path, image = scene
    engine = InferenceEngine.load(ModelSettings(model=str(palette_dir)))
    assert engine.family is PaletteFamily
    result = segment(str(path), {"prompt": "the red boxes"}, engine)
    assert iou(result.mask > 0, expected_mask("red")) > 0.9
    assert result.instances is not None and len(result.instances) == 2
    record = result.record()
    assert record["status"] == "ok" and (record["width"], record["height"]) == (128, 96)
    subtracted = segment(image, {"prompt": "red", "negative_prompt": "red"}, engine)
    assert subtracted.empty
    # A loaded model of the family works too (the engine wraps it).
    again = segment(image, {"prompt": "green"}, engine.model)
    assert iou(again.mask > 0, expected_mask("green")) > 0.9


def test_the_engine_isolates_and_refuses_what_the_family_lacks(
    palette_dir: Path, scene: tuple[Path, np.ndarray]
) -> None:
    _, image = scene
    engine = InferenceEngine.load(ModelSettings(model=str(palette_dir)))
    prepared = engine.prepare(image)
    items = [
        (0, parse_request({"prompt": "blue"})),
        (0, parse_request({"prompt": "please fail"})),
        (1, parse_request({"prompt": "green", "use_grounding_dino": True})),
        (1, parse_request({"prompt": "green"})),
    ]
    results = engine.infer([prepared, prepared], items, [image, image])
    assert isinstance(results[0], RawMasks) and iou(results[0].mask, expected_mask("blue")) > 0.9
    assert isinstance(results[1], RequestFailed) and "asked to fail" in str(results[1])
    assert isinstance(results[2], RequestFailed) and "takes no box prompts" in str(results[2])
    assert isinstance(results[3], RawMasks) and iou(results[3].mask, expected_mask("green")) > 0.9


def test_the_whole_job_runs_the_family(ray_session, palette_dir: Path, scene, tmp_path: Path) -> None:
    import pyarrow as pa

    from evf.pipelines.config import DEFAULT_CONFIG, load_config
    from evf.pipelines.job import run_job
    from evf.pipelines.metadata import read_metadata

    path, _ = scene
    prompts = ["red", "green", "blue", "purple", "please fail"]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"image_url": [str(path)] * len(prompts), "prompt": prompts}), manifest)
    config = load_config(
        DEFAULT_CONFIG,
        {
            "manifest": str(manifest),
            "output": str(tmp_path / "out"),
            "model": str(palette_dir),
            "progress": False,
        },
    )
    # The family travels to Ray's workers inside the driver's CheckpointInfo. A family in an installed
    # module travels by reference; this test module is not importable there, so it travels by value.
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        summary = run_job(config)
    finally:
        ray_session.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (summary.ok, summary.empty, summary.error) == (3, 1, 1)
    rows = {r["prompt"]: r for r in read_metadata(str(tmp_path / "out")).to_pylist()}
    for colour in ("red", "green", "blue"):
        mask = np.array(Image.open(rows[colour]["mask_url"])) > 127
        assert iou(mask, expected_mask(colour)) > 0.9
        assert len(rows[colour]["instances"]) == len(RECTS[colour])
    assert rows["purple"]["status"] == "empty" and rows["purple"]["instances"] == []
    assert "asked to fail" in rows["please fail"]["error"]
    record = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert record["model"]["family"] == "palette-test"
