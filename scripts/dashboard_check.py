#!/usr/bin/env python3
"""Opens layerwise's dashboard in a real headless browser (Debian's chromium, driven by
Playwright) while a job trains: waits for the job's row, then for its curve to gain an
epoch and its log lines to show an epoch's summary; collects console errors. Prints one JSON object; exits 1 on a console error.

    python3 scripts/dashboard_check.py URL JOB [SCREENSHOT.png]
"""

import json
import os
import sys

from playwright.sync_api import sync_playwright


def main():
    url, job = sys.argv[1], sys.argv[2]
    shot = sys.argv[3] if len(sys.argv) > 3 else None
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector(f'tr[data-job="{job}"]', timeout=300_000)
        page.click(f'tr[data-job="{job}"]')
        page.wait_for_function(f'document.getElementById("name").textContent === "{job}"', timeout=300_000)
        page.wait_for_selector("#chart[data-epochs] img", timeout=300_000)
        first = int(page.get_attribute("#chart", "data-epochs"))
        page.wait_for_function(
            f'Number(document.querySelector("#chart").dataset.epochs) > {first}', timeout=300_000
        )
        later = int(page.get_attribute("#chart", "data-epochs"))
        # The job's last log lines, kept by the service: its epochs' summaries among them.
        page.wait_for_function('document.getElementById("lines").textContent.includes("epoch")', timeout=300_000)
        log = page.inner_text("#lines")
        state = page.inner_text(f'tr[data-job="{job}"] .state')
        if shot:
            page.screenshot(path=shot, full_page=True)
        # A phone's width: the page still fits (the table scrolls inside its box).
        page.set_viewport_size({"width": 390, "height": 844})
        overflow = page.evaluate("document.documentElement.scrollWidth > window.innerWidth + 1")
        browser.close()
    print(json.dumps({"first": first, "later": later, "state": state, "log": log.splitlines()[-3:], "overflow": overflow, "errors": errors}))
    sys.exit(1 if errors or overflow else 0)


if __name__ == "__main__":
    main()
