"""README command 1's job, small: `pushgw demo` reconciles every delivery (lost 0, duplicates 0) and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_end_to_end(tmp_path: Path) -> None:
    pushgw = Path(sys.executable).with_name("pushgw")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
    (tmp_path / "metrics").mkdir()
    proc = subprocess.run([str(pushgw), "demo", "--learners", "60", "--messages", "300"], capture_output=True, text=True,
                          timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lost 0, duplicates 0" in proc.stdout
    assert "OK: every delivery is accounted for" in proc.stdout
