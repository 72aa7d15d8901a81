"""Render docs/images/review.png: the review page of the demo job on the shipped sample manifest.

Runs the job (configs/local.yaml, into a temporary folder), writes its review page with the sample's
ground truth, and screenshots the top of the page in Debian's headless chromium via Playwright.

.venv/bin/python scripts/make_review_screenshot.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from evf.pipelines.config import load_config
from evf.pipelines.job import run_job
from evf.pipelines.review import write_review

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "images" / "review.png"
MANIFEST = REPO / "examples" / "sample" / "manifest.parquet"


def main() -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)  # the page shows the output as given: "outputs/sample", as after `make demo`
        output = "outputs/sample"
        config = {"manifest": str(MANIFEST), "output": output, "progress": False}
        run_job(load_config(REPO / "configs" / "local.yaml", config))
        page_path = write_review(output, manifest=str(MANIFEST))
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(Path(page_path).resolve().as_uri())
            page.wait_for_function("[...document.querySelectorAll('img.thumb')].every(i => i.complete)")
            page.screenshot(path=str(OUT))
            browser.close()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
