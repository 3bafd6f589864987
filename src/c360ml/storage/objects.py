"""The files of the lake that are not Delta tables' data: small objects and commits.

Why its own module: c360ml writes some files itself, beside what delta-rs writes (its own
Delta commits, JSON state, the lease), and reads landing files as streams. On a local disk
those are files; on Azure storage, blobs reached through obstore. `LakeStore` is one small
interface over both, addressed by keys relative to the lake root ("gold/t/_delta_log/..."):
read, write, list, delete, a streamed read, and `create`, the atomic put-if-absent that a
Delta commit needs (`os.link` on a local disk; `put(mode="create")` on object storage, where
a rename or link does not exist). Errors name the object's URI, never a credential.
"""

from __future__ import annotations

import io
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs

from c360ml.storage.location import (
    AzureCredentials,
    LakeLocation,
    obstore_keys,
    parse_location,
    redact,
)

CHUNK = 8 * 2**20  # bytes per chunk of a streamed read


class ContainerNotFoundError(FileNotFoundError):
    """The lake's container does not exist (not an object missing in it)."""


class ObjectChangedError(OSError):
    """A conditional write found the object changed since it was read (a lease renewed or
    taken over by another holder)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What tells one version of an object from another: its size and an identity that
    changes with each write (a blob's ETag; a file's inode and modification time)."""

    key: str
    size: int
    identity: str


class LakeStore:
    """Keys under a lake root, on local disk or object storage (see the module docstring)."""

    location: LakeLocation

    def uri(self, key: str = "") -> str:
        return self.location.uri(*([key] if key else []))

    # The primitives each store implements.
    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write (or replace) a whole object, atomically: a reader sees the old or the new."""
        raise NotImplementedError

    def create(self, key: str, data: bytes) -> None:
        """Write an object only if absent; FileExistsError (naming it) when it exists."""
        raise NotImplementedError

    def head(self, key: str) -> ObjectInfo | None:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Every key below `prefix` (a folder), recursively, sorted."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove an object; one that is gone already is no error."""
        raise NotImplementedError

    def folders(self, prefix: str) -> list[str]:
        """The keys of the folders directly below `prefix` (one level, sorted)."""
        raise NotImplementedError

    def iter_bytes(self, key: str, chunk: int = CHUNK) -> Iterator[bytes]:
        """The object's bytes in chunks, never held whole (landing CSVs are large)."""
        raise NotImplementedError

    def sizes(self, prefix: str) -> dict[str, int]:
        """Every key below `prefix` (a folder), recursively, with its size in bytes: one
        listing, where a `head` per object would be a request each."""
        raise NotImplementedError

    def open_stream(self, key: str, size: int | None = None) -> BinaryIO:
        """A readable binary stream of the object, read in pieces as it is consumed (never
        copied whole, to memory or to local disk first); `size`, when the caller knows it
        from a listing, saves a request. Close it after use (a `with` block)."""
        raise NotImplementedError

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem for Parquet and CSV readers, and the path of the lake root
        in it (join keys to it with `arrow_path`)."""
        raise NotImplementedError

    # Shared helpers.
    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def arrow_path(self, key: str) -> str:
        base = self.filesystem()[1]
        return f"{base.rstrip('/')}/{key}" if base else key

    def open_input(self, key: str) -> pa.NativeFile:
        """A seekable pyarrow file (Parquet footers, CSV readers that stream)."""
        fs, _ = self.filesystem()
        return fs.open_input_file(self.arrow_path(key))

    def open_output(self, key: str) -> pa.NativeFile:
        """A writable pyarrow stream of a new object, replacing any (a Parquet or CSV
        writer writes into it as it goes, not into a copy held whole). Close it after use."""
        fs, _ = self.filesystem()
        return fs.open_output_stream(self.arrow_path(key))


class LocalStore(LakeStore):
    """The embedded default: files under a local folder, written as c360ml always did."""

    def __init__(self, location: LakeLocation) -> None:
        self.location = location
        self.root = Path(location.path)

    def _file(self, key: str) -> Path:
        return self.root / key if key else self.root

    def read_bytes(self, key: str) -> bytes:
        return self._file(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self._file(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(f".{target.name}.{uuid.uuid4()}.tmp")
        staged.write_bytes(data)
        os.replace(staged, target)

    def create(self, key: str, data: bytes) -> None:
        """Staged under a unique name, then linked to its key: `os.link` fails if the key
        exists, so of two writers exactly one publishes, and a reader never sees it half
        written."""
        target = self._file(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(f".{target.name}.{uuid.uuid4()}.tmp")
        staged.write_bytes(data)
        try:
            os.link(staged, target)
        except FileExistsError:
            raise FileExistsError(f"{target} exists already") from None
        finally:
            staged.unlink()

    def head(self, key: str) -> ObjectInfo | None:
        try:
            found = self._file(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, found.st_size, f"{found.st_ino}:{found.st_mtime_ns}")

    def list(self, prefix: str = "") -> list[str]:
        base = self._file(prefix)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def delete(self, key: str) -> None:
        self._file(key).unlink(missing_ok=True)

    def folders(self, prefix: str) -> list[str]:
        base = self._file(prefix)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.iterdir() if p.is_dir())

    def iter_bytes(self, key: str, chunk: int = CHUNK) -> Iterator[bytes]:
        with open(self._file(key), "rb") as handle:
            while block := handle.read(chunk):
                yield block

    def sizes(self, prefix: str) -> dict[str, int]:
        base = self._file(prefix)
        if not base.is_dir():
            return {}
        return {
            p.relative_to(self.root).as_posix(): p.stat().st_size
            for p in sorted(base.rglob("*"))
            if p.is_file()
        }

    def open_output(self, key: str) -> pa.NativeFile:
        """The file, its folder created first (as a local writer always did)."""
        self._file(key).parent.mkdir(parents=True, exist_ok=True)
        return super().open_output(key)

    def open_stream(self, key: str, size: int | None = None) -> BinaryIO:
        """Arrow's own file stream: its CSV reader reads it without the GIL, as fast as a
        path (a Python file object would be read through the interpreter)."""
        try:
            return pa.input_stream(str(self._file(key)))  # type: ignore[return-value]
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(key)}: no such file") from None

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), str(self.root)


class AzureLakeStore(LakeStore):
    """Blobs under a container's path, through obstore (object_store, the store delta-rs
    uses too, configured from the same credentials)."""

    def __init__(self, location: LakeLocation, credentials: AzureCredentials | None = None):
        self.location = location
        self.credentials = (credentials or AzureCredentials.from_env()).with_account(
            location.account
        )

    def __repr__(self) -> str:
        return f"AzureLakeStore({self.location.uri()!r}, {self.credentials.kind})"

    @cached_property
    def _store(self) -> Any:
        from obstore.store import AzureStore

        with self._errors(""):
            return AzureStore(
                self.location.container,
                prefix=self.location.path or None,
                config=obstore_keys(self.credentials.obstore_config()),
                client_options={"allow_http": True} if _plain_http(self.credentials) else None,
            )

    def storage_options(self) -> dict[str, str]:
        """delta-rs' storage_options for this lake (secrets included: never log them)."""
        options = self.credentials.storage_options()
        if _plain_http(self.credentials):
            options["allow_http"] = "true"
        return options

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """obstore's errors as Python's, in one line naming the object's URI, without any
        secret (a SAS token rides in the request URLs that obstore's messages quote)."""
        from obstore import exceptions as oe

        try:
            yield
        except (oe.BaseError, OSError) as exc:  # obstore raises some as Python's own
            raise _translate(exc, self.uri(key), self.credentials) from None

    def read_bytes(self, key: str) -> bytes:
        import obstore

        with self._errors(key):
            return bytes(obstore.get(self._store, key).bytes())

    def write_bytes(self, key: str, data: bytes) -> None:
        import obstore

        with self._errors(key):
            obstore.put(self._store, key, data, mode="overwrite")

    def create(self, key: str, data: bytes) -> None:
        import obstore

        with self._errors(key):
            obstore.put(self._store, key, data, mode="create")

    def replace(self, key: str, data: bytes, identity: str) -> str:
        """Overwrite the object only if it is still the version `identity` names (its
        ETag); ObjectChangedError otherwise. Returns the new version's identity."""
        import obstore

        with self._errors(key):
            done = obstore.put(self._store, key, data, mode={"e_tag": identity})
        return done["e_tag"] or ""

    def create_tagged(self, key: str, data: bytes) -> str:
        """`create`, returning the new object's identity (for a later `replace`)."""
        import obstore

        with self._errors(key):
            done = obstore.put(self._store, key, data, mode="create")
        return done["e_tag"] or ""

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and the identity of the version read, from one request."""
        import obstore

        with self._errors(key):
            got = obstore.get(self._store, key)
            return bytes(got.bytes()), got.meta["e_tag"] or ""

    def head(self, key: str) -> ObjectInfo | None:
        import obstore

        try:
            with self._errors(key):
                meta = obstore.head(self._store, key)
        except ContainerNotFoundError:
            raise
        except FileNotFoundError:
            return None
        return ObjectInfo(key, meta["size"], meta["e_tag"] or str(meta["last_modified"]))

    def list(self, prefix: str = "") -> list[str]:
        import obstore

        with self._errors(prefix):
            stream = obstore.list(self._store, prefix=prefix.rstrip("/") + "/" if prefix else None)
            return sorted(meta["path"] for chunk in stream for meta in chunk)

    def delete(self, key: str) -> None:
        import obstore

        try:
            with self._errors(key):
                obstore.delete(self._store, key)
        except ContainerNotFoundError:
            raise
        except FileNotFoundError:
            pass

    def folders(self, prefix: str) -> list[str]:
        """One listing per 1,000 entries of this level only (a table's data files below are
        not listed, as a recursive listing would)."""
        import obstore

        with self._errors(prefix):
            found = obstore.list_with_delimiter(self._store, prefix.rstrip("/") + "/")
        return sorted(p.rstrip("/") for p in found["common_prefixes"])

    def iter_bytes(self, key: str, chunk: int = CHUNK) -> Iterator[bytes]:
        """A ranged read per chunk (see `open_stream`: one streamed GET could outlive the
        request timeout while the caller works on its chunks)."""
        info = self.head(key)
        if info is None:
            raise FileNotFoundError(f"{self.uri(key)}: no such object")
        for start in range(0, info.size, chunk):
            yield self.get_range(key, start, min(chunk, info.size - start))

    def sizes(self, prefix: str) -> dict[str, int]:
        import obstore

        with self._errors(prefix):
            stream = obstore.list(self._store, prefix=prefix.rstrip("/") + "/" if prefix else None)
            return {meta["path"]: meta["size"] for chunk in stream for meta in chunk}

    def open_stream(self, key: str, size: int | None = None) -> BinaryIO:
        """Ranged reads of CHUNK bytes, each a request of its own: one streamed GET of a
        large blob would outlive the HTTP client's request timeout while the reader parses
        its rows (object_store's timeout covers the whole body)."""
        if size is None:
            info = self.head(key)
            if info is None:
                raise FileNotFoundError(f"{self.uri(key)}: no such object")
            size = info.size
        return io.BufferedReader(_RangeReader(self, key, size), buffer_size=CHUNK)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        import obstore

        with self._errors(key):
            return bytes(obstore.get_range(self._store, key, start=start, length=length))

    def open_output(self, key: str) -> _Upload:  # type: ignore[override]
        """obstore's buffered writer (a multipart upload past its buffer), its errors the
        store's: one line naming the blob, no credential (a writer's own errors quote the
        request, and a SAS token rides in request URLs)."""
        return _Upload(self, key)

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        return self._arrow_fs, ""

    def fsspec(self) -> Any:
        """An fsspec filesystem (obstore's) reading this account's objects by the URIs
        delta-rs names a table's files with (`az://container/...`, `abfss://...`): what
        DuckDB reads Parquet through where it has no Azure extension of its own (its
        extensions are downloaded at run time). Its files are read as `_SharedReader`s."""
        with self._errors(""):
            return _positional_fsspec()(
                self.location.scheme,
                config=obstore_keys(self.credentials.obstore_config()),
                client_options={"allow_http": True} if _plain_http(self.credentials) else None,
            )

    @cached_property
    def _arrow_fs(self) -> pafs.FileSystem:
        """delta-rs' own pyarrow filesystem on the lake root (the object store its tables
        are read through, with the same storage options)."""
        from deltalake.fs import DeltaStorageHandler

        return pafs.PyFileSystem(DeltaStorageHandler(self.uri(), self.storage_options()))


@cache
def _positional_fsspec() -> type:
    """obstore's fsspec filesystem, its files opened for reading as `_SharedReader`s."""
    from obstore.fsspec import FsspecStore

    class PositionalReads(FsspecStore):
        def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
            if mode != "rb":
                return super()._open(path, mode, **kwargs)
            bucket, key = self._split_path(path)
            store = self._construct_store(bucket)
            return _SharedReader(store, key, int(store.head(key)["size"]))

    return PositionalReads


class _SharedReader(io.RawIOBase):
    """A blob read by ranges, with a position per thread.

    Why: DuckDB's threads read row groups of one Parquet file through one handle, each as
    a seek and then a read; with one shared position (obstore's own file) a thread's read
    could start where another thread's seek put it, and the Parquet reader found
    corrupt data. Each thread's seek and read happen on that thread, so a position per
    thread keeps them paired; each read is one ranged GET."""

    def __init__(self, store: Any, key: str, size: int) -> None:
        self._store, self._key, self.size = store, key, size
        self._at = threading.local()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return getattr(self._at, "position", 0)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: self.size}[whence]
        self._at.position = max(0, base + offset)
        return self._at.position

    def read(self, size: int = -1) -> bytes:
        import obstore

        start = self.tell()
        length = self.size - start if size is None or size < 0 else min(size, self.size - start)
        if length <= 0:
            return b""
        data = bytes(obstore.get_range(self._store, self._key, start=start, length=length))
        self._at.position = start + len(data)
        return data

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer (memoryview)
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _Upload(io.RawIOBase):
    """A new blob written as a stream (see `AzureLakeStore.open_output`).

    Every call that reaches the container goes through the store's error translation.
    A `with` block left by an exception drops the upload instead of completing it, so a
    writer that failed halfway never publishes a truncated file under the key."""

    def __init__(self, store: AzureLakeStore, key: str) -> None:
        import obstore

        self._owner, self._key, self._written = store, key, 0
        with store._errors(key):
            self._writer = obstore.open_writer(store._store, key)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._written

    def write(self, data) -> int:  # noqa: ANN001 - bytes or any buffer (a pyarrow Buffer)
        size = memoryview(data).nbytes
        with self._owner._errors(self._key):
            self._writer.write(data)
        self._written += size
        return size

    def flush(self) -> None:
        """Nothing to do: the writer sends its buffer when full and the rest at `close`."""

    def close(self) -> None:
        if self.closed:
            return
        try:
            with self._owner._errors(self._key):
                self._writer.close()
        finally:
            super().close()

    def __exit__(self, kind, *rest) -> None:  # noqa: ANN001
        if kind is None:
            self.close()
        else:  # the writer is dropped unfinished: no block list is committed
            del self._writer
            super().close()


class _RangeReader(io.RawIOBase):
    """A blob as a raw stream: each read is one ranged GET (buffered by the caller)."""

    def __init__(self, store: AzureLakeStore, key: str, size: int) -> None:
        self._store, self._key, self._size, self._at = store, key, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer (memoryview)
        length = min(len(buffer), self._size - self._at)
        if length <= 0:
            return 0
        data = self._store.get_range(self._key, self._at, length)
        buffer[: len(data)] = data
        self._at += len(data)
        return len(data)


def upload_folder(folder: Path, store: LakeStore, prefix: str) -> list[str]:
    """Copy a local folder's files to `prefix` in the store (what a Synapse Link export
    copied into a lake's `landing/` looks like). The `model.json` files go last, as
    Synapse Link writes a sync folder's model.json after its data files: a reader that
    finds a model.json finds every file it lists. Returns the keys written."""
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file()),
        key=lambda p: (p.name == "model.json", p.as_posix()),
    )
    done = []
    for path in files:
        key = f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}"
        if path.stat().st_size <= CHUNK:
            store.write_bytes(key, path.read_bytes())
        else:  # streamed: a partition of a large export is never held whole
            with open(path, "rb") as source, store.open_output(key) as target:
                while block := source.read(CHUNK):
                    target.write(block)
        done.append(key)
    return done


def _plain_http(credentials: AzureCredentials) -> bool:
    return credentials.use_emulator or credentials.endpoint.startswith("http://")


AUTH_FAILURES = (
    "AuthorizationFailure",
    "AuthenticationFailed",
    "AuthorizationPermissionMismatch",
    "lacked the necessary privileges",
    "403 Forbidden",
    "401 Unauthorized",
)

# why a request found no endpoint, most specific first (as `_cause` reports it)
UNREACHABLE = ("Connection refused", "dns error", "tcp connect error", "error sending request")


def known_error(exc: Exception, uri: str, credentials: AzureCredentials) -> Exception | None:
    """The error a user can act on, in one line naming `uri`, for what any storage library
    (obstore, delta-rs) reports of Azure: a missing container, a refused credential;
    None for anything else."""
    from obstore import exceptions as oe

    text = str(exc)
    if "ContainerNotFound" in text:
        return ContainerNotFoundError(f"{uri}: the container does not exist")
    denied = oe.PermissionDeniedError | oe.UnauthenticatedError | PermissionError
    if isinstance(exc, denied) or any(marker in text for marker in AUTH_FAILURES):
        return PermissionError(f"{uri}: access denied with the {credentials.kind} credential")
    if any(marker in text for marker in UNREACHABLE):
        return ConnectionError(f"{uri}: the storage endpoint cannot be reached ({_cause(text)})")
    return None


def _cause(text: str) -> str:
    """The most specific of the reasons a failed connection is reported with."""
    return next(marker for marker in UNREACHABLE if marker in text)


def first_line(exc: Exception, credentials: AzureCredentials) -> str:
    """The first line of an error's text, without any secret."""
    text = redact(str(exc), credentials.secrets())
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


def _translate(exc: Exception, uri: str, credentials: AzureCredentials) -> OSError:
    from obstore import exceptions as oe

    found = known_error(exc, uri, credentials)
    if isinstance(found, OSError):
        return found
    if isinstance(exc, oe.NotFoundError | FileNotFoundError):
        return FileNotFoundError(f"{uri}: no such object")
    if isinstance(exc, oe.AlreadyExistsError | FileExistsError):
        return FileExistsError(f"{uri} exists already")
    if isinstance(exc, oe.PreconditionError):
        return ObjectChangedError(f"{uri} was changed by another writer")
    return OSError(f"{uri}: {first_line(exc, credentials)}")


def open_store(root: str | os.PathLike[str] | LakeLocation) -> LakeStore:
    """The store of a lake root (see `c360ml.storage.location.parse_location`)."""
    location = parse_location(root)
    return AzureLakeStore(location) if location.remote else LocalStore(location)
