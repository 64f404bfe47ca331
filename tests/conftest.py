import sys

sys.dont_write_bytecode = True  # section modules loaded by path leave no __pycache__ in the repo

import functools  # noqa: E402
import ssl  # noqa: E402

import httpcore2  # noqa: E402
import pytest  # noqa: E402

# Every test builds an SDK client (and s04 on a Telegram client); each one reads the system's CA
# bundle into a new SSL context, about 25 ms of CPU, for servers that are all plain HTTP on
# 127.0.0.1. In the test process one context per set of arguments is built and shared.
httpcore2.default_ssl_context = functools.lru_cache(maxsize=None)(httpcore2.default_ssl_context)
ssl.create_default_context = functools.lru_cache(maxsize=None)(ssl.create_default_context)

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
