"""Check that the built docs site renders offline, in a headless browser.

Builds the site (``mkdocs build --strict``) into a temporary folder, or takes ``--site DIR``,
serves it on 127.0.0.1 and opens every page in headless Chromium through Playwright with every
request that does not go to that local server aborted (and listed). On each page it checks:

* every ``arithmatex`` element was typeset by the vendored MathJax, with no TeX error
  (``mjx-merror``), the MathJax fonts loaded and the per-character CSS present (a formula
  without it is laid out as blank space);
* no literal markup is left in the visible text: Sphinx roles (``:math:``, ``:class:``, ...),
  RST directives (``.. math::``, ``.. note::``), ``$$`` or ``\\(`` outside typeset math;
* no name (inline code) in a table cell is broken mid-word over two lines;
* no table is wider than the content column without a scroll box around it.

It also writes viewport screenshots (the top of Concepts, of the sdekit API page and of the
Solvers page) to ``--out`` for a person to look at.

Needs a Chromium (``apt-get install chromium``; or ``python -m playwright install chromium``)
and ``pip install playwright``; not run in CI. Usage, from the repository root::

    python tests/check_docs_offline.py --out /tmp/docs_shots
    python tests/check_docs_offline.py --site site --browser /usr/bin/chromium --pages concepts/ api/

Exit status 0 when every page passes, 1 otherwise (each failure printed), 2 when no browser.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading

ROOT = pathlib.Path(__file__).resolve().parent.parent

SCREENSHOTS = {"concepts/": "concepts.png", "api/": "api_sdekit.png", "solvers/": "solvers.png"}
VIEWPORT = {"width": 1280, "height": 1600}
PAGE_TIMEOUT_MS = 60_000
LITERAL_MARKUP = re.compile(
    r":(?:math|class|func|meth|attr|mod|obj|ref):`|\.\. (?:math|note|warning|code-block)::"
    r"|\$\$|\\\(|\\\["
)

# Runs in the page once MathJax has finished: a JSON-able summary of what rendered.
PAGE_PROBE = r"""
async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
  }
  await document.fonts.ready;
  const math = [...document.querySelectorAll('.md-content .arithmatex')];
  const unrendered = math.filter(el => !el.querySelector('mjx-container'))
                         .map(el => el.textContent.trim().slice(0, 80));
  const errors = [...document.querySelectorAll('mjx-merror')]
      .map(el => (el.getAttribute('data-mjx-error') || el.textContent).slice(0, 120));
  const chars = [...document.querySelectorAll('mjx-c')];
  const blankChars = chars.filter(c => {
    const content = getComputedStyle(c, '::before').content;
    return (content === 'none' || content === '') && !c.textContent;
  }).length;
  const fonts = [...document.fonts].filter(f => f.status === 'loaded').map(f => f.family);
  // Visible prose: drop code, typeset math and MathJax's assistive copies.
  const clone = document.querySelector('.md-content').cloneNode(true);
  clone.querySelectorAll('code, pre, mjx-container, .arithmatex, script, style')
       .forEach(el => el.remove());
  const text = clone.textContent;
  // A name split over two lines: some whitespace-free run of a code cell has two boxes.
  const splitMidWord = code => {
    const walker = document.createTreeWalker(code, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const m of node.textContent.matchAll(/\S+/g)) {
        const range = document.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        if (range.getClientRects().length > 1) return true;
      }
    }
    return false;
  };
  const brokenCode = [...document.querySelectorAll('.md-content td code, .md-content th code')]
      .filter(splitMidWord).map(c => c.textContent.slice(0, 60));
  const content = document.querySelector('.md-content');
  const overflowing = [...document.querySelectorAll('.md-content table')].filter(t => {
    let el = t.parentElement, scrolls = false;
    while (el && el !== content) {
      const ov = getComputedStyle(el).overflowX;
      if (ov === 'auto' || ov === 'scroll') { scrolls = true; break; }
      el = el.parentElement;
    }
    return !scrolls && t.getBoundingClientRect().right > content.getBoundingClientRect().right + 1;
  }).length;
  return {n_math: math.length, unrendered, errors, n_chars: chars.length, blankChars, fonts,
          text, brokenCode, overflowing};
}
"""


def find_browser(explicit: str | None) -> str | None:
    """Path of a Chromium executable, or None to let Playwright use its own download."""
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def build_site(dest: pathlib.Path) -> None:
    """``mkdocs build --strict`` of the repository into ``dest``."""
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(dest)],
        cwd=ROOT, check=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def serve(site: pathlib.Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``site`` on an ephemeral localhost port from a daemon thread."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def site_pages(site: pathlib.Path) -> list[str]:
    """Relative URLs of the site's pages (``index.html`` files), 404 page excluded."""
    pages = []
    for path in sorted(site.rglob("index.html")):
        rel = path.parent.relative_to(site).as_posix()
        pages.append("" if rel == "." else rel + "/")
    return pages


def check_page(summary: dict) -> list[str]:
    """Failure messages for one page's probe summary (empty when it passes)."""
    failures = []
    if summary["unrendered"]:
        failures.append(f"{len(summary['unrendered'])} formulas not typeset, e.g. "
                        f"{summary['unrendered'][:3]}")
    if summary["errors"]:
        failures.append(f"{len(summary['errors'])} TeX errors: {summary['errors'][:5]}")
    if summary["n_math"] and not any(f.startswith("MJXTEX") for f in summary["fonts"]):
        failures.append(f"MathJax fonts not loaded (loaded: {summary['fonts']})")
    if summary["blankChars"]:
        failures.append(f"{summary['blankChars']} of {summary['n_chars']} MathJax characters "
                        "have no glyph CSS (blank math)")
    for match in LITERAL_MARKUP.finditer(summary["text"]):
        start = max(match.start() - 40, 0)
        context = " ".join(summary["text"][start:match.end() + 40].split())
        failures.append(f"literal markup {match.group()!r}: ...{context}...")
    if summary["brokenCode"]:
        failures.append(f"names in table cells broken mid-word: {summary['brokenCode'][:5]}")
    if summary["overflowing"]:
        failures.append(f"{summary['overflowing']} tables run past the content column")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=pathlib.Path, help="built site (default: build one)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs_screenshots"),
                        help="folder for the screenshots (default: ./docs_screenshots)")
    parser.add_argument("--browser", help="Chromium executable (default: found on PATH)")
    parser.add_argument("--pages", nargs="*", help="pages to check, e.g. concepts/ (default: all)")
    args = parser.parse_args(argv)

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("playwright is not installed: pip install playwright", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        site = args.site
        if site is None:
            site = pathlib.Path(tmp) / "site"
            build_site(site)
        pages = args.pages if args.pages else site_pages(site)
        server, base = serve(site)
        args.out.mkdir(parents=True, exist_ok=True)
        blocked: list[str] = []
        failed = False
        try:
            with sync_playwright() as pw:
                try:
                    browser = pw.chromium.launch(executable_path=find_browser(args.browser),
                                                 args=["--no-sandbox"])
                except Exception as exc:  # noqa: BLE001 - report any launch failure plainly
                    print(f"cannot start Chromium: {exc}", file=sys.stderr)
                    return 2
                context = browser.new_context(viewport=VIEWPORT)

                def route(request_route) -> None:
                    url = request_route.request.url
                    if url.startswith(base):
                        request_route.continue_()
                    else:
                        blocked.append(url)
                        request_route.abort()

                context.route("**/*", route)
                page = context.new_page()
                page.set_default_timeout(PAGE_TIMEOUT_MS)
                for rel in pages:
                    page.goto(base + rel, wait_until="load")
                    summary = page.evaluate(PAGE_PROBE)
                    failures = check_page(summary)
                    status = "FAIL" if failures else "ok"
                    print(f"{status:4} /{rel}: {summary['n_math']} formulas, "
                          f"{summary['n_chars']} glyphs")
                    for failure in failures:
                        print(f"     - {failure}")
                    failed |= bool(failures)
                    if rel in SCREENSHOTS:
                        page.screenshot(path=str(args.out / SCREENSHOTS[rel]))
                browser.close()
        finally:
            server.shutdown()
    if blocked:
        failed = True
        print(f"FAIL requests that left localhost (blocked): {json.dumps(sorted(set(blocked)))}")
    print(f"screenshots in {args.out.resolve()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
