"""The editor's pure JavaScript modules under node's test runner (tests/js/), in the suite's run.

They need only node (no Chromium, no playwright): this file does not wait for the browser set-up that
tests/browser/ runs. Without node it skips, except under CI=true, where a missing node fails.

The test files are passed by name: node 20's `node --test <dir>` only runs files named like *.test.mjs or
test-*.mjs, and would run none of tests/js/test_*.mjs, passing with nothing checked.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    if found is None:
        if IN_CI:
            pytest.fail("CI=true and node is not on PATH (the JavaScript unit tests need it)")
        pytest.skip("node is not on PATH")
    return found


def test_js_unit_tests_pass(node):
    files = sorted(glob.glob(os.path.join(HERE, "*.mjs")))
    assert files, "no JavaScript tests in tests/js/"
    res = subprocess.run([node, "--test", *files], cwd=REPO, capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    passed = re.search(r"^# pass (\d+)", out, re.MULTILINE)
    assert passed and int(passed.group(1)) > 0, f"node ran no tests:\n{out[-2000:]}"
    assert "Warning" not in out, out[-2000:]
