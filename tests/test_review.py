"""The review page of a real finished job (``conftest.finished_job``), opened from disk in headless
Chromium (Debian's ``chromium``, driven by Playwright's Python package; no browser download).

Expected counts come from the job's metadata and from the image files themselves, never from the
page's own data file.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright

from evf.errors import error_kind
from evf.overlay import MASK_FILL_RGB
from evf.pipelines.commit import OutputLayout, write_metadata
from evf.pipelines.metadata import read_metadata
from evf.pipelines.review import GROUND_TRUTH_RGB, PAGE_SIZE, thumbnail, write_review

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is not installed (scripts/ci-deps.sh installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser: Browser, path: str) -> Page:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(Path(path).as_uri())
    page.wait_for_selector("#rows .card")
    assert not errors, errors
    return page


def shown(page: Page) -> int:
    return int(page.inner_text("#shown-count"))


def card_statuses(page: Page) -> Counter[str]:
    return Counter(page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.status)"))


def readable(url: str) -> bool:
    try:
        with Image.open(url) as image:
            image.load()
        return True
    except Exception:
        return False


def test_review_page_of_a_finished_job(finished_job, browser, tmp_path):
    rows = read_metadata(str(finished_job.output)).to_pylist()
    statuses = Counter(row["status"] for row in rows)
    assert statuses["ok"] and statuses["empty"] and statuses["error"], statuses
    page_path = write_review(
        str(finished_job.output),
        manifest=str(finished_job.manifest),
        page=str(tmp_path / "review.html"),
        threads=4,
    )
    assert page_path == str(tmp_path / "review.html")
    page = open_page(browser, page_path)

    assert shown(page) == len(rows) == int(page.inner_text("#total-count"))
    assert card_statuses(page) == statuses
    words = page.inner_text("#status-counts").split()
    assert dict(zip(words[::2], map(int, words[1::2]), strict=True)) == statuses
    kinds_text = page.inner_text("#error-kinds")
    assert "image read failed: ImageReadError" in kinds_text and "invalid request" in kinds_text
    assert page.eval_on_selector_all("#histogram rect", "bars => bars.length") == 20

    # Every row whose image can be read has a thumbnail, and every thumbnail loads.
    expected_thumbs = sum(readable(row["image_url"]) for row in rows)
    assert expected_thumbs == len(rows) - 2  # the missing image and the text file
    images = page.locator("img.thumb")
    assert images.count() == expected_thumbs
    for index in range(images.count()):
        images.nth(index).scroll_into_view_if_needed()
    page.wait_for_function("[...document.querySelectorAll('img.thumb')].every(i => i.complete)")
    widths = page.eval_on_selector_all("img.thumb", "imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) == expected_thumbs and min(widths) > 0
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
    assert (tmp_path / "review.png").stat().st_size > 10_000

    # The status filter hides exactly the error rows, and shows them again.
    page.uncheck(".status-box[value=error]")
    assert shown(page) == len(rows) - statuses["error"]
    assert "error" not in card_statuses(page)
    page.check(".status-box[value=error]")
    assert shown(page) == len(rows) and card_statuses(page)["error"] == statuses["error"]

    # Score range and prompt text.
    page.fill("#score-min", "0.5")
    assert shown(page) == sum(row["score"] is not None and row["score"] >= 0.5 for row in rows)
    page.fill("#score-min", "0")
    page.fill("#prompt-filter", "cross")
    assert shown(page) == sum("cross" in (row["prompt"] or "") for row in rows) > 0
    page.fill("#prompt-filter", "")

    # Sorting by score: the best row first, rows without a score last.
    page.select_option("#sort", "score-desc")
    ids = page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.id)")
    scored = sorted((r for r in rows if r["score"] is not None), key=lambda r: -r["score"])
    assert ids[0] == scored[0]["id"] and ids[-1] in {r["id"] for r in rows if r["score"] is None}
    page.close()


def test_review_page_pages_through_100000_rows(browser, tmp_path):
    """A job-sized output (written in the job's own metadata layout) renders one page of rows."""
    output = tmp_path / "big"
    rng = np.random.default_rng(0)
    statuses = rng.choice(["ok", "empty", "error"], size=100_000, p=[0.8, 0.1, 0.1])
    rows = [
        {
            "id": f"row-{i:06d}",
            "key": f"{i:032x}",
            "prompt": f"object {i % 97}",
            "status": status,
            "error": "image read failed: ImageReadError: gone" if status == "error" else None,
            "score": None if status == "error" else float(rng.uniform()),
            "area": None if status == "error" else int(rng.integers(0, 5000)),
            "manifest_file": "m.parquet",
            "manifest_row": i,
        }
        for i, status in enumerate(statuses)
    ]
    for start in range(0, len(rows), 25_000):
        write_metadata(OutputLayout(str(output)), rows[start : start + 25_000], None)
    page = open_page(browser, write_review(str(output)))
    assert shown(page) == 100_000
    assert page.locator(".card").count() == PAGE_SIZE
    page.click("#next")
    assert page.inner_text("#first-shown") == str(PAGE_SIZE + 1)
    assert page.locator(".card").first.get_attribute("data-id") == f"row-{PAGE_SIZE:06d}"
    page.uncheck(".status-box[value=ok]")
    assert shown(page) == int((statuses != "ok").sum())
    assert page.locator(".card").count() == PAGE_SIZE
    page.close()


def test_thumbnail_draws_the_mask_and_the_ground_truth():
    image = np.full((400, 600, 3), 128, np.uint8)
    mask = np.zeros((400, 600), bool)
    mask[100:300, 100:300] = True
    truth = np.zeros((400, 600), bool)
    truth[120:320, 350:550] = True
    thumb = thumbnail(image, mask, truth, size=300)
    assert thumb.shape == (200, 300, 3)
    inside = thumb[100, 100].astype(int)  # the mask's centre, scaled by 1/2
    expected = 0.55 * 128 + 0.45 * np.array(MASK_FILL_RGB)
    assert np.abs(inside - expected).max() <= 2
    assert (thumb[20, 20] == 128).all(), "outside both masks the image is unchanged"
    edge = thumb[60:160, 175]  # the ground truth's left edge (x = 350 / 2)
    assert any((pixel == GROUND_TRUTH_RGB).all() for pixel in edge)
    assert not any((pixel == GROUND_TRUTH_RGB).all() for pixel in thumb[:, :150].reshape(-1, 3))


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (
            "image read failed: ImageReadError: cannot read 'x.png': file not found",
            "image read failed: ImageReadError",
        ),
        ("invalid request: blur_mask=-4: must be 0 (off) or an odd integer", "invalid request"),
        ("model gave no mask for this row", "model gave no mask for this row"),
    ],
)
def test_error_kind(message: str, kind: str) -> None:
    assert error_kind(message) == kind


def test_review_page_written_to_object_storage(finished_job, s3_bucket):
    """An output in S3 (moto): the page, its rows and thumbnails are written beside it."""
    import json

    import fsspec

    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    fs.put(str(finished_job.output / "metadata"), f"{bucket}/job/metadata", recursive=True)
    page = write_review(f"s3://{bucket}/job", storage_options=options, threads=2)
    assert page == f"s3://{bucket}/job/review.html"
    assert b'src="review_files/rows.js"' in fs.cat_file(f"{bucket}/job/review.html")
    script = fs.cat_file(f"{bucket}/job/review_files/rows.js").decode()
    data = json.loads(script.removeprefix("window.EVF_REVIEW = ").rstrip().rstrip(";"))
    thumbs = {row[data["columns"].index("thumb")] for row in data["rows"]} - {None}
    rows = read_metadata(str(finished_job.output)).to_pylist()
    assert len(thumbs) == sum(readable(row["image_url"]) for row in rows)
    for name in thumbs:
        with Image.open(fs.open(f"{bucket}/job/review_files/{name}")) as thumb:
            assert thumb.format == "JPEG" and min(thumb.size) > 0
