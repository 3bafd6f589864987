"""Where the lake lives: a local folder (the embedded default) or an Azure container.

Why one parser: `lake_root` may name a local folder, `az://container/path` or
`abfss://container@account.dfs.core.windows.net/path` (where Synapse Link lands its export),
and delta-rs, obstore and pyarrow each want that place and its credentials spelled their
own way. `LakeLocation` is the one reading of it; `AzureCredentials` the one reading of the
environment variables that delta-rs / object_store and the Azure SDKs take. Neither ever
shows a secret: their repr and str name the kind of credential only, and `redact` takes
secrets out of any error text that a storage library built (a SAS token rides in URLs).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

LOCAL = "file"
REMOTE_SCHEMES = ("az", "abfss", "abfs", "https")
HINT = (
    "use a local folder, az://container/path or abfss://container@account.dfs.core.windows.net/path"
)
# Azure container names: 3-63 lower-case letters, digits and single hyphens.
CONTAINER = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")
ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
AZURE_HOST = re.compile(r"^(?P<account>[^.]+)\.(?P<service>dfs|blob)\.core\.windows\.net$")


class LakeLocationError(ValueError):
    """A lake root that names no place c360ml can read (the message names the root)."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _first(env: Mapping[str, str], *names: str) -> str:
    """The first of these variables that is set (object_store accepts several spellings)."""
    return next((env[n] for n in names if env.get(n)), "")


@dataclass(frozen=True)
class AzureCredentials:
    """How to reach an Azure storage account, from the environment variables delta-rs /
    object_store read (the Azure SDKs' names for a service principal too).

    Only what is set is passed on; with nothing set, object_store falls back to the
    managed identity of the machine (IMDS). Secrets are marked `secret` and never shown."""

    account_name: str = ""
    account_key: str = field(default="", metadata={"secret": True})
    sas_token: str = field(default="", metadata={"secret": True})
    bearer_token: str = field(default="", metadata={"secret": True})
    client_id: str = ""
    client_secret: str = field(default="", metadata={"secret": True})
    tenant_id: str = ""
    federated_token_file: str = ""
    msi_endpoint: str = ""
    use_azure_cli: bool = False
    use_emulator: bool = False
    endpoint: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AzureCredentials:
        env = os.environ if env is None else env
        return cls(
            account_name=_first(env, "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT"),
            account_key=_first(
                env,
                "AZURE_STORAGE_ACCOUNT_KEY",
                "AZURE_STORAGE_ACCESS_KEY",
                "AZURE_STORAGE_MASTER_KEY",
                "AZURE_STORAGE_KEY",
            ),
            sas_token=_first(env, "AZURE_STORAGE_SAS_KEY", "AZURE_STORAGE_SAS_TOKEN").lstrip("?"),
            bearer_token=_first(env, "AZURE_STORAGE_TOKEN"),
            client_id=_first(env, "AZURE_STORAGE_CLIENT_ID", "AZURE_CLIENT_ID"),
            client_secret=_first(env, "AZURE_STORAGE_CLIENT_SECRET", "AZURE_CLIENT_SECRET"),
            tenant_id=_first(
                env, "AZURE_STORAGE_TENANT_ID", "AZURE_STORAGE_AUTHORITY_ID", "AZURE_TENANT_ID"
            ),
            federated_token_file=_first(env, "AZURE_FEDERATED_TOKEN_FILE"),
            msi_endpoint=_first(env, "AZURE_MSI_ENDPOINT", "AZURE_IDENTITY_ENDPOINT"),
            use_azure_cli=_truthy(env.get("AZURE_USE_AZURE_CLI")),
            use_emulator=_truthy(env.get("AZURE_STORAGE_USE_EMULATOR")),
            endpoint=_first(env, "AZURE_STORAGE_ENDPOINT", "AZURE_ENDPOINT"),
        )

    @property
    def kind(self) -> str:
        """The credential object_store will use, in its order of precedence."""
        if self.use_emulator and not (self.account_key or self.sas_token):
            return "emulator (Azurite's development account)"
        if self.account_key:
            return "account key"
        if self.bearer_token:
            return "bearer token"
        if self.sas_token:
            return "SAS token"
        if self.client_id and self.client_secret and self.tenant_id:
            return "service principal"
        if self.federated_token_file and self.client_id:
            return "workload identity"
        if self.use_azure_cli:
            return "Azure CLI"
        return "managed identity"

    def secrets(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self) if f.metadata.get("secret")]

    def __repr__(self) -> str:
        shown = [
            f"{f.name}={'***' if f.metadata.get('secret') else getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name)
        ]
        return f"AzureCredentials({', '.join(shown)})"

    __str__ = __repr__

    def with_account(self, account: str) -> AzureCredentials:
        """These credentials for the account an abfss:// URL names (the URL wins over the
        environment's account name)."""
        if not account or account == self.account_name:
            return self
        return AzureCredentials(**{**_values(self), "account_name": account})

    def storage_options(self) -> dict[str, str]:
        """delta-rs' `storage_options` (object_store's Azure keys, as strings)."""
        return {
            f"azure_{k}": str(v).lower() if isinstance(v, bool) else v
            for k, v in _config(self).items()
        }

    def obstore_config(self) -> dict[str, Any]:
        """obstore's `AzureConfig` (the same object_store keys, without the prefix)."""
        return _config(self)


# object_store's key for each field (delta-rs prefixes them with "azure_").
_KEYS = {
    "account_name": "storage_account_name",
    "account_key": "storage_account_key",
    "sas_token": "storage_sas_key",
    "bearer_token": "storage_token",
    "client_id": "client_id",
    "client_secret": "client_secret",
    "tenant_id": "tenant_id",
    "federated_token_file": "federated_token_file",
    "msi_endpoint": "msi_endpoint",
    "use_azure_cli": "use_azure_cli",
    "use_emulator": "storage_use_emulator",
    "endpoint": "storage_endpoint",
}
# obstore's AzureConfig names (object_store's short aliases)
_OBSTORE = {
    "storage_account_name": "account_name",
    "storage_account_key": "account_key",
    "storage_sas_key": "sas_key",
    "storage_token": "token",
    "storage_use_emulator": "use_emulator",
    "storage_endpoint": "endpoint",
}


def _values(creds: AzureCredentials) -> dict[str, Any]:
    return {f.name: getattr(creds, f.name) for f in fields(creds)}


def _config(creds: AzureCredentials) -> dict[str, Any]:
    return {_KEYS[k]: v for k, v in _values(creds).items() if v}


def obstore_keys(config: dict[str, Any]) -> dict[str, Any]:
    """object_store's long keys as obstore's `AzureConfig` spells them."""
    return {_OBSTORE.get(k, k): v for k, v in config.items()}


def redact(text: str, secrets: list[str]) -> str:
    """`text` without any of these secrets, nor a URL's SAS signature (`sig=...`)."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return re.sub(r"(?i)\bsig=[^&\s\"'<>]+", "sig=***", text)


@dataclass(frozen=True)
class LakeLocation:
    """A lake root: a local folder, or a container (and a path in it) on Azure storage.

    `uri(*parts)` is what delta-rs opens; `key(*parts)` an object's path in the container
    (what obstore takes, the lake's prefix included)."""

    scheme: str  # "file", or the URI's scheme ("az", "abfss", ...)
    path: str  # local: the absolute folder; remote: the path in the container, no slashes around
    container: str = ""
    account: str = ""  # from an abfss:// or https:// host; "" for az:// (from the environment)
    host: str = ""  # the URL's host for abfss:// and https://

    @property
    def remote(self) -> bool:
        return self.scheme != LOCAL

    def uri(self, *parts: str) -> str:
        if not self.remote:
            return str(Path(self.path).joinpath(*parts))
        key = self.key(*parts)
        if self.scheme == "az":
            return f"az://{self.container}/{key}".rstrip("/")
        if self.scheme == "https":
            return f"https://{self.host}/{self.container}/{key}".rstrip("/")
        return f"{self.scheme}://{self.container}@{self.host}/{key}".rstrip("/")

    def key(self, *parts: str) -> str:
        """An object's key in the container (a local file's path relative to nothing)."""
        joined = str(PurePosixPath(self.path, *parts)) if self.path else "/".join(parts)
        return joined.strip("/") if self.remote else joined

    def __str__(self) -> str:
        return self.uri()


def parse_location(root: str | os.PathLike[str] | LakeLocation) -> LakeLocation:
    """Read a lake root. Raises LakeLocationError naming the root when it names no place
    c360ml can read (an unknown scheme, a missing container, a URI a `Path` collapsed)."""
    if isinstance(root, LakeLocation):
        return root
    if isinstance(root, os.PathLike):
        return _local(Path(root))
    text = str(root).strip()
    if "://" not in text:
        return _local(Path(text))
    scheme = text.split("://", 1)[0].lower()
    if scheme == LOCAL:
        return _local(Path(urlsplit(text).path))
    if scheme not in REMOTE_SCHEMES:
        raise LakeLocationError(f"lake root {text!r}: unsupported scheme {scheme!r}; {HINT}")
    return _remote(text, scheme)


def _local(path: Path) -> LakeLocation:
    """A local folder; a URI that a `Path` collapsed ("az:/c/p") is an error, not a folder."""
    for part in path.parts:
        name = part.rstrip(":").lower()
        if part.endswith(":") and name in (*REMOTE_SCHEMES, "s3", "gs", "http"):
            raise LakeLocationError(
                f"lake root {str(path)!r} is a {name}:// URI read as a local path (its '//' "
                f"was lost): give lake_root as a string; {HINT}"
            )
    # delta-rs names files by the table's real path: a root reached through a symbolic link
    # would not match them.
    return LakeLocation(LOCAL, str(path.resolve()))


def _remote(text: str, scheme: str) -> LakeLocation:
    url = urlsplit(text)
    if url.query or url.fragment:
        raise LakeLocationError(
            f"lake root {_no_query(text)!r}: a URI with a query; put a SAS token in "
            "AZURE_STORAGE_SAS_TOKEN, not in the URI"
        )
    if url.password or (url.username and scheme == "https"):
        raise LakeLocationError(f"lake root {_no_query(text)!r}: credentials in the URI")
    path = url.path.strip("/")
    if scheme == "az":
        container, account, host = url.netloc, "", ""
    elif scheme == "https":
        host = url.netloc
        container, _, path = path.partition("/")
        account = _account(text, host)
    else:
        if "@" not in url.netloc:
            raise LakeLocationError(
                f"lake root {text!r}: no container; expected "
                f"{scheme}://container@account.dfs.core.windows.net/path"
            )
        container, host = url.netloc.split("@", 1)
        account = _account(text, host)
    if not CONTAINER.match(container):
        raise LakeLocationError(
            f"lake root {text!r}: {container!r} is not a container name (3-63 lower-case "
            f"letters, digits and hyphens); {HINT}"
        )
    if "//" in path or any(p in (".", "..") for p in path.split("/")):
        raise LakeLocationError(f"lake root {text!r}: an empty, '.' or '..' path segment")
    return LakeLocation(scheme, path, container, account, host)


def _account(text: str, host: str) -> str:
    found = AZURE_HOST.match(host.lower())
    if found is None or not ACCOUNT.match(found["account"]):
        raise LakeLocationError(
            f"lake root {text!r}: {host!r} is not an Azure storage host "
            "(<account>.dfs.core.windows.net or <account>.blob.core.windows.net)"
        )
    return found["account"]


def _no_query(text: str) -> str:
    return text.split("?", 1)[0]
