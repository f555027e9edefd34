"""The offline HTML reports: autoescaped Jinja2 templates, the scan page reviewer-first, sortable and
filterable in a real headless Chromium, and the evaluation page with its tables and plot."""

from __future__ import annotations

import io
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from moderation.events import Action, ImageInfo, Label, ModelInfo, Timings
from moderation.offline.evaluate import build_report
from moderation.offline.report import ScanPage, evaluation_html, reviewer_order
from moderation.offline.results import Prediction, Sample, ScanError, ScanResult, ScanSummary

MODEL = ModelInfo(name="fakevlm <test>", version="1")
HOSTILE = "uploads/<script>alert(1)</script>.jpg"


def result(
    path: str, score: float, action: Action, label: Label | None = None, explanation: str | None = None
) -> ScanResult:
    return ScanResult(
        path=path,
        image_sha256="0" * 64,
        label=label or ("fake" if score >= 0.5 else "real"),
        score=score,
        action=action,
        explanation=explanation,
        model=MODEL,
        image=ImageInfo(width=32, height=24, format="JPEG"),
        timings=Timings(fetch_ms=1.0, decode_ms=1.0, inference_ms=1.0, total_ms=3.0),
        decided_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def jpeg(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(buffer, format="JPEG")
    return buffer.getvalue()


# File order (as a scan walks them) differs from reviewer order on purpose.
RESULTS = [
    result("a/allow-low.jpg", 0.05, "allow"),
    result("b/flag-high.jpg", 0.97, "flag", explanation="This is a fake image: <b>smeared</b> text."),
    result("c/allow-mid.jpg", 0.20, "allow"),
    result("d/review.jpg", 0.60, "review", explanation="This is a fake image: odd hands."),
    result("e/flag-top.jpg", 0.99, "flag", explanation="This is a fake image: warped clock."),
    result(HOSTILE, 0.30, "allow"),
]
REVIEWER_ORDER = ["e/flag-top.jpg", "b/flag-high.jpg", "d/review.jpg", HOSTILE, "c/allow-mid.jpg", "a/allow-low.jpg"]
ERROR = ScanError(path="uploads/x<i>.png", error="invalid_image", detail="cannot identify <img src=x onerror=alert(2)>")


def summary_of(page: ScanPage) -> ScanSummary:
    return ScanSummary(
        files=len(page.results) + len(page.errors),
        images=len(page.results),
        errors=len(page.errors),
        labels=Counter(r.label for r in page.results),
        actions=Counter(r.action for r in page.results),
        reasons=Counter(e.error for e in page.errors),
        elapsed_s=2.0,
    )


def scan_page(other_thumbnails: int = 100) -> ScanPage:
    page = ScanPage(MODEL, started="2026-01-01T00:00:00+00:00", other_thumbnails=other_thumbnails)
    for index, record in enumerate(RESULTS):
        page.add_result(record, jpeg(40 * index))
    page.add_error(ERROR)
    return page


def rendered(other_thumbnails: int = 100) -> str:
    page = scan_page(other_thumbnails)
    return page.render(summary_of(page))


def row_paths(html: str) -> list[str]:
    return [
        m.replace("&lt;", "<").replace("&gt;", ">")
        for m in re.findall(r'<tr class="\w+" [^>]*data-path="([^"]*)"', html)
    ]


def test_file_names_explanations_and_details_are_escaped() -> None:
    html = rendered()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in html
    assert "<script>alert" not in html and "alert(1)</script>" not in html
    assert "&lt;b&gt;smeared&lt;/b&gt;" in html and "<b>smeared" not in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html and "<img src=x" not in html
    assert "x&lt;i&gt;.png" in html and "fakevlm &lt;test&gt; 1" in html
    assert html.count("<script>") == 1  # ours, the sorting and filtering


def test_summary_first_then_flag_and_review_by_score_then_the_rest() -> None:
    html = rendered()
    assert html.index('id="summary"') < html.index('id="results"') < html.index('id="errors"')
    assert "7 files: 6 images scored" in html
    assert "3 to review" in html
    assert row_paths(html) == REVIEWER_ORDER
    assert [RESULTS[i].path for i in reviewer_order(RESULTS)] == REVIEWER_ORDER


def test_sort_and_filter_controls_are_in_the_page_and_it_is_self_contained() -> None:
    html = rendered()
    for key in ("path", "label", "score", "action"):
        assert f'<th data-key="{key}"' in html
    assert '<select id="filter-label">' in html and "<option>fake</option><option>real</option>" in html
    assert '<select id="filter-action">' in html and "<option>flag</option><option>review</option>" in html
    assert '<input type="search" id="filter-path"' in html
    assert '<form id="controls" hidden>' in html  # shown by the script: without it, nothing dead on the page
    assert "<script src" not in html and "<link" not in html and "http://" not in html and "https://" not in html


def test_thumbnails_for_every_item_to_review_and_the_highest_others_only() -> None:
    page = scan_page(other_thumbnails=2)
    rows = {row.result.path: row.thumbnail for row in page.rows()}
    with_thumbnail = [path for path in REVIEWER_ORDER if rows[path] is not None]
    assert with_thumbnail == REVIEWER_ORDER[:5]  # the 3 to review, then the 2 highest-scoring others
    html = page.render(summary_of(page))
    assert len(re.findall(r'<img alt="" loading="lazy" src="data:image/jpeg;base64,[^"]+">', html)) == 5
    assert "the 2 highest-scoring others" in html


def test_evaluation_page_carries_its_tables_and_plot() -> None:
    def predicted(label: Label, truth: Label, score: float) -> Prediction:
        sample = Sample(image="x.png", label=truth, cate="<animal>", reference="This is a fake image.")
        return Prediction(sample, label, score, "This is a <i>fake</i> image.", "fake")

    predictions = [predicted("fake", "fake", 0.9), predicted("fake", "real", 0.8), predicted("real", "real", 0.1)]
    report = build_report(
        predictions,
        data="sets/<odd>.json",
        images="images",
        model=MODEL,
        embedder=lambda texts: np.ones((len(texts), 4)),
        embedding_model="constant",
    )
    html = evaluation_html(report)
    assert html.startswith("<!doctype html>") and "<title>FakeVLM evaluation: &lt;odd&gt;.json</title>" in html
    assert html.count("<svg") == 1 and "</svg>" in html and "&lt;svg" not in html and "&lt;polyline" not in html
    assert "<td>overall</td>" in html and "<td>category: &lt;animal&gt;</td>" in html
    assert "ROC-AUC of P(fake) (fake positive, 3 images): 1.0000." in html
    assert "<code>MODERATION_REVIEW_THRESHOLD=0.9000</code>" in html
    assert html.index('id="detection"') < html.index('id="explanations"') < html.index('id="thresholds"')
    assert "<td>DMimage</td><td>real</td>" in html and "fakevlm &lt;test&gt; 1" in html


# --- In a real browser: Debian's chromium + chromium-driver, driven by selenium. -----------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _driver(javascript: bool = True) -> Any:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no chromium/chromedriver here (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture
def page_file(tmp_path: Path) -> Path:
    path = tmp_path / "report.html"
    path.write_text(rendered(), encoding="utf-8")
    return path


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = _driver()
    yield driver
    driver.quit()


def visible_paths(driver: Any) -> list[str]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")
    return [row.get_attribute("data-path") for row in rows if row.is_displayed()]


@pytest.mark.slow
def test_in_chromium_headers_sort_and_selects_filter(browser: Any, page_file: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser
    driver.get(page_file.as_uri())
    assert visible_paths(driver) == REVIEWER_ORDER
    assert driver.find_element(By.ID, "controls").is_displayed()
    assert driver.find_element(By.ID, "shown").text == "6 of 6 shown"

    def click(key: str) -> None:
        driver.find_element(By.CSS_SELECTOR, f'th[data-key="{key}"] button').click()

    click("path")
    assert visible_paths(driver) == sorted(REVIEWER_ORDER)
    click("path")
    assert visible_paths(driver) == sorted(REVIEWER_ORDER, reverse=True)
    header = driver.find_element(By.CSS_SELECTOR, 'th[data-key="path"]')
    assert header.get_attribute("aria-sort") == "descending"
    click("score")  # highest first on the first click
    by_score = sorted(RESULTS, key=lambda r: -r.score)
    assert visible_paths(driver) == [r.path for r in by_score]
    click("score")
    assert visible_paths(driver) == [r.path for r in reversed(by_score)]
    click("action")  # flag, review, allow; reviewer order within each
    assert visible_paths(driver) == REVIEWER_ORDER

    Select(driver.find_element(By.ID, "filter-action")).select_by_visible_text("allow")
    assert visible_paths(driver) == REVIEWER_ORDER[3:]
    Select(driver.find_element(By.ID, "filter-action")).select_by_visible_text("all")
    Select(driver.find_element(By.ID, "filter-label")).select_by_visible_text("fake")
    assert visible_paths(driver) == REVIEWER_ORDER[:3]
    driver.find_element(By.ID, "filter-path").send_keys("REVIEW")
    assert visible_paths(driver) == ["d/review.jpg"]
    assert driver.find_element(By.ID, "shown").text == "1 of 6 shown"


@pytest.mark.slow
def test_in_chromium_without_javascript_the_page_stays_reviewer_first(page_file: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = _driver(javascript=False)
    try:
        driver.get(page_file.as_uri())
        assert visible_paths(driver) == REVIEWER_ORDER
        assert not driver.find_element(By.ID, "controls").is_displayed()
        assert driver.find_element(By.ID, "shown").get_attribute("textContent") == ""  # the script did not run
        summary = driver.find_element(By.ID, "summary")
        assert "3 to review" in summary.text
    finally:
        driver.quit()
