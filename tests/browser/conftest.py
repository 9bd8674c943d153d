"""Browser fixtures: Debian's Chromium + npm's playwright-core, set up by scripts/setup_browser.sh.

Without them the browser tests skip, except under CI=true, where a browser that cannot be set up fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def browser_env() -> str:
    """Runs scripts/setup_browser.sh once; returns the path of node."""
    script = os.path.join(REPO, "scripts", "setup_browser.sh")
    problem = None
    try:
        res = subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True, timeout=1200)
        if res.returncode != 0:
            problem = (res.stderr or res.stdout).strip()[-3000:]
    except (OSError, subprocess.TimeoutExpired) as e:
        problem = str(e)
    node = shutil.which("node")
    if problem is None and node is None:
        problem = "node is not on PATH"
    if problem:
        if IN_CI:
            pytest.fail(f"CI=true and the browser could not be set up:\n{problem}")
        pytest.skip(f"no browser for the widget tests: {problem}")
    return node
