"""Render docs/images/demo.png: held-out synthetic scenes, prompts and the demo model's masks.

.venv/bin/python scripts/make_demo_figure.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from evf import EvfSam2Predictor, segment  # noqa: E402
from evf.overlay import overlay  # noqa: E402
from evf.synthetic import generate_scene  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "images" / "demo.png"
SEED = 9999  # never used in training


def main() -> None:
    predictor = EvfSam2Predictor.from_pretrained()
    scenes = [generate_scene(SEED, i) for i in range(3)]
    fig, axes = plt.subplots(len(scenes), 3, figsize=(10, 3.4 * len(scenes)))
    for row, scene in zip(axes, scenes, strict=True):
        expression = scene.expressions[0]
        request = {"prompt": expression.prompt, "semantic_type": expression.semantic}
        if expression.negative_prompt:
            request["negative_prompt"] = expression.negative_prompt
        result = segment(scene.image, request, predictor)
        row[0].imshow(scene.image)
        row[0].set_title("input")
        row[1].imshow(overlay(scene.image, result.mask))
        title = ("[semantic] " if expression.semantic else "") + expression.prompt
        if expression.negative_prompt:
            title += f"\nnot: {expression.negative_prompt}"
        row[1].set_title(title, fontsize=9)
        row[2].imshow(overlay(scene.image, expression.mask))
        row[2].set_title("ground truth")
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=80)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
