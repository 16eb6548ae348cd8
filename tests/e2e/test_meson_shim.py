"""meson-shim/ builds and installs a plugin that the real NIXL loads.

A minimal host project includes meson-shim/ with subdir(), the way NIXL's tree
would; cargo's target directory is the repository's own, so the release build
made by the test command is reused. The installed file is then listed and used
by NIXL (scenario "listing").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: run scripts/setup-venv.sh (it installs meson and ninja)")
    return found


def test_meson_shim_builds_and_installs_a_loadable_plugin(tmp_path, backend, runner):
    if backend != "Mooncake":
        pytest.skip("builds this project's plugin")
    host = tmp_path / "host"
    host.mkdir()
    shutil.copytree(REPO / "meson-shim", host / "mooncake_rs")
    (host / "meson.build").write_text(
        "project('host', version: '0')\n"
        f"mooncake_rs_source = '{REPO}'\n"
        f"mooncake_rs_target = '{REPO / 'target'}'\n"
        "plugin_install_dir = get_option('libdir') / 'plugins'\n"
        "subdir('mooncake_rs')\n"
    )
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    meson = _tool("meson")
    for cmd in (
        [meson, "setup", str(tmp_path / "build"), str(host), "--buildtype=release", f"--prefix={tmp_path / 'prefix'}", "--libdir=lib"],
        [meson, "compile", "-C", str(tmp_path / "build")],
        [meson, "install", "-C", str(tmp_path / "build")],
    ):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    installed = tmp_path / "prefix" / "lib" / "plugins" / "libplugin_Mooncake.so"
    assert installed.is_file(), f"meson did not install {installed}"
    # NIXL loads the installed file from its plugin directory and moves data with it.
    runner.scenario("listing", "--mode", "dir", env={"NIXL_PLUGIN_DIR": str(installed.parent)})
