"""A screenshot of the report's first screen in headless Chromium (the model page above the
fold), written to benchmarks/results/report.png.

Run after `make demo`: `python benchmarks/report_screenshot.py [--report PATH]`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", default=str(ROOT / "data/reports/retention_report.html"))
    parser.add_argument("--out", default=str(HERE / "results" / "report.png"))
    args = parser.parse_args()
    report = Path(args.report)
    if not report.exists():
        raise SystemExit(f"no report at {report}: run `make demo` first")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(report.resolve().as_uri())
        page.wait_for_selector(".plotly-graph-div")
        page.wait_for_timeout(500)  # plotly's first layout pass
        page.screenshot(path=args.out)
        browser.close()
    print(f"screenshot: {args.out}")


if __name__ == "__main__":
    main()
