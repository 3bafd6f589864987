"""Azurite, Microsoft's Azure Storage emulator, run from the project's own `package.json`.

Why a helper of its own: the storage tests (and, later, any stage test on an `az://` lake)
need a real Blob endpoint on this machine. It installs the pinned npm package into
`node_modules` once when missing (`npm ci`, the lock file's exact tree), starts
`azurite-blob` on a free loopback port with its data in a temporary folder, and creates
containers with a Shared Key request (object stores cannot create one; a real lake's
container exists before c360ml runs).

Run as a script it is what `make demo LAKE=azurite` runs the demo under (standard library
only, so no package needs to be importable): `python tests/storage/azurite.py --location
DIR --container NAME --lake az://NAME/path -- COMMAND...` starts Azurite with its blobs
in DIR, creates the container, runs COMMAND with the environment of a user on Azurite and
`C360ML_LAKE_ROOT` set, stops Azurite, and exits with COMMAND's status.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from email.utils import formatdate
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"  # Azurite's well-known development account (public, in its docs)
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
API_VERSION = "2021-08-06"
START_SECONDS = 60
STOP_SECONDS = 2


def install() -> Path:
    """The `azurite-blob` launcher, installed from package.json / package-lock.json if
    missing (the npm registry is reachable here, as for the Makefile's install)."""
    if not BIN.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is not on PATH: Node 20 and npm are needed to run Azurite")
        lock = (ROOT / "package-lock.json").exists()
        subprocess.run(
            [npm, "ci" if lock else "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=ROOT,
            check=True,
        )
    return BIN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Azurite:
    """One running `azurite-blob` process on 127.0.0.1 (stopped by `stop`)."""

    def __init__(self, location: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        location.mkdir(parents=True, exist_ok=True)
        self._log = open(location / "azurite.log", "wb")  # noqa: SIM115 - closed by stop
        self.proc = subprocess.Popen(
            [
                str(install()),
                "--location", str(location),
                "--blobHost", "127.0.0.1",
                "--blobPort", str(self.port),
                "--skipApiVersionCheck",  # object_store and delta-rs send newer versions
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._wait(location / "azurite.log")

    def _wait(self, log: Path) -> None:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"azurite-blob exited at start: {log.read_text()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"azurite-blob did not listen on {self.url}") from None
                time.sleep(0.1)

    def create_container(self, name: str) -> None:
        """Create a container (Put Container, Shared Key signed with the dev account's key)."""
        date = formatdate(usegmt=True)
        headers = {"x-ms-date": date, "x-ms-version": API_VERSION}
        canonical = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
        resource = f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
        to_sign = "PUT\n" + "\n" * 11 + canonical + resource
        digest = hmac.new(base64.b64decode(ACCOUNT_KEY), to_sign.encode(), hashlib.sha256)
        headers["Authorization"] = (
            f"SharedKey {ACCOUNT}:{base64.b64encode(digest.digest()).decode()}"
        )
        request = urllib.request.Request(
            f"{self.url}/{ACCOUNT}/{name}?restype=container", method="PUT", headers=headers
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # 409: it exists already
                raise

    def stop(self) -> None:
        """Terminate; kill if it still waits for its clients' idle keep-alive connections
        to close (its data is thrown away with the test's folder)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def user_environment(url: str) -> dict[str, str]:
    """This process's environment as a user on Azurite has it: the emulator's flag and its
    port, and no other Azure credential (one would take precedence over the emulator's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "AZURITE_"))}
    return env | {"AZURE_STORAGE_USE_EMULATOR": "true", "AZURITE_BLOB_STORAGE_URL": url}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run a command with a lake on Azurite")
    parser.add_argument("--location", type=Path, required=True, help="Azurite's blob folder")
    parser.add_argument("--container", required=True, help="created if missing")
    parser.add_argument("--lake", required=True, help="C360ML_LAKE_ROOT for the command")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    server = Azurite(args.location.resolve())
    try:
        server.create_container(args.container)
        print(f"Azurite on {server.url}, blobs in {args.location}; lake_root {args.lake}")
        sys.stdout.flush()
        env = user_environment(server.url) | {"C360ML_LAKE_ROOT": args.lake}
        return subprocess.run(command, env=env, check=False).returncode
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
