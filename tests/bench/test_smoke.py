"""The benchmark harness keeps working: a short run against mailbridge alone.

Runs ``bench/harness.py --quick`` (300 messages of 1 KB over 10 reused
sessions from Postfix's ``smtp-source``, a latency probe, the webhook sink) and
checks that every message arrived at the sink. It asserts nothing about speed:
timings on a shared CI machine mean nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, require_tool


def test_quick_run_delivers_every_message_to_the_sink(tmp_path: Path) -> None:
    require_tool("smtp-source")
    results = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "harness.py"),
            "--quick",
            "--servers",
            "mailbridge-sync",
            "--out",
            str(tmp_path / "QUICK.md"),
            "--json",
            str(results),
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert 0 == done.returncode, done.stdout[-2000:] + done.stderr[-2000:]
    runs = json.loads(results.read_text())["runs"]
    assert ["mailbridge-sync"] == [run["server"] for run in runs]
    run = runs[0]
    assert run["ok"], run["error"]
    assert run["sent"] == run["arrived"] == 300
    assert run["latency_samples"] > 0  # probe messages made it through too
    assert "mailbridge-sync" in (tmp_path / "QUICK.md").read_text()
