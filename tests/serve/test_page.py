"""The page in a real browser (Debian's chromium under Playwright, headless): upload an image through the file input,
read the result grid, open "why?" (the match overlay) and "more like this"; a screenshot goes to the test's temp folder
(and to $CBIR_PAGE_SCREENSHOT when set)."""

import os
import shutil

from serve.support import query_bytes


def test_upload_through_the_page(live_server, browser, tmp_path):
    q = tmp_path / "query.jpg"
    q.write_bytes(query_bytes(2))
    page = browser.new_page(viewport={"width": 1200, "height": 900})  # with the page's own CSP: waits are functions, never eval
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(live_server.url + "/", timeout=30_000)
        page.wait_for_function("() => document.getElementById('summary').textContent.includes('12 images')", timeout=30_000)
        page.fill("#topk", "5")
        page.set_input_files("#file", str(q))
        page.wait_for_selector("#results .result", timeout=30_000)
        cards = page.locator("#results .result")
        assert cards.count() == 5
        labels = [cards.nth(i).locator(".label").inner_text() for i in range(5)]
        assert labels[:3] == ["group2"] * 3, labels
        scores = [float(cards.nth(i).locator(".score").inner_text()) for i in range(5)]
        assert scores == sorted(scores, reverse=True)
        assert page.locator("#query-caption").inner_text() == "query.jpg"
        assert "results in" in page.locator("#status").inner_text()
        # every thumbnail of the grid loaded (served by /thumbs/NAME)
        page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)",
                               timeout=30_000)
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("CBIR_PAGE_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["CBIR_PAGE_SCREENSHOT"])

        # "why?": the match overlay of the query and the first result
        first = cards.nth(0).get_attribute("data-name")
        cards.nth(0).locator("button.why").click()
        page.wait_for_function("() => document.getElementById('match-img').src.startsWith('data:image/png')", timeout=30_000)
        assert "inliers" in page.locator("#match-text").inner_text()
        page.screenshot(path=str(tmp_path / "match.png"))
        page.locator("#match .close").click()

        # "more like this": the first result becomes the query; it is not among its own results
        cards.nth(0).locator("button.more").click()
        page.wait_for_function(f"() => document.getElementById('query-caption').textContent.startsWith({first!r})", timeout=30_000)
        page.wait_for_function(f"() => ![...document.querySelectorAll('#results .result')].some(c => c.dataset.name === {first!r})"
                               " && document.querySelectorAll('#results .result').length === 5", timeout=30_000)
        assert page.locator("#results .result .label").first.inner_text() == "group2"

        # a bad upload shows the service's message
        bad = tmp_path / "notes.jpg"
        bad.write_bytes(b"not an image at all")
        page.set_input_files("#file", str(bad))
        page.wait_for_selector("#error:not([hidden])", timeout=30_000)
        assert "not an image" in page.locator("#error").inner_text()
    finally:
        page.close()
    assert not errors, errors


def test_docs_render_offline(live_server, browser):
    """/docs is Swagger UI from the fastapi-offline wheel, served by the app: it renders with no network."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("fastapi_offline") is None:
        pytest.skip("fastapi-offline is not installed: /docs would load Swagger UI from its CDN")
    page = browser.new_page()
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(live_server.url) and not r.url.startswith("data:") else None)
    try:
        page.goto(live_server.url + "/docs", timeout=30_000)
        page.wait_for_selector(".swagger-ui .opblock-summary-path", timeout=30_000)
        paths = page.locator(".opblock-summary-path").all_inner_texts()
    finally:
        page.close()
    assert any(p.replace("\u200b", "") == "/search" for p in paths), paths
    assert not outside, outside


def test_duplicates_view_of_the_page(live_server, browser, monkeypatch, tmp_path):
    """The page's duplicates view draws one row per group of GET /duplicates, the image to keep first; an index without
    a measured threshold shows the service's message instead."""
    import json
    import urllib.request

    import cbir.duplicates

    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(live_server.url + "/", timeout=30_000)
        page.wait_for_function("() => document.getElementById('summary').textContent.includes('12 images')", timeout=30_000)
        page.click("#dups-button")  # colour has no measured threshold: the 400's message is shown
        page.wait_for_selector("#error:not([hidden])", timeout=60_000)
        assert "--threshold" in page.locator("#error").inner_text()

        monkeypatch.setitem(cbir.duplicates.CANDIDATE_THRESHOLDS, "colour", 0.9)  # the page asks for verified groups
        with urllib.request.urlopen(live_server.url + "/duplicates?limit=20", timeout=120) as r:
            want = json.load(r)
        assert want["n_groups"] >= 1
        page.click("#dups-button")
        page.wait_for_function("() => document.querySelectorAll('#dups-groups .dup-group').length > 0", timeout=120_000)
        rows = page.locator("#dups-groups .dup-group")
        assert rows.count() == len(want["groups"])
        for i, g in enumerate(want["groups"]):
            first = rows.nth(i).locator("figure").first
            assert "keep" in (first.get_attribute("class") or "") and first.locator("img").get_attribute("alt") == g["keep"]
            assert rows.nth(i).locator("figure").count() == len(g["images"])
        assert f"{want['n_groups']} groups" in page.locator("#dups-status").inner_text()
        page.wait_for_function("() => [...document.querySelectorAll('#dups-groups img')].every(i => i.complete && i.naturalWidth > 0)",
                               timeout=30_000)
        page.screenshot(path=str(tmp_path / "duplicates.png"), full_page=True)
        if os.environ.get("CBIR_PAGE_SCREENSHOT_DUPS"):
            shutil.copyfile(tmp_path / "duplicates.png", os.environ["CBIR_PAGE_SCREENSHOT_DUPS"])
        assert not errors, errors
    finally:
        page.close()


def test_the_empty_page_shows_a_sample_of_the_gallery_and_no_broken_image(live_server, browser):
    """Before any query: no query image (broken or not) is shown, a sample of the gallery is, every thumbnail loads;
    clicking one searches "more like this" with it."""
    import json
    import urllib.request

    with urllib.request.urlopen(live_server.url + "/sample?n=24", timeout=60) as r:
        want = json.load(r)
    assert want["count"] == 12 and len(want["images"]) == 12  # a gallery smaller than the sample: all of it
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(live_server.url + "/", timeout=30_000)
        page.wait_for_selector("#sample-grid figure", timeout=30_000)
        assert not page.locator("#query-img").is_visible() and not page.locator("#query-panel").is_visible()
        picks = page.locator("#sample-grid figure")
        assert picks.count() == len(want["images"])
        assert [picks.nth(i).get_attribute("data-name") for i in range(picks.count())] == [x["name"] for x in want["images"]]
        # every image shown on the page has loaded (none broken): the visible ones are the sample's thumbnails
        page.wait_for_function("() => [...document.querySelectorAll('img')].filter(i => i.offsetParent !== null)"
                               ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
        assert page.locator("img:visible").count() == len(want["images"])
        assert "click one" in page.locator("#sample-caption").inner_text()

        name = picks.nth(4).get_attribute("data-name")
        picks.nth(4).locator("img").click()
        page.wait_for_function(f"() => document.getElementById('query-caption').textContent.startsWith({name!r})", timeout=30_000)
        page.wait_for_selector("#results .result", timeout=30_000)
        assert not page.locator("#sample").is_visible()
        page.wait_for_function("() => { const q = document.getElementById('query-img'); return q.complete && q.naturalWidth > 0; }",
                               timeout=30_000)
        label = next(x["label"] for x in want["images"] if x["name"] == name)
        names = page.locator("#results .result").evaluate_all("cs => cs.map(c => c.dataset.name)")
        assert name not in names and page.locator("#results .result .label").first.inner_text() == label
    finally:
        page.close()
    assert not errors, errors
