"""Browser fixtures: Debian's Chromium + npm's playwright-core, set up by scripts/setup_browser.sh, and the
newest ComfyUI frontend (harness/frontend.py, installed once with pip into ~/.cache/comfyui-cones2/) served by a
second server next to the host's own frontend.

Without them the browser tests skip, except under CI=true, where a browser or a frontend that cannot be set up
fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from harness import frontend, tiny_extras

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (frontend, node renderer) of each browser run: which server serves it, and Comfy.VueNodes.Enabled (None: left as
# it is)
FRONTENDS = {
    "host-frontend": ("server", None),
    "newest-classic": ("newest_server", False),
    "newest-nodes2": ("newest_server", True),
}


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


@pytest.fixture(scope="session")
def newest_frontend() -> str:
    """harness.frontend.NEWEST_FRONTEND installed into its cache folder (once); returns its static folder."""
    try:
        return frontend.install()
    except frontend.FrontendInstallFailed as e:
        if IN_CI:
            pytest.fail(f"CI=true and the newest frontend could not be installed:\n{e}")
        pytest.skip(f"no newest frontend for the widget tests: {e}")


@pytest.fixture(scope="session")
def newest_server(host_dir, tiny_ckpts, extras_files, newest_frontend, tmp_path_factory):
    """The same server as ``server`` (the tiny checkpoints and extras), serving the newest frontend."""
    from harness.server import SESSION_SERVERS, ComfyServer

    srv = ComfyServer(checkpoints=tiny_ckpts, base_dir=str(tmp_path_factory.mktemp("comfy-newest-frontend")),
                      host=host_dir, front_end_root=newest_frontend)
    tiny_extras.install(extras_files, srv)
    SESSION_SERVERS["newest_server"] = srv.start()  # stopped after its last user (tests/conftest.py SERVER_USERS)
    yield srv
    SESSION_SERVERS.pop("newest_server", None)
    srv.stop()


@pytest.fixture(scope="module", params=list(FRONTENDS))
def ui(request):
    """One run's frontend and renderer: {id, server, vue_nodes}; the newest frontend's server starts only for
    the runs that use it."""
    server_fixture, vue_nodes = FRONTENDS[request.param]
    return {"id": request.param, "server": request.getfixturevalue(server_fixture), "vue_nodes": vue_nodes}
