"""Look at the built site in a real browser (headless Chromium), as a reader would, at phone to desktop widths.

    python3 dev.py nox -s docs_browser        # builds the site, then runs this
    python tools/docs/browser_check.py site   # needs playwright and a Chromium (Debian: apt-get install chromium)

The site is served on a loopback port under its published sub-path (site_url's path, /volley/), so relative
links and the 404 page are exercised as on the real host. Checked, on every page of the sitemap:

- from 960 pixels up (a tablet held sideways, every desktop), no code block is wider than its column;
- at every width, no code in a table breaks inside a word and the page never scrolls sideways;
- every image loads (the diagrams drawn at build time included);
- the search finds a word, and the 404 page served at a deep path loads its style sheet.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_site import load_config

WIDTHS = (390, 768, 960, 1024, 1220, 1280, 1440, 1920)
DESKTOP = 960  # from here on, code blocks must fit their column

MEASURE = """() => {
  const cut = [...document.querySelectorAll('pre > code')].filter(c => c.scrollWidth > c.clientWidth + 1)
    .map(c => Math.max(...c.innerText.split('\\n').map(l => l.length)));
  const broken = [...document.querySelectorAll('td code, th code')].filter(c =>
    c.getClientRects().length > c.innerText.split(/\\s+/).filter(Boolean).length).map(c => c.innerText);
  const images = [...document.querySelectorAll('img')].filter(i => !i.complete || i.naturalWidth === 0)
    .map(i => i.getAttribute('src'));
  return {cut, broken, images, overflow: document.documentElement.scrollWidth > window.innerWidth};
}"""


class NotFoundPageHandler(http.server.SimpleHTTPRequestHandler):
    """Like GitHub Pages: a path that names nothing gets the site's 404.html, whatever its depth."""

    def __init__(self, site: Path, *args: object, **kwargs: object) -> None:
        self.site = site
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if code != 404:
            super().send_error(code, message, explain)
            return
        body = (self.site / "404.html").read_bytes()
        self.send_response(404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(site: Path, base_path: str) -> tuple[http.server.ThreadingHTTPServer, str, tempfile.TemporaryDirectory[str]]:
    """Serve ``site`` at ``base_path`` on a free loopback port."""
    root = tempfile.TemporaryDirectory(prefix="volley-site-")
    mount = Path(root.name) / base_path.strip("/")
    mount.parent.mkdir(parents=True, exist_ok=True)
    mount.symlink_to(site.resolve(), target_is_directory=True)
    handler = functools.partial(NotFoundPageHandler, site.resolve(), directory=root.name)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}{base_path}", root


def page_paths(site: Path, site_url: str) -> list[str]:
    tree = ET.parse(site / "sitemap.xml")
    return [(el.text or "").removeprefix(site_url) for el in tree.iter() if el.tag.endswith("loc")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium")
                        or shutil.which("chromium-browser"))
    args = parser.parse_args(argv)
    if not args.chromium:
        print("browser_check: no Chromium found (apt-get install chromium, or set CHROMIUM)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    config = load_config()
    base_path = urlparse(config.site_url).path or "/"
    server, base, root = serve(args.site, base_path)
    problems: list[str] = []
    paths = page_paths(args.site, config.site_url)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            for width in WIDTHS:
                page = browser.new_page(viewport={"width": width, "height": 900})
                for path in paths:
                    page.goto(base + path)
                    found = page.evaluate(MEASURE)
                    where = f"{width}px /{path}"
                    if found["cut"] and width >= DESKTOP:
                        problems.append(f"{where}: code blocks wider than the column (longest lines {found['cut']})")
                    if found["broken"]:
                        problems.append(f"{where}: table code broken inside a word: {found['broken'][:5]}")
                    if found["overflow"]:
                        problems.append(f"{where}: the page scrolls sideways")
                    if found["images"]:
                        problems.append(f"{where}: images that did not load: {found['images']}")
                page.close()
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(base)
            page.fill("input.md-search__input", "watermark")
            try:
                page.wait_for_selector(".md-search-result__item", timeout=15_000)
            except Exception:
                problems.append("search: no result for 'watermark'")
            response = page.goto(base + "no/such/page/at/depth/")
            styled = page.evaluate("() => [...document.querySelectorAll("
                                   "'link[rel=stylesheet][href^=\"/\"]')].every(l => {"
                                   " try { return l.sheet && l.sheet.cssRules.length > 0 } catch (e) { return false }"
                                   " })")
            if response is None or response.status != 404 or not styled:
                problems.append("404.html served at a deep path: its style sheets did not load")
            browser.close()
    finally:
        server.shutdown()
        root.cleanup()
    for problem in problems:
        print(f"browser_check: {problem}", file=sys.stderr)
    print(f"browser_check: {len(paths)} pages at {len(WIDTHS)} widths, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
