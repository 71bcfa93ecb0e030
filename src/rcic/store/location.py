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


@contextmanager
def remote_errors(url: str):
    """Translate what an object store says into one line naming the URL."""
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError as err:
        raise DataError(f"not found ({_first_line(err)})", url) from None
    except PermissionError as err:
        raise DataError(f"access denied ({_first_line(err)})", url) from None
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # the environment: reported as such
            raise OSError(err.errno, os.strerror(err.errno), err.filename or url) from None
        _translate(err, url)
    except Exception as err:  # botocore / aiohttp / gcsfs raise their own types
        _translate(err, url)


def _translate(err: BaseException, url: str) -> NoReturn:
    """botocore, aiohttp and gcsfs raise their own types: name what happened, or keep the original."""
    name, text = type(err).__name__, _first_line(err)
    if "NoCredentials" in name or "credentials" in text.lower():
        raise DataError("no credentials for this object store (set them as the storage library reads them, "
                        "e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)", url) from None
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        raise DataError("the bucket does not exist", url) from None
    if any(k in name for k in ("EndpointConnection", "ConnectTimeout", "ClientConnector", "ConnectionError",
                               "ReadTimeout")) or "connect" in text.lower():
        raise DataError(f"cannot reach the object store ({name})", url) from None
    if any(k in name for k in ("ClientError", "HTTP")):
        raise DataError(f"the object store refused the request ({text})", url) from None
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
            with open(path, "rb") as f:
                if start is None:
                    return f.read()
                if start < 0:
                    f.seek(start, os.SEEK_END)
                    return f.read()
                f.seek(start)
                return f.read(end - start)
        with remote_errors(str(path)):
            if start is not None and start < 0:
                size = self.fs.size(path)
                return self.fs.cat_file(path, start=size + start, end=size)
            return self.fs.cat_file(path, start=start, end=end)

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
