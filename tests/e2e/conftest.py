"""Fixtures for the end-to-end tests: where the plugin is, where the wheel is, and
a runner that executes one scenario of scenarios.py in a fresh process.

Environment:
    MOONCAKE_PLUGIN  path of the plugin to test; default
                     <repo>/target/release/libplugin_Mooncake.so.  Missing -> every
                     test fails (not skips) with a message saying so.
    E2E_BACKEND      backend name, default "Mooncake".  With the name of a plugin the
                     wheel bundles (e.g. "UCX") and no MOONCAKE_PLUGIN, the wheel's
                     own plugin directory is used: that validates the suite itself.
                     With MOONCAKE_PLUGIN pointing at the wheel's libplugin_UCX.so,
                     the NIXL_PLUGIN_DIR path is exercised with UCX too.
    E2E_TIMEOUT      per-scenario timeout in seconds, default 120.
    E2E_PRELOAD      a library every scenario process preloads (LD_PRELOAD), e.g. the
                     ASan runtime for a plugin built with AddressSanitizer.

Every scenario runs with UCX_MODULES=^efa and UCX_NET_DEVICES=lo (see
shared/nixl-abi.md section 7), with NIXL_MOONCAKE_IP_ADDR=127.0.0.1 (the plugin's
TCP listener never uses a non-loopback address) and, by default, with
NIXL_PLUGIN_DIR pointing at a private directory holding a copy of the plugin named
libplugin_<backend>.so.  A scenario may start peer processes (the cross-process
ones do); they share its process group, which is killed whole on a timeout.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = Path(__file__).with_name("scenarios.py")
BACKEND = os.environ.get("E2E_BACKEND", "Mooncake")
DEFAULT_PLUGIN = REPO / "target" / "release" / "libplugin_Mooncake.so"
TIMEOUT = float(os.environ.get("E2E_TIMEOUT", "120"))


@dataclass(frozen=True)
class Wheel:
    """Locations inside the installed nixl-cu12 wheel."""

    site_packages: Path
    libs_dir: Path  # .nixl_cu12.mesonpy.libs: libnixl*.so
    vendored_dir: Path  # nixl_cu12.libs: UCX, abseil, ...
    plugins_dir: Path  # .nixl_cu12.mesonpy.libs/plugins: bundled plugins
    example: Path  # nixl_cu12.scripts/nixl_example (not executable: run via ld.so)


@dataclass(frozen=True)
class Plugin:
    """The plugin under test. `file` is None for a backend the wheel bundles."""

    file: Optional[Path]
    bundled: bool  # the file is one of the wheel's own plugins (validation mode)


def _find_wheel() -> Wheel:
    spec = importlib.util.find_spec("nixl_cu12")  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            f"nixl-cu12 is not installed for {sys.executable}; run scripts/setup-venv.sh "
            "and use that venv's python -m pytest",
            pytrace=False,
        )
    sp = Path(list(spec.submodule_search_locations)[0]).parent
    libs = sp / ".nixl_cu12.mesonpy.libs"
    return Wheel(sp, libs, sp / "nixl_cu12.libs", libs / "plugins",
                 sp / "nixl_cu12.scripts" / "nixl_example")


@pytest.fixture(scope="session")
def wheel() -> Wheel:
    return _find_wheel()


@pytest.fixture(scope="session")
def plugin(wheel: Wheel) -> Plugin:
    explicit = os.environ.get("MOONCAKE_PLUGIN")
    bundled_here = wheel.plugins_dir / f"libplugin_{BACKEND}.so"
    if explicit is None and BACKEND != "Mooncake" and bundled_here.is_file():
        return Plugin(None, bundled=True)  # validating the suite with the wheel's backend
    path = Path(explicit) if explicit else DEFAULT_PLUGIN
    if not path.is_file():
        pytest.fail(
            f"plugin not found: {path}\n"
            "Build it first (cargo build --release) or set MOONCAKE_PLUGIN to its path.",
            pytrace=False,
        )
    path = path.resolve()
    return Plugin(path, bundled=path.parent == wheel.plugins_dir.resolve())


def _install(src: Path, dest: Path) -> None:
    """Copy src to dest atomically: never rewrite a file another process may have mapped."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)


@pytest.fixture(scope="session")
def plugin_dir(plugin: Plugin, tmp_path_factory) -> Optional[Path]:
    """A private NIXL_PLUGIN_DIR holding only a copy of our plugin (None: use the wheel's)."""
    if plugin.file is None:
        return None
    d = tmp_path_factory.mktemp("nixl-plugins")
    _install(plugin.file, d / f"libplugin_{BACKEND}.so")
    return d


@pytest.fixture
def plugin_beside_wheel(plugin: Plugin, wheel: Wheel, tmp_path):
    """Put the plugin into the wheel's own plugins/ directory for one test, then remove it.

    An existing file of that name is saved and put back afterwards.
    """
    if plugin.file is None or plugin.bundled:
        yield  # already there
        return
    dest = wheel.plugins_dir / f"libplugin_{BACKEND}.so"
    backup = tmp_path / "previous.so"
    had_previous = dest.exists()
    if had_previous:
        shutil.copy2(dest, backup)
    _install(plugin.file, dest)
    try:
        yield
    finally:
        if had_previous:
            _install(backup, dest)
        else:
            dest.unlink(missing_ok=True)


def _describe_rc(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


class Runner:
    """Runs commands/scenarios in fresh processes with the right environment."""

    def __init__(self, plugin: Plugin, plugin_dir: Optional[Path], wheel: Wheel):
        self.plugin, self.plugin_dir, self.wheel = plugin, plugin_dir, wheel

    def env(self, location: str = "dir", extra: Optional[dict] = None) -> dict:
        """location "dir": NIXL_PLUGIN_DIR = private dir; "wheel": unset (wheel's plugins/)."""
        env = dict(os.environ)
        env.update(UCX_MODULES="^efa", UCX_NET_DEVICES="lo", E2E_BACKEND=BACKEND,
                   NIXL_MOONCAKE_IP_ADDR="127.0.0.1", PYTHONUNBUFFERED="1")
        # Only the directory we choose may be scanned.
        env.pop("NIXL_PLUGIN_DIR", None)
        env.pop("NIXL_CONFIG_FILE", None)
        env.pop("RUST_LOG", None)  # would override the NIXL_LOG_LEVEL some tests set
        if location == "dir" and self.plugin_dir is not None:
            env["NIXL_PLUGIN_DIR"] = str(self.plugin_dir)
            if self.plugin.bundled:
                # A copied bundled plugin loses its $ORIGIN-relative RPATH; point the
                # loader at the wheel's libraries (validation mode only).
                env["LD_LIBRARY_PATH"] = os.pathsep.join(
                    p for p in (str(self.wheel.libs_dir), str(self.wheel.vendored_dir),
                                env.get("LD_LIBRARY_PATH", "")) if p)
        # E2E_PRELOAD: a library every scenario process preloads (the ASan
        # runtime for a plugin built with AddressSanitizer, scripts/sanitizers.sh).
        if os.environ.get("E2E_PRELOAD"):
            env["LD_PRELOAD"] = os.environ["E2E_PRELOAD"]
        if extra:
            env.update(extra)
        return env

    def command(self, cmd: list[str], what: str, env: dict, timeout: float = TIMEOUT) -> str:
        """Run cmd; fail the test (showing its output) on timeout or non-zero exit."""
        # A new session, so a timeout can kill the whole group (a scenario may
        # have started a peer process that would otherwise keep our pipe open).
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        text = out.decode(errors="replace")
        if timed_out:
            pytest.fail(f"{what}: timed out after {timeout:.0f}s (hang?)\n"
                        f"--- output ---\n{text}", pytrace=False)
        if proc.returncode != 0:
            pytest.fail(f"{what}: {_describe_rc(proc.returncode)}\n--- output ---\n{text}",
                        pytrace=False)
        print(text)  # a passing run's output, shown by pytest -rA or -s
        return text

    def scenario(self, name: str, *args: str, location: str = "dir",
                 env: Optional[dict] = None, timeout: float = TIMEOUT) -> str:
        cmd = [sys.executable, str(SCENARIOS), name, *args]
        what = f"scenario {name} {' '.join(args)}".strip() + f" [{BACKEND}, plugin {location}]"
        text = self.command(cmd, what, self.env(location, env), timeout)
        assert f"SCENARIO {name} OK" in text, f"{what}: no success line\n{text}"
        return text


@pytest.fixture
def runner(plugin: Plugin, plugin_dir: Optional[Path], wheel: Wheel) -> Runner:
    return Runner(plugin, plugin_dir, wheel)


@pytest.fixture
def run_scenario(runner: Runner):
    """run_scenario(name, *args, location="dir", env=None, timeout=120) -> output."""
    return runner.scenario


@pytest.fixture
def backend() -> str:
    return BACKEND


def pytest_report_header(config):
    src = os.environ.get("MOONCAKE_PLUGIN") or (
        "the wheel's bundled plugin" if BACKEND != "Mooncake" else str(DEFAULT_PLUGIN))
    return [f"e2e backend: {BACKEND}; plugin: {src}"]
