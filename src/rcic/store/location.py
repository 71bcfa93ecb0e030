"""Where a packed store lives: a local folder, or an object-store URL (``s3://``, ``gs://``, ``file://``).

One small interface (read a key or a byte range of it, write a key, list a prefix) over a local
folder and any fsspec filesystem, plus the zarr store object for the same place. Credentials
come only from the storage library's standard environment and config files (for S3:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``~/.aws``). Errors of
the remote side (no credentials, an unreachable endpoint, a missing bucket) become one-line
``DataError``s that name the URL.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from rcic.atomic import atomic_path
from rcic.errors import DataError

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "memory://")
# fail fast where an endpoint is unreachable, instead of botocore's long default retries
S3_OPTIONS = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}}}


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def normalize(path: str | Path) -> str | Path:
    """``file://`` URLs become local paths; other URLs stay strings; anything else is a Path."""
    text = str(path)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    if is_url(text):
        if not text.startswith(REMOTE_SCHEMES):
            raise DataError("unsupported URL scheme (use a local path, file://, s3://, gs:// or az://)", text)
        return text.rstrip("/")
    return Path(path)


def storage_options(url: str) -> dict:
    return dict(S3_OPTIONS) if url.startswith("s3://") else {}


# the filesystem package fsspec needs for each scheme (an ImportError names it)
PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


class NotFound(DataError):
    """A key or object that is not in the store (told apart by type, never by the words of a message)."""


@contextmanager
def remote_errors(url: str):
    """Translate what an object store says into one line naming the URL."""
    try:
        yield
    except DataError:
        raise
    except ImportError:
        scheme = str(url).split("://", 1)[0]
        package = PACKAGES.get(scheme)
        if package is None:
            raise
        raise DataError(f"{scheme}:// URLs need the {package} package: pip install {package}", url) from None
    except FileNotFoundError as err:
        raise NotFound(f"not found ({_first_line(err)})", url) from None
    except PermissionError as err:
        raise DataError(f"access denied ({_first_line(err)})", url) from None
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # the environment: reported as such
            raise OSError(err.errno, os.strerror(err.errno), err.filename or url) from None
        _translate(err, url)
    except Exception as err:  # botocore / aiohttp / gcsfs raise their own types
        _translate(err, url)


def _error_types() -> dict[str, tuple[type[BaseException], ...]]:
    """The exception types of the storage libraries that are installed, by what they mean."""
    kinds: dict[str, list[type[BaseException]]] = {"credentials": [], "unreachable": [TimeoutError, ConnectionError],
                                                   "refused": []}
    try:
        import botocore.exceptions as boto

        kinds["credentials"] += [boto.NoCredentialsError, boto.PartialCredentialsError,
                                 boto.CredentialRetrievalError]
        kinds["unreachable"] += [boto.EndpointConnectionError, boto.ConnectTimeoutError, boto.ReadTimeoutError,
                                 boto.ConnectionClosedError, boto.ProxyConnectionError]
        kinds["refused"] += [boto.ClientError]
    except ImportError:
        pass
    try:
        import aiohttp

        kinds["unreachable"] += [aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError]
        kinds["refused"] += [aiohttp.ClientResponseError]
    except ImportError:
        pass
    try:
        import google.auth.exceptions as google_auth

        kinds["credentials"] += [google_auth.DefaultCredentialsError, google_auth.RefreshError]
    except ImportError:
        pass
    return {k: tuple(v) for k, v in kinds.items()}


def _chain(err: BaseException):
    """The error and the errors it was raised from (s3fs wraps botocore's in an OSError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _translate(err: BaseException, url: str) -> NoReturn:
    """Name what happened by the exception's type (and a client error's code), or keep the original."""
    kinds = _error_types()
    for cause in _chain(err):
        if isinstance(cause, kinds["credentials"]):
            raise DataError("no credentials for this object store (set them as the storage library reads them, "
                            "e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)", url) from None
        if isinstance(cause, kinds["unreachable"]):
            raise DataError(f"cannot reach the object store ({type(cause).__name__})", url) from None
        if isinstance(cause, kinds["refused"]):
            code = (getattr(cause, "response", None) or {}).get("Error", {}).get("Code")
            if code == "NoSuchBucket":
                raise DataError("the bucket does not exist", url) from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
                raise DataError(f"the object store refused the credentials ({code})", url) from None
            raise DataError(f"the object store refused the request ({_first_line(cause)})", url) from None
    if isinstance(err, OSError):  # s3fs's translation of an error it has no type for: still about this URL
        raise DataError(f"the object store failed ({_first_line(err)})", url) from None
    raise err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


class Location:
    """A store's root: ``read``/``write``/``exists``/``list`` keys below it, and its zarr store."""

    def __init__(self, root: str | Path):
        self.root = normalize(root)
        self.remote = isinstance(self.root, str)
        self._fs, self._pid = None, None

    def __str__(self) -> str:
        return str(self.root)

    def __getstate__(self):  # each process (DataLoader worker) opens its own client
        return {"root": self.root, "remote": self.remote, "_fs": None, "_pid": None}

    @property
    def fs(self):
        """This process's client: a forked DataLoader worker opens its own (async clients are not fork-safe)."""
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            with remote_errors(str(self.root)):
                self._fs, _ = fsspec.core.url_to_fs(str(self.root), skip_instance_cache=True,
                                                    **storage_options(str(self.root)))
            self._pid = os.getpid()
        return self._fs

    def key(self, *parts: str) -> str | Path:
        if self.remote:
            return "/".join([self.root, *parts])
        return self.root.joinpath(*parts)

    def read(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """A key's bytes (``start``/``end``: a byte range; negative ``start`` counts from the end)."""
        path = self.key(key)
        if not self.remote:
            try:
                with open(path, "rb") as f:
                    if start is None:
                        return f.read()
                    if start < 0:  # a file shorter than asked for (a cut shard) gives fewer bytes, never EINVAL
                        f.seek(max(0, os.fstat(f.fileno()).st_size + start))
                        return f.read()
                    f.seek(start)
                    return f.read(end - start)
            except (FileNotFoundError, NotADirectoryError):
                raise FileNotFoundError(errno.ENOENT, "not found", str(path)) from None
            except IsADirectoryError:
                raise DataError("is a folder where the store holds a file: the store is damaged", path) from None
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                    raise
                raise DataError(f"cannot read ({err.strerror or err})", path) from None
        with remote_errors(str(path)):
            if start is not None and start < 0:
                size = self.fs.size(path)
                return self.fs.cat_file(path, start=max(0, size + start), end=size)
            return self.fs.cat_file(path, start=start, end=end)

    def read_many(self, keys: list[str]) -> list[bytes | None]:
        """Several keys whole (concurrently from an object store); None for a key that is not there."""
        if not self.remote:
            out = []
            for key in keys:
                try:
                    out.append(self.read(key))
                except FileNotFoundError:
                    out.append(None)
            return out
        paths = [str(self.key(k)) for k in keys]
        with remote_errors(str(self.root)):
            got = self.fs.cat_ranges(paths, [None] * len(paths), [None] * len(paths), on_error="return") \
                if paths else []
            out = []
            for value in got:
                if isinstance(value, FileNotFoundError):
                    out.append(None)
                elif isinstance(value, BaseException):
                    raise value
                else:
                    out.append(value)
            return out

    def write(self, key: str, data: bytes) -> None:
        """Write a key whole (atomically: a local temp file renamed; an object PUT is atomic)."""
        path = self.key(key)
        if not self.remote:
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            return
        with remote_errors(str(path)):
            self.fs.pipe_file(path, data)

    def exists(self, key: str) -> bool:
        path = self.key(key)
        if not self.remote:
            return Path(path).exists()
        with remote_errors(str(path)):
            return self.fs.exists(path)

    def list(self, key: str) -> list[str]:
        """Names directly below a key (empty where there is none)."""
        path = self.key(key)
        if not self.remote:
            return os.listdir(path) if Path(path).is_dir() else []
        with remote_errors(str(path)):
            try:
                return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
            except FileNotFoundError:
                return []

    def delete(self, key: str) -> None:
        path = self.key(key)
        if not self.remote:
            Path(path).unlink(missing_ok=True)
            return
        with remote_errors(str(path)):
            if self.fs.exists(path):
                self.fs.rm_file(path)

    def check_bucket(self) -> None:
        """For a URL: the bucket (or container) must exist; a clear error instead of 'not found' later."""
        if not self.remote:
            return
        bucket = self.root.split("://", 1)[1].split("/", 1)[0]
        scheme = self.root.split("://", 1)[0]
        with remote_errors(str(self.root)):
            try:
                self.fs.info(f"{scheme}://{bucket}")  # unlike exists(), says why it cannot answer
            except FileNotFoundError:
                raise DataError(f"the bucket {bucket} does not exist", self.root) from None

    def zarr_store(self, read_only: bool = False):
        import zarr

        if not self.remote:
            return zarr.storage.LocalStore(self.root, read_only=read_only)
        with remote_errors(str(self.root)):
            return zarr.storage.FsspecStore.from_url(str(self.root), storage_options=storage_options(str(self.root)),
                                                     read_only=read_only)
