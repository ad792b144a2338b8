"""The logit lens as a self-contained HTML page: the viewer's lens view (`modelrecon.web`, the same front end as
every other chart) with the result embedded, so it opens offline from a file."""

from __future__ import annotations

from pathlib import Path

from modelrecon.attribution.lens import LensResult
from modelrecon.files import write_text_atomic


def lens_html(lens: LensResult) -> str:
    from modelrecon.web.notebook import lens_page  # web sits above the library packages

    return lens_page(lens)


def write_lens_html(lens: LensResult, out: str | Path) -> Path:
    return write_text_atomic(out, lens_html(lens))
