"""`gateway console --screenshots DIR`: each page of the console at 1280x800, as PNG files (for
docs/console/ and the README). Needs Playwright (the `dev` extra) and a Chromium: Debian's
`chromium` package is used when present, since nothing here may download a browser."""

from __future__ import annotations

from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
PAGES = (("spend", "/spend"), ("spend-by-model", "/spend?by=model"), ("violations", "/violations"),
         ("register", "/register"), ("evidence", "/evidence"))


def take(base: str, token: str, out: Path, request_id: str | None = None) -> list[Path]:
    """Sign in with `token`, then photograph each page (and one request's timeline) into `out`."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    shots = []
    pages = (*PAGES, *((("request", f"/request?id={request_id}"),) if request_id else ()))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else None)
        page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
        page.goto(f"{base}/login")
        page.fill("#token", token)
        page.click("button[type=submit]")
        for name, path in pages:
            page.goto(f"{base}{path}")
            shot = out / f"{name}.png"
            page.screenshot(path=str(shot), full_page=False)
            shots.append(shot)
        browser.close()
    return shots
