"""The screenshots in docs/viewer.md: runs the viewer's browser tests (tests/test_viewer_browser.py, headless Debian
Chromium through Playwright, tiny models, the network blocked) with MR_VIEWER_DOCS=1, which makes each view's test
save its picture as docs/images/viewer-VIEW.png, then checks every picture is under 200 KB.

Run: `.venv/bin/python benchmarks/viewer_screenshots.py` (needs `/usr/bin/chromium`: apt-get install -y chromium).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "docs" / "images"
LIMIT = 200 * 1024


def main() -> int:
    if not Path("/usr/bin/chromium").exists():
        print("needs Debian's chromium: apt-get install -y chromium", file=sys.stderr)
        return 2
    tests = REPO / "tests" / "test_viewer_browser.py"
    test = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)]
    code = subprocess.call(test, cwd=REPO, env={**os.environ, "MR_VIEWER_DOCS": "1"})
    if code:
        return code
    too_big = False
    for image in sorted(IMAGES.glob("viewer-*.png")):
        size = image.stat().st_size
        too_big |= size > LIMIT
        print(f"{image.relative_to(REPO)}  {size / 1024:.0f} KB" + ("  (over 200 KB)" if size > LIMIT else ""))
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
