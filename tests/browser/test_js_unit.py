"""The editor's pure JavaScript modules under node's test runner (tests/js/), in the suite's run.

The test files are passed by name: node 20's `node --test <dir>` only runs files named like *.test.mjs or
test-*.mjs, and would run none of tests/js/test_*.mjs, passing with nothing checked.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def test_js_unit_tests_pass(browser_env):
    files = sorted(glob.glob(os.path.join(REPO, "tests", "js", "*.mjs")))
    assert files, "no JavaScript tests in tests/js/"
    res = subprocess.run([browser_env, "--test", *files], cwd=REPO, capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    passed = re.search(r"^# pass (\d+)", out, re.MULTILINE)
    assert passed and int(passed.group(1)) > 0, f"node ran no tests:\n{out[-2000:]}"
    assert "Warning" not in out, out[-2000:]
