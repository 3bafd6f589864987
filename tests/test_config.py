"""Settings from file and environment: precedence, and errors that name their source."""

from __future__ import annotations

import pytest

from c360ml.config import load_settings


def test_environment_overrides_the_file_and_nests(tmp_path):
    config = tmp_path / "c360ml.yaml"
    config.write_text("model_name: from-file\ngate:\n  max_label_rate_change: 0.2\n")
    env = {"C360ML_MODEL_NAME": "from-env", "C360ML_GATE__REQUIRE_APPROVAL": "true"}
    settings = load_settings(config, env)
    assert settings.model_name == "from-env"
    assert settings.gate.require_approval is True and settings.gate.max_label_rate_change == 0.2
    assert settings.root == tmp_path
    assert load_settings(config, {"C360ML_SOURCES": '["generic"]'}).sources == ("generic",)


def test_a_malformed_variable_is_named():
    with pytest.raises(ValueError, match="environment variable C360ML_SOURCES is not valid JSON"):
        load_settings(None, {"C360ML_SOURCES": '["d365", '})
    with pytest.raises(
        ValueError,
        match="^invalid settings in environment: gate.max_score: Extra inputs are not permitted$",
    ):
        load_settings(None, {"C360ML_GATE__MAX_SCORE": "1"})
