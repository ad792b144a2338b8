"""Progress in logs: whole lines (no bar cut to the log's width), at each tenth of the work and at the end."""

import re
import subprocess
import sys

from modelrecon.progress import log_lines


def test_log_lines_report_each_tenth_and_the_end_in_whole_lines():
    lines: list[str] = []
    with log_lines(1000, done=200, label="capturing", every_seconds=3600, write=lines.append) as advance:
        for _ in range(16):
            advance(50, status="loss 0.5")
    assert lines[0] == "capturing: 200 / 1,000 tokens (20%)"
    percents = [int(re.search(r"\((\d+)%\)", line).group(1)) for line in lines]
    assert percents == [20, 30, 40, 50, 60, 70, 80, 90, 100]  # each tenth once, then the end
    assert all(re.search(r"tok/s, \d+:\d\d:\d\d left, loss 0.5$", line) for line in lines[1:-1])
    assert re.fullmatch(r"capturing: 1,000 / 1,000 tokens \(100%\), [\d,]+ tok/s, took \d+:\d\d:\d\d, loss 0.5",
                        lines[-1])  # fmt: skip


def test_a_non_terminal_stderr_gets_lines_not_a_bar():
    code = (
        "from modelrecon.progress import token_progress\n"
        "with token_progress(65536, label='capturing') as advance:\n"
        "    for _ in range(64): advance(1024)\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    lines = err.splitlines()
    assert lines[0] == "capturing: 0 / 65,536 tokens (0%)" and lines[-1].startswith("capturing: 65,536 / 65,536 tokens")
    assert "…" not in err and "\r" not in err and len(lines) == 11
