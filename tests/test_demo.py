"""README command 1's job, small: `pushgw demo` reconciles every delivery (lost 0, duplicates 0) and exits 0,
and its rich notifications reach the fakes with their fields (the demo prints them from what the fakes received)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

# Each rich kind the demo sends, with the fields its line must show (read from the fakes' received payloads).
RICH_LINES = {
    "time-sensitive reminder": r"apns aps\.interruption-level=time-sensitive thread-id=live-",
    "quiz badge with image": r"apns aps\.badge=1 mutable-content=1 pushgw\.image=https://cdn\.campus\.example/badges/",
    "live activity start": r"apns apns-topic=org\.example\.campus\.push-type\.liveactivity aps\.event=start "
                           r'content-state=\{"minutes_left":15\}',
    "live activity update": r"apns apns-topic=org\.example\.campus\.push-type\.liveactivity aps\.event=update "
                            r'content-state=\{"minutes_left":10\}',
    "web push with actions": r"webpush actions=\['Open module', 'Later'\] navigate=https://campus\.example/",
}


def test_demo_end_to_end(tmp_path: Path) -> None:
    pushgw = Path(sys.executable).with_name("pushgw")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
    (tmp_path / "metrics").mkdir()
    proc = subprocess.run([str(pushgw), "demo", "--learners", "60", "--messages", "300"], capture_output=True, text=True,
                          timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lost 0, duplicates 0" in proc.stdout
    assert "OK: every delivery is accounted for" in proc.stdout
    assert "without their rich fields" not in proc.stdout
    for kind, fields in RICH_LINES.items():
        m = re.search(rf"^ +{re.escape(kind)} +(\d+)  {fields}", proc.stdout, re.MULTILINE)
        assert m is not None and int(m.group(1)) > 0, (kind, proc.stdout)
    live = re.findall(r"^ +live activity (?:start|update) +(\d+)", proc.stdout, re.MULTILINE)
    assert [int(n) for n in live] == [3, 3]  # every lock screen got its start and its update
