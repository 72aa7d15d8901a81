"""``torch.compile`` (inductor, CPU): the compiled predictor gives the eager masks, compiles during
``from_pretrained`` (not on the first real batch), and leaves its graphs in the on-disk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo.utils import counters

from evf import EvfSam2Predictor
from evf.model.hardware import compile_cache_dir

FIXTURE = Path(__file__).parent / "fixtures" / "evf-sam2-tiny"
IMAGES = ("shapes_320x240.png", "portrait_97x173.png")
PROMPTS = (["the red car on the left", "the blue circle at the top"], ["sky"])


def test_compiled_predictor_matches_eager_without_compiling_on_real_batches() -> None:
    images = [np.asarray(Image.open(FIXTURE / "images" / name).convert("RGB")) for name in IMAGES]
    counters.clear()
    compiled = EvfSam2Predictor.from_pretrained(FIXTURE / "checkpoint", compile=True)
    model = compiled.model
    assert isinstance(model.visual_model.image_encoder, OptimizedModule)
    assert isinstance(model.mm_extractor["beit3"], OptimizedModule)
    # Every graph went through inductor's FX graph cache, which lives under the evf cache dir.
    assert counters["inductor"]["fxgraph_cache_hit"] + counters["inductor"]["fxgraph_cache_miss"] >= 2
    assert any((compile_cache_dir() / "fxgraph").rglob("*"))

    eager = EvfSam2Predictor.from_pretrained(FIXTURE / "checkpoint")
    # Shapes the warm-up covered (one image per call, one or two prompts, any text length): a
    # recompilation here would be a compile on the timed path, so it is an error.
    cases = list(zip(images, PROMPTS, strict=True))
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = [compiled.predict_batch([image], [prompts])[0] for image, prompts in cases]
    want = [eager.predict_batch([image], [prompts])[0] for image, prompts in cases]
    for got_image, want_image in zip(got, want, strict=True):
        for g, w in zip(got_image, want_image, strict=True):
            np.testing.assert_allclose(g.mask_logits, w.mask_logits, atol=2e-3, rtol=0)
            assert abs(g.score - w.score) < 1e-3
            # Masks may differ only where the eager logit is within float noise of the threshold.
            assert np.all((g.mask == w.mask) | (np.abs(w.mask_logits) < 2e-3))
