"""Lake roots and credentials: what each URI form means, clear errors for bad ones, and no
secret in any repr, str or message."""

from __future__ import annotations

from pathlib import Path

import pytest

from c360ml.storage.lake import Lake
from c360ml.storage.location import (
    AzureCredentials,
    LakeLocationError,
    parse_location,
    redact,
)

KEY = "c2VjcmV0LWFjY291bnQta2V5LXRoYXQtbXVzdC1uZXZlci1zaG93"
CLIENT_SECRET = "sp-secret-value-9f8e7d"
SAS = "sv=2022-11-02&ss=b&sp=rwdl&sig=SASSIGNATURE123%3D"


def test_abfss_names_container_account_and_path():
    loc = parse_location("abfss://synapse@contosolake.dfs.core.windows.net/dynamics/lake/")
    assert (loc.scheme, loc.container, loc.account, loc.path) == (
        "abfss",
        "synapse",
        "contosolake",
        "dynamics/lake",
    )
    assert loc.remote
    assert loc.uri("gold", "orders") == (
        "abfss://synapse@contosolake.dfs.core.windows.net/dynamics/lake/gold/orders"
    )
    assert loc.key("gold", "orders") == "dynamics/lake/gold/orders"


def test_az_names_container_and_path_and_takes_the_account_from_the_environment():
    loc = parse_location("az://lake/c360ml")
    assert (loc.scheme, loc.container, loc.account, loc.path) == ("az", "lake", "", "c360ml")
    assert loc.uri("state", "x.json") == "az://lake/c360ml/state/x.json"
    assert parse_location("az://lake").uri("gold") == "az://lake/gold"


def test_https_partition_urls_resolve_like_abfss():
    loc = parse_location("https://contosolake.dfs.core.windows.net/synapse/dyn/model.json")
    assert (loc.container, loc.account, loc.path) == ("synapse", "contosolake", "dyn/model.json")


def test_a_local_folder_stays_a_resolved_local_folder(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    loc = parse_location(tmp_path / "link")
    assert not loc.remote and loc.path == str(tmp_path / "real")
    assert parse_location(f"file://{tmp_path}/real").path == str(tmp_path / "real")
    assert Lake(tmp_path / "link").root == tmp_path / "real"  # as before: a Path


@pytest.mark.parametrize(
    ("root", "message"),
    [
        ("s3://bucket/lake", r"'s3://bucket/lake': unsupported scheme 's3'"),
        ("abfss://contosolake.dfs.core.windows.net/lake", r"no container; expected abfss://"),
        ("az://Bad_Container/lake", r"'Bad_Container' is not a container name"),
        ("abfss://c1x@contoso.example.com/lake", r"'contoso.example.com' is not an Azure"),
        ("az://lake/a//b", r"an empty, '.' or '..' path segment"),
        (f"az://lake/x?{SAS}", r"'az://lake/x': a URI with a query; put a SAS token in"),
        # what a pathlib.Path makes of an az:// URI: never a local folder named "az:"
        (Path("az://lake/c360ml"), r"'az:/lake/c360ml' is a az:// URI read as a local path"),
        (Path("/work/abfss:/c@a/x"), r"is a abfss:// URI read as a local path"),
    ],
)
def test_bad_roots_fail_with_one_line_naming_them(root, message):
    with pytest.raises(LakeLocationError, match=message) as caught:
        Lake(root)
    assert "\n" not in str(caught.value)
    assert "SASSIGNATURE" not in str(caught.value)


def test_every_credential_kind_is_read_from_the_environment():
    def kind(**env):
        return AzureCredentials.from_env(env).kind

    assert kind(AZURE_STORAGE_ACCOUNT_NAME="a", AZURE_STORAGE_ACCOUNT_KEY=KEY) == "account key"
    assert kind(AZURE_STORAGE_SAS_TOKEN="?" + SAS) == "SAS token"
    sp = {"AZURE_CLIENT_ID": "id", "AZURE_CLIENT_SECRET": CLIENT_SECRET, "AZURE_TENANT_ID": "t"}
    assert kind(**sp) == "service principal"
    assert kind(AZURE_USE_AZURE_CLI="true") == "Azure CLI"
    assert kind() == "managed identity"
    assert kind(AZURE_STORAGE_USE_EMULATOR="1").startswith("emulator")
    creds = AzureCredentials.from_env({"AZURE_STORAGE_SAS_TOKEN": "?" + SAS})
    assert creds.sas_token == SAS  # the leading '?' of a copied SAS URL query is dropped


def test_credentials_become_delta_rs_and_obstore_options():
    env = {
        "AZURE_STORAGE_ACCOUNT_NAME": "contosolake",
        "AZURE_STORAGE_ACCOUNT_KEY": KEY,
        "AZURE_CLIENT_ID": "id",
        "AZURE_STORAGE_USE_EMULATOR": "false",
    }
    creds = AzureCredentials.from_env(env)
    assert creds.storage_options() == {
        "azure_storage_account_name": "contosolake",
        "azure_storage_account_key": KEY,
        "azure_client_id": "id",
    }
    assert creds.obstore_config()["storage_account_key"] == KEY
    # the account of an abfss:// URL wins over the environment's
    assert creds.with_account("other").storage_options()["azure_storage_account_name"] == "other"


def test_no_secret_in_repr_str_or_redacted_messages():
    env = {
        "AZURE_STORAGE_ACCOUNT_NAME": "contosolake",
        "AZURE_STORAGE_ACCOUNT_KEY": KEY,
        "AZURE_STORAGE_SAS_TOKEN": SAS,
        "AZURE_CLIENT_SECRET": CLIENT_SECRET,
        "AZURE_STORAGE_TOKEN": "bearer-token-xyz",
    }
    creds = AzureCredentials.from_env(env)
    for shown in (repr(creds), str(creds), f"{creds}", repr([creds])):
        assert "contosolake" in shown
        for secret in (KEY, SAS, "SASSIGNATURE123", CLIENT_SECRET, "bearer-token-xyz"):
            assert secret not in shown
    message = f"GET https://x.blob.core.windows.net/c/k?{SAS} failed; key {KEY}"
    cleaned = redact(message, creds.secrets())
    assert KEY not in cleaned and "SASSIGNATURE123" not in cleaned
    # a signature not among the known secrets (another SAS in a URL) goes too
    assert redact("https://h/c?sv=1&sig=OTHER%2Bsig&se=2", []) == "https://h/c?sv=1&sig=***&se=2"


def test_every_option_is_one_obstore_accepts():
    """obstore refuses an unknown configuration key: each credential field maps to one."""
    from obstore.store import AzureStore

    from c360ml.storage.location import obstore_keys

    env = {
        "AZURE_STORAGE_ACCOUNT_NAME": "contosolake",
        "AZURE_STORAGE_ACCOUNT_KEY": KEY,
        "AZURE_STORAGE_SAS_TOKEN": SAS,
        "AZURE_STORAGE_TOKEN": "bearer",
        "AZURE_CLIENT_ID": "id",
        "AZURE_CLIENT_SECRET": CLIENT_SECRET,
        "AZURE_TENANT_ID": "tenant",
        "AZURE_FEDERATED_TOKEN_FILE": "/var/run/token",
        "AZURE_MSI_ENDPOINT": "http://169.254.169.254/metadata/identity/oauth2/token",
        "AZURE_USE_AZURE_CLI": "true",
        "AZURE_STORAGE_USE_EMULATOR": "true",
        "AZURE_STORAGE_ENDPOINT": "https://contosolake.blob.core.windows.net",
    }
    creds = AzureCredentials.from_env(env)
    config = obstore_keys(creds.obstore_config())
    assert len(config) == 12  # every field set
    store = AzureStore("lake", config=config)  # builds without a request
    assert store.config["sas_key"] == SAS and store.config["use_azure_cli"] in (True, "true")
