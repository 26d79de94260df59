"""Settings: where the key comes from, and clear errors for a bad environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.config import DEFAULT_BASE_URL, load_settings
from server.errors import ConfigError


def write_credentials(home: Path, text: str) -> Path:
    path = home / ".alibabacloud" / "credentials"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings({"HOME": str(tmp_path)}, cwd=tmp_path)
    assert settings.base_url == DEFAULT_BASE_URL and settings.is_beijing
    assert settings.output_dir == (tmp_path / "output").resolve()
    assert settings.state_dir == settings.output_dir
    assert settings.poll_interval == 15.0
    assert settings.key_source == "none" and settings.api_key is None


def test_env_key_wins_over_credentials_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write_credentials(tmp_path, "[default]\ndashscope_api_key = sk-from-file\n")
    settings = load_settings({"HOME": str(tmp_path), "DASHSCOPE_API_KEY": "sk-from-env"}, cwd=tmp_path)
    assert (settings.api_key, settings.key_source) == ("sk-from-env", "env")
    assert "sk-from-env" not in repr(settings)


def test_key_file_comes_after_env_and_before_credentials_file(tmp_path: Path) -> None:
    key_file = tmp_path / "dashscope-key"
    key_file.write_text("sk-from-key-file\n")
    write_credentials(tmp_path, "[default]\ndashscope_api_key = sk-from-ini\n")
    env = {"HOME": str(tmp_path), "DASHSCOPE_API_KEY_FILE_PATH": str(key_file)}
    settings = load_settings(env, cwd=tmp_path)
    assert (settings.api_key, settings.key_source) == ("sk-from-key-file", "key-file")
    assert load_settings({**env, "DASHSCOPE_API_KEY": "sk-env"}, cwd=tmp_path).api_key == "sk-env"
    missing = {"HOME": str(tmp_path), "DASHSCOPE_API_KEY_FILE_PATH": str(tmp_path / "absent")}
    assert load_settings(missing, cwd=tmp_path).key_source == "credentials-file"


def test_credentials_file_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write_credentials(tmp_path, "[default]\ndashscope_api_key = sk-default\n\n[work]\ndashscope_api_key = sk-work\n")
    assert load_settings({}, cwd=tmp_path).api_key == "sk-default"
    settings = load_settings({"ALIBABA_CLOUD_PROFILE": "work"}, cwd=tmp_path)
    assert (settings.api_key, settings.key_source) == ("sk-work", "credentials-file")
    assert load_settings({"ALICLOUD_PROFILE": "work"}, cwd=tmp_path).api_key == "sk-work"
    assert load_settings({"ALIBABA_CLOUD_PROFILE": "absent"}, cwd=tmp_path).api_key is None


def test_overrides(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "HOME": str(tmp_path),
            "DASHSCOPE_HTTP_BASE_URL": "http://127.0.0.1:9/api/v1/",
            "OUTPUT_DIR": "videos",
            "EMO_MCP_STATE_DIR": str(tmp_path / "state"),
            "EMO_MCP_POLL_INTERVAL": "2.5",
            "EMO_MCP_MODEL_ALIASES": "emo-v1=my-emo",
        },
        cwd=tmp_path,
    )
    assert settings.base_url == "http://127.0.0.1:9/api/v1" and not settings.is_beijing
    assert settings.output_dir == tmp_path / "videos"
    assert settings.state_dir == tmp_path / "state"
    assert settings.poll_interval == 2.5
    assert settings.model_aliases == {"emo-v1": ("my-emo",)}


@pytest.mark.parametrize(
    ("env", "mentions"),
    [
        ({"EMO_MCP_POLL_INTERVAL": "soon"}, "EMO_MCP_POLL_INTERVAL"),
        ({"EMO_MCP_POLL_INTERVAL": "0"}, "EMO_MCP_POLL_INTERVAL"),
        ({"DASHSCOPE_HTTP_BASE_URL": "ftp://x"}, "DASHSCOPE_HTTP_BASE_URL"),
        ({"EMO_MCP_MODEL_ALIASES": "not-a-model=x"}, "EMO_MCP_MODEL_ALIASES"),
    ],
)
def test_bad_values_are_config_errors(tmp_path: Path, env: dict[str, str], mentions: str) -> None:
    with pytest.raises(ConfigError, match=mentions):
        load_settings({"HOME": str(tmp_path), **env}, cwd=tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir_is_a_clear_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="OUTPUT_DIR"):
        load_settings({"OUTPUT_DIR": str(locked / "out")}, cwd=tmp_path)


def test_output_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match=r"OUTPUT_DIR.*writable"):
        load_settings({"HOME": str(tmp_path), "OUTPUT_DIR": str(tmp_path / "taken")}, cwd=tmp_path)


def test_settings_an_mcp_bundle_left_empty_count_as_unset(tmp_path: Path) -> None:
    """A bundle host passes an empty optional setting as its literal placeholder (the mcpb CLI's own code)."""
    env = {
        "HOME": str(tmp_path),
        "DASHSCOPE_API_KEY": "${user_config.dashscope_api_key}",
        "OUTPUT_DIR": " ${user_config.output_dir} ",
        "EMO_MCP_MAX_COST_CNY": "${user_config.max_cost_cny}",
        "EMO_MCP_CONFIRM_ABOVE_CNY": "${user_config.confirm_above_cny}",
        "EMO_MCP_ALLOWED_ROOTS": "${user_config.allowed_roots}",
        "EMO_MCP_POLL_INTERVAL": "${user_config.poll}",
    }
    settings = load_settings(env, cwd=tmp_path)
    assert settings.api_key is None and settings.key_source == "none"
    assert settings.output_dir == (tmp_path / "output").resolve()
    assert settings.max_cost_cny is None and settings.confirm_above_cny is None
    assert settings.allowed_roots == (tmp_path.resolve(),) and settings.poll_interval == 15.0
    filled = load_settings({**env, "EMO_MCP_MAX_COST_CNY": "2.5", "DASHSCOPE_API_KEY": "sk-real"}, cwd=tmp_path)
    assert filled.max_cost_cny == 2.5 and filled.api_key == "sk-real"
    # Anything else that merely contains "${" is still a value, and still checked.
    with pytest.raises(ConfigError, match="EMO_MCP_MAX_COST_CNY"):
        load_settings({**env, "EMO_MCP_MAX_COST_CNY": "${user_config.max_cost_cny} CNY"}, cwd=tmp_path)


def test_allowed_root_folders_replace_the_variable(tmp_path: Path) -> None:
    pictures, voices, other = (tmp_path / name for name in ("pictures", "voices", "other"))
    for folder in (pictures, voices, other):
        folder.mkdir()
    env = {"HOME": str(tmp_path), "EMO_MCP_ALLOWED_ROOTS": str(other)}
    settings = load_settings(env, cwd=tmp_path, allowed_roots=["pictures", str(voices), "${user_config.allowed_roots}"])
    assert settings.allowed_roots == (pictures.resolve(), voices.resolve())
    assert load_settings(env, cwd=tmp_path, allowed_roots=["${user_config.allowed_roots}"]).allowed_roots == (
        other.resolve(),
    )
    with pytest.raises(ConfigError, match="--allowed-root 'missing' is not an existing folder"):
        load_settings(env, cwd=tmp_path, allowed_roots=["missing"])


def test_workers_starting_at_once_on_one_output_dir_all_start(tmp_path: Path) -> None:
    """A cluster's workers check one OUTPUT_DIR at the same moment; none may see another's write probe
    vanish (a shared probe name failed a CI run with ENOENT on a writable folder)."""
    import subprocess
    import sys

    folder = tmp_path / "shared"
    script = (
        "import sys\nfrom pathlib import Path\nfrom server.config import ensure_writable_dir\n"
        "for _ in range(300):\n    ensure_writable_dir(Path(sys.argv[1]), 'OUTPUT_DIR')\n"
    )
    runs = [subprocess.Popen([sys.executable, "-c", script, str(folder)], stderr=subprocess.PIPE) for _ in range(6)]
    errors = [run.communicate()[1].decode() for run in runs]
    assert [run.returncode for run in runs] == [0] * 6, "\n".join(errors)
    assert list(folder.iterdir()) == []
