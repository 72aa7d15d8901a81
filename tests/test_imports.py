"""Light imports: ``import evf``, requests, the checkpoint resolver and ``evf --help`` load no torch.

Each check runs in a fresh interpreter (this test process has long imported torch) and lists the
heavy packages it finds in ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from evf.cli import SUBCOMMANDS

HEAVY = ("torch", "sam2", "hydra", "ray")
EVF = Path(sys.executable).parent / "evf"  # the console script installed in this environment
_REPORT_HEAVY = """
import json, sys
heavy = sorted({{m for m in sys.modules if m.split(".")[0] in {heavy!r}}})
print(json.dumps(heavy[:10]))
"""


def heavy_modules(code: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """Run ``code`` in a fresh interpreter; the ``heavy`` modules (first 10) it has imported."""
    report = _REPORT_HEAVY.format(heavy=heavy)
    done = subprocess.run([sys.executable, "-c", code + report], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_library_and_requests_load_no_torch() -> None:
    code = """
import evf, evf.cli, evf.request
from evf import InvalidRequestError, SegmentRequest, parse_request
request = evf.request.parse_request({"prompt": "the cat", "image_url": "a.png"})
assert isinstance(request, SegmentRequest) and request.prompt == "the cat", request
try:
    parse_request({"prompt": "the cat", "image_url": "a.png", "blur_mask": 2})
except InvalidRequestError as error:
    assert "blur_mask" in str(error), error
else:
    raise AssertionError("blur_mask=2 was accepted")
assert "segment" in evf.__all__ and "EvfSam2Predictor" in dir(evf)
"""
    assert heavy_modules(code) == []


def test_checkpoint_resolver_loads_no_torch() -> None:
    code = """
from evf.checkpoints import DEMO_MODEL_DIR, DEMO_MODEL_ID, check_weights, resolve_checkpoint
assert resolve_checkpoint(DEMO_MODEL_ID) == DEMO_MODEL_DIR  # checks the safetensors header too
check_weights(DEMO_MODEL_DIR)
"""
    assert heavy_modules(code) == []


def test_grounding_loads_no_sam2() -> None:
    """The detector resolves its checkpoint with evf.checkpoints, not through the EVF model."""
    assert heavy_modules("import evf.grounding", heavy=("sam2", "hydra")) == []


def test_lazy_names_are_the_eager_ones() -> None:
    """``evf.segment`` stays the function even once the submodule ``evf.segment`` is imported."""
    import evf
    import evf.segment
    from evf import segment

    assert callable(segment) and evf.segment is segment is sys.modules["evf.segment"].segment
    assert evf.EvfSam2Predictor is sys.modules["evf.predictor"].EvfSam2Predictor


def test_subcommand_help_loads_no_torch() -> None:
    for subcommand in ("run", "segment"):
        code = f"""
from evf.cli import main
try:
    main([{subcommand!r}, "--help"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
"""
        assert heavy_modules(code) == [], subcommand


def test_evf_help_is_fast() -> None:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        done = subprocess.run([str(EVF), "--help"], capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - start)
        assert done.returncode == 0, done.stderr[-2000:]
    assert all(name in done.stdout for name in SUBCOMMANDS), done.stdout
    assert min(times) < 1.0, f"evf --help took {min(times):.2f} s at best (runs: {times})"
