"""Settings from file and environment: precedence, and errors that name their source."""

from __future__ import annotations

import pytest

from c360ml.config import Settings, load_settings


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


def test_precedence_defaults_file_environment_then_mlflow_variable(tmp_path):
    config = tmp_path / "c360ml.yaml"
    config.write_text("model_name: from-file\nmlflow_tracking_uri: file-uri\n")
    defaults = load_settings(None, {})
    assert defaults.model_name == "c360-retention" and defaults.mlflow_tracking_uri == ""
    assert load_settings(config, {}).mlflow_tracking_uri == "file-uri"
    env = {"C360ML_MLFLOW_TRACKING_URI": "c360ml-uri"}
    assert load_settings(config, env).mlflow_tracking_uri == "c360ml-uri"
    env["MLFLOW_TRACKING_URI"] = "mlflow-uri"  # MLflow's own variable wins, as MLflow users expect
    assert load_settings(config, env).mlflow_tracking_uri == "mlflow-uri"
    env["MLFLOW_TRACKING_URI"] = ""  # set but empty: not an override
    assert load_settings(config, env).mlflow_tracking_uri == "c360ml-uri"
    assert load_settings(config, {}).model_name == "from-file"


def test_the_file_comes_from_c360ml_config_and_roots_relative_paths(tmp_path, monkeypatch):
    config = tmp_path / "elsewhere.yaml"
    config.write_text("lake_root: my/lake\n")
    monkeypatch.chdir(tmp_path.parent)
    settings = load_settings(None, {"C360ML_CONFIG": str(config)})
    assert settings.lake == tmp_path / "my" / "lake"
    assert load_settings(None, {}).root == tmp_path.parent  # no file: the working directory


def test_a_variable_that_names_no_setting_is_refused_but_secrets_pass():
    with pytest.raises(
        ValueError,
        match="^invalid settings in environment: lake_rot: Extra inputs are not permitted$",
    ):
        load_settings(None, {"C360ML_LAKE_ROT": "/data"})
    secrets = {"C360ML_API_TOKENS": "a,b", "C360ML_API_TOKEN": "a", "C360ML_DEV_NO_AUTH": "1"}
    assert load_settings(None, secrets).model_name == "c360-retention"


def test_an_unreadable_file_is_named(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(
        ValueError, match=f"^settings file {listed} must hold a mapping at the top$"
    ):
        load_settings(listed, {})
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ValueError, match=f"^cannot read settings file {missing}: "):
        load_settings(missing, {})
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("refresh_workers: 0\n")
    with pytest.raises(
        ValueError,
        match=f"^invalid settings in {wrong}: refresh_workers: Input should be greater than or equal to 1$",
    ):
        load_settings(wrong, {})


def test_settings_built_directly_read_no_environment(monkeypatch):
    """Tests and benchmarks build Settings by hand; a variable left in the shell (or set by
    mlflow.set_tracking_uri) must not redirect them to another lake or store."""
    monkeypatch.setenv("C360ML_MODEL_NAME", "from-env")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert Settings().model_name == "c360-retention"
    assert Settings().mlflow_tracking_uri == ""
    assert load_settings(None).model_name == "from-env"  # the process environment by default


def test_a_lake_uri_stays_a_uri(tmp_path):
    """`az://c/p` is not the folder `az:/c/p`: it stays the URI the storage layer takes
    (every command runs on it, with either engine: tests/storage/)."""
    assert Settings(lake_root="az://lake/c360").lake == "az://lake/c360"
    assert Settings(lake_root=tmp_path / "lake").lake == tmp_path / "lake"
