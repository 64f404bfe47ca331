import sys

sys.dont_write_bytecode = True  # section modules loaded by path leave no __pycache__ in the repo

import pytest  # noqa: E402

from fake_anthropic import FakeAnthropic  # noqa: E402
from harness import SDK_VARS, copy_workspace, isolated_env, load_section, section_env_values  # noqa: E402


@pytest.fixture
def fake_api():
    api = FakeAnthropic().start()
    yield api
    api.stop()


@pytest.fixture
def workspace(tmp_path):
    """A private copy of workspace/, so no test touches the tracked samples."""
    return copy_workspace(tmp_path / "workspace")


@pytest.fixture
def section_env(monkeypatch, workspace, fake_api):
    """Set the process environment a section reads at import, pointed at the fake API."""

    def apply(**extra):
        for name in SDK_VARS:
            monkeypatch.delenv(name, raising=False)
        for name, value in section_env_values(workspace, fake_api.base_url, **extra).items():
            monkeypatch.setenv(name, value)

    apply()
    return apply


@pytest.fixture
def load(section_env):
    """load(path, **env) imports a section with the test environment (plus overrides)."""

    def _load(path, **extra):
        if extra:
            section_env(**extra)
        return load_section(path)

    return _load


@pytest.fixture
def subprocess_env(workspace, fake_api):
    """env(**extra) builds the environment for running a section as a subprocess."""

    def _env(**extra):
        return isolated_env(workspace, fake_api.base_url, **extra)

    return _env
