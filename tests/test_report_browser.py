"""report.html in a real browser: headless Chromium (Debian's package; `.ci/run`
installs it where missing) opens it offline, with no console errors, and every
figure renders: decoded, and not blank."""
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# For each <img>: its natural size, and how many distinct colours a downscaled copy has (blank: 1).
INSPECT = """() => Array.from(document.images).map(img => {
  const c = document.createElement('canvas'); c.width = 64; c.height = 64;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0, 64, 64);
  const px = g.getImageData(0, 0, 64, 64).data; const seen = new Set();
  for (let i = 0; i < px.length; i += 4) seen.add(px[i] + ',' + px[i + 1] + ',' + px[i + 2]);
  return {w: img.naturalWidth, h: img.naturalHeight, colours: seen.size, complete: img.complete};
})"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium; .ci/run installs it)")
def test_report_html_opens_offline_without_errors_and_every_figure_renders(quick_run):
    sync_api = pytest.importorskip("playwright.sync_api")
    out, _ = quick_run
    page_path = out / "report.html"
    text = page_path.read_text()
    assert "http://" not in text and "https://" not in text             # nothing fetched from elsewhere
    errors, requests = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate(INSPECT)
        tables = page.evaluate("() => document.querySelectorAll('table tr').length")
        # no table scrolls sideways at 1,280 pixels (issue 22): a wide one is split
        wide = page.evaluate("() => Array.from(document.querySelectorAll('table'))"
                             ".filter(t => t.scrollWidth > t.clientWidth + 1).map(t => t.rows[0].innerText)")
        links = page.evaluate("() => Array.from(document.querySelectorAll('figcaption a')).map(a => a.getAttribute('href'))")
        browser.close()
    assert errors == [] and wide == [], wide
    assert all(url.startswith(("file://", "data:")) for url in requests), requests
    names = ["truth", "comparison", "training", "mfg", "mog-prior", "mog-posterior", "mog-both"]
    assert len(images) == len(names)
    assert all(i["complete"] and i["w"] > 300 and i["h"] > 200 and i["colours"] > 10 for i in images), images
    assert tables > 4
    assert sorted(links) == sorted(f"figures/{n}.csv" for n in names)
    assert all((out / link).exists() for link in links)
