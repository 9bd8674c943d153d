"""harness.frontend: the newest frontend's side install, without the network (pip replaced by a command that
fails, so any attempt to install shows)."""

from __future__ import annotations

import os

import pytest

from harness import frontend


def fake_install(target: str, version: str) -> str:
    static = frontend.static_dir(target)
    os.makedirs(static)
    with open(os.path.join(static, "index.html"), "w") as f:
        f.write("<html></html>")
    with open(os.path.join(target, ".complete"), "w") as f:
        f.write(version + "\n")
    return static


def test_a_finished_install_is_reused_without_pip(tmp_path):
    target = str(tmp_path / "frontend-9.9.9")
    static = fake_install(target, "9.9.9")
    assert frontend.install("9.9.9", target=target, python="/bin/false") == static


def test_an_unfinished_install_is_redone_and_a_failed_pip_says_what_ran(tmp_path):
    target = str(tmp_path / "frontend-9.9.9")
    fake_install(target, "9.9.9")
    os.remove(os.path.join(target, ".complete"))  # interrupted before it was marked finished
    with pytest.raises(frontend.FrontendInstallFailed) as e:
        frontend.install("9.9.9", target=target, python="/bin/false")
    assert f"{frontend.PACKAGE}==9.9.9" in str(e.value) and "exited with 1" in str(e.value)
    assert not os.path.exists(target) and not os.path.exists(target + ".part")


def test_the_pinned_version_names_the_cache_folder(monkeypatch):
    monkeypatch.delenv("CONES2_FRONTEND_DIR", raising=False)
    assert frontend.default_cache_dir().endswith(f"frontend-{frontend.NEWEST_FRONTEND}")
