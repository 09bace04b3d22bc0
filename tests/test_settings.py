"""Settings: every variable parsed with bounds into a one-line error naming it, and each command reads only its own."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import ConfigurationError
from core.settings import COMMANDS, SETTINGS_FIELDS, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
VARIABLES = [spec.metadata["env"] for spec in SETTINGS_FIELDS]


@pytest.mark.parametrize("raw", ["debug", "Info", "WARNING", " error "])
def test_log_level_in_any_case_is_a_level_logging_knows(raw: str) -> None:
    level = load_settings({"LOG_LEVEL": raw}).log_level
    assert isinstance(logging.getLevelName(level), int)


@pytest.mark.parametrize(
    ("env", "accepted"),
    [
        ({"LOG_LEVEL": "verbose"}, "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ({"PROMPT_CACHE_MB": "1e308"}, "a number from 0 to"),
        ({"PROMPT_CACHE_MB": "nan"}, "a number from 0 to"),
        ({"LORA_CACHE_MB": "-1"}, "a number from 0 to"),
        ({"LORA_CACHE_SIZE": "-1"}, "a whole number from 0 to 1024"),
        ({"MAX_PAYLOAD_BYTES": "1e7"}, "a whole number from 1 to"),
        ({"URL_TIMEOUT_S": "0"}, "a number from 0.1 to"),
        ({"WARMUP_SIZES": "0x0"}, "each side from 64 to 4096"),
        ({"WARMUP_BATCH_SIZES": "0"}, "from 1 to 64"),
        ({"COMPILE": "bogus"}, "use one of off, unet, regional"),
        ({"CHECKPOINT_SHA256": "abc"}, "64 hex digits"),
        ({"JOB_COMPLETION_INDEX": "-1"}, "a whole number >= 0"),
        ({"ALLOW_PRIVATE_URLS": "maybe"}, "1/0, true/false"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable_and_what_is_accepted(env: dict, accepted: str) -> None:
    ((name, raw),) = env.items()
    with pytest.raises(ConfigurationError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert "\n" not in message and f"{name}={raw!r} is invalid" in message and accepted in message


@given(variable=st.sampled_from(VARIABLES), raw=st.text(max_size=40))
def test_any_value_of_any_variable_parses_or_is_a_configuration_error(variable: str, raw: str) -> None:
    try:
        settings = load_settings({variable: raw})
    except ConfigurationError as error:
        assert variable in str(error) and "\n" not in str(error)
    else:
        assert isinstance(settings, Settings)


def test_each_command_reads_only_its_own_variables() -> None:
    for spec in SETTINGS_FIELDS:
        assert spec.metadata["read_by"] and set(spec.metadata["read_by"]) <= set(COMMANDS), spec.name
    worker_only = {"COMPILE": "bogus", "BUCKET_ENDPOINT_URL": "x", "MAX_PAYLOAD_BYTES": "lots"}
    assert load_settings({**worker_only, "MODEL_BUILD_CACHE": "/c"}, command="convert").model_build_cache == Path("/c")
    assert load_settings({"MAX_PAYLOAD_BYTES": "lots"}, command="batch").max_payload_bytes == 10_000_000
    with pytest.raises(ConfigurationError, match="COMPILE"):
        load_settings(worker_only, command="batch")
    with pytest.raises(ConfigurationError, match="JOB_COMPLETION_INDEX"):
        load_settings({"JOB_COMPLETION_INDEX": "x"}, command="batch")
    assert load_settings({"JOB_COMPLETION_INDEX": "x"}, command="worker").job_completion_index is None


def _run(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_commands_refuse_their_own_bad_settings_in_one_line_and_ignore_the_others(tmp_path: Path) -> None:
    # A worker-only variable does not stop the converter: it gets as far as the folder it was asked about.
    verify = _run("model_build", "verify", str(tmp_path / "absent"), env={"COMPILE": "bogus"})
    assert verify.returncode == 1 and "COMPILE" not in verify.stderr and "absent" in verify.stderr
    for module, args in (("worker", ()), ("batch", ("status", str(tmp_path)))):
        result = _run(module, *args, env={"LOG_LEVEL": "chatty"})
        assert result.returncode == 2, result.stderr
        assert "LOG_LEVEL='chatty' is invalid" in result.stderr and "Traceback" not in result.stderr
