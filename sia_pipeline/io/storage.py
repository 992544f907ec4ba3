"""Object storage behind one small interface: a local folder or ``s3://bucket/prefix``.

Everything that names a dataset, model or image root takes a URL. Writes are atomic
(temp file + rename locally, one PUT or a completed multipart upload on S3), so a reader
never sees half an object. Nothing here knows about diffusion or datasets.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

from sia_pipeline.io.s3_retry import (
    ResumableBody,
    RetryPolicy,
    attempts_made,
    call_with_retry,
    error_code,
    is_transient,
)

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 64 * 1024 * 1024
# Image files the readers list in a folder (MVTec layouts, textures, predict inputs).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _default_file_mode() -> int:
    # mkstemp makes 0600 files; published data should get the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


class StorageError(RuntimeError):
    """A storage failure, with a one-line message naming the URL (never secrets).

    Attributes:
        code: the S3 error code (``SlowDown``, ``AccessDenied``...) or failure kind; "" locally.
        transient: True when retrying later may succeed (throttling, 5xx, resets): the
            request was already retried with backoff, so callers report it and exit 1.
    """

    def __init__(self, message: str, code: str = "", transient: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.transient = transient

    def __reduce__(self):  # survives pickling through Ray
        return (type(self), (str(self), self.code, self.transient))


def nearest_existing(path: Path) -> Path:
    """``path`` itself or its closest existing ancestor: where creating it would start."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def can_create_in(folder: Path) -> bool:
    """Whether new entries can be made in ``folder`` (an existing, writable directory)."""
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def redact_url(url: str | None) -> str | None:
    """``url`` without any ``user:password@`` part, for messages and logs."""
    if not url or "@" not in url:
        return url
    parsed = urlparse(url)
    return parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()


def join_url(base: str, *parts: str) -> str:
    base = str(base).rstrip("/")
    rest = "/".join(p.strip("/") for p in parts if p)
    return f"{base}/{rest}" if rest else base


@dataclass
class LocalStorage:
    """A folder on disk; ``file://`` URLs and plain paths both land here."""

    root: Path

    @property
    def url(self) -> str:
        return str(self.root)

    def _path(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            msg = f"cannot create output folder {self.root}: {e.strerror}"
            raise StorageError(msg) from e

    def put_file(self, local: str | os.PathLike, rel: str) -> None:
        dst = self._path(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dst.parent)
        os.close(fd)
        try:
            shutil.copyfile(local, tmp)
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, data: bytes, rel: str) -> None:
        dst = self._path(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dst.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Write ``data`` at ``name`` unless something is there: True if written, False if not.

        Atomic and exclusive: the data goes to a temp file that is then hard-linked to ``name``
        (``link`` fails if the target exists), so a reader never sees a partial object and of
        two concurrent writers exactly one wins. Falls back to ``O_EXCL`` where hard links
        are not supported.
        """
        dst = self._path(name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dst.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, _FILE_MODE)
            try:
                os.link(tmp, dst)
            except FileExistsError:
                return False
            except OSError:  # no hard links on this filesystem
                return self._create_exclusive(dst, data)
            return True
        finally:
            Path(tmp).unlink(missing_ok=True)

    @staticmethod
    def _create_exclusive(dst: Path, data: bytes) -> bool:
        try:
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def get_bytes(self, rel: str) -> bytes:
        try:
            return self._path(rel).read_bytes()
        except FileNotFoundError as e:
            msg = f"not found: {self._path(rel)}"
            raise FileNotFoundError(msg) from e

    def open_read(self, rel: str) -> IO[bytes]:
        return open(self._path(rel), "rb")  # noqa: SIM115 - caller closes

    def size(self, rel: str) -> int | None:
        try:
            return self._path(rel).stat().st_size
        except FileNotFoundError:
            return None

    def exists(self, rel: str) -> bool:
        return self._path(rel).exists()

    def delete(self, rel: str) -> None:
        p = self._path(rel)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        """Relative names of all files under ``prefix``, sorted; temp files excluded."""
        base = self._path(prefix)
        if not base.exists():
            return []
        if base.is_file():
            return [prefix]
        out = [
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        ]
        return sorted(out)

    def local_path(self, rel: str) -> Path:
        return self._path(rel)


class S3Storage:
    """``s3://bucket/prefix`` through boto3 with the standard credential chain.

    Every request is retried with backoff on throttling, 5xx, timeouts and resets by
    botocore's "standard" retry mode; streamed reads also survive bodies cut mid-stream
    (:class:`~sia_pipeline.io.s3_retry.ResumableBody` resumes at the byte reached).
    What still fails becomes a one-line :class:`StorageError` naming the URL, the S3 code and
    whether it is transient. ``SIA_S3_MAX_ATTEMPTS`` / ``SIA_S3_BACKOFF_S`` tune the retries.
    """

    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        parsed = urlparse(url)
        if not parsed.netloc:
            msg = f"S3 URL has no bucket: {url}"
            raise StorageError(msg)
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        try:
            self.policy = RetryPolicy.from_env()
        except ValueError as e:
            raise StorageError(str(e)) from None
        cfg = Config(
            retries={"mode": "standard", "total_max_attempts": self.policy.max_attempts},
            connect_timeout=5,
            max_pool_connections=32,  # the manifest reads stats with 16 threads
            read_timeout=60,
        )
        self.client = boto3.client("s3", endpoint_url=self.endpoint_url, config=cfg)

    @property
    def url(self) -> str:
        return join_url(f"s3://{self.bucket}", self.prefix)

    def __getstate__(self) -> dict:
        # boto3 clients don't pickle; Ray actors rebuild their own.
        return {"url": self.url, "endpoint_url": self.endpoint_url}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["endpoint_url"])

    def _key(self, rel: str) -> str:
        return "/".join(p for p in (self.prefix, rel.strip("/")) if p)

    def _fail(self, err: BaseException, rel: str = "", attempts: int | None = None) -> StorageError:
        """One line for ``err``: URL, S3 code, transient or not; never credentials."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = join_url(self.url, rel)
        code = error_code(err)
        transient = is_transient(err)
        tries = attempts or attempts_made(err, self.policy)
        kind = f"transient, gave up after {tries} attempts" if transient else "permanent"
        if isinstance(err, NoCredentialsError | PartialCredentialsError):
            return StorageError(f"no S3 credentials found for {where}", code)
        if isinstance(err, EndpointConnectionError):  # refused or unresolvable: likely a wrong
            endpoint = redact_url(self.endpoint_url) or "AWS"  # URL, so not called transient
            return StorageError(
                f"cannot reach S3 endpoint {endpoint} for {where} (after {tries} attempts)", code
            )
        if isinstance(err, ClientError):
            if code in ("NoSuchBucket",) or (code == "HTTP 404" and not rel):
                return StorageError(f"bucket does not exist: s3://{self.bucket}", code)
            if code in ("AccessDenied", "HTTP 403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageError(f"access denied ({code}) for {where}", code)
            return StorageError(f"S3 error {code} ({kind}) for {where}", code, transient)
        if transient:
            return StorageError(f"S3 connection failed: {code} ({kind}) for {where}", code, True)
        return StorageError(f"S3 failure for {where}: {code}", code)

    def _retry(self, fn, **kw):
        """``fn(**kw)`` with botocore's retries plus ours for cut response bodies."""
        return call_with_retry(lambda: fn(**kw), self.policy)[0]

    def _call(self, fn, rel: str, **kw):
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._retry(fn, **kw)
        except (BotoCoreError, ClientError) as e:
            raise self._fail(e, rel) from None
        except S3UploadFailedError as e:  # s3transfer wraps the ClientError
            raise self._fail(e.__cause__ or e, rel) from None

    def check_writable(self) -> None:
        self._call(self.client.head_bucket, "", Bucket=self.bucket)

    def put_file(self, local: str | os.PathLike, rel: str) -> None:
        if os.path.getsize(local) < MULTIPART_THRESHOLD:
            with open(local, "rb") as body:  # seekable: botocore rewinds it on a retry
                self._call(
                    self.client.put_object, rel, Bucket=self.bucket, Key=self._key(rel), Body=body
                )
            return
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, use_threads=False)
        self._call(
            self.client.upload_file,
            rel,
            Filename=str(local),
            Bucket=self.bucket,
            Key=self._key(rel),
            Config=cfg,
        )

    def put_bytes(self, data: bytes, rel: str) -> None:
        self._call(self.client.put_object, rel, Bucket=self.bucket, Key=self._key(rel), Body=data)

    def put_if_absent(self, name: str, data: bytes) -> bool:
        """Write ``data`` at ``name`` unless an object is there: True if written, False if not.

        One conditional PUT (``If-None-Match: *``): S3 answers 412 when the key exists, so of
        two concurrent writers exactly one wins. If a retried PUT meets 412, our own first
        attempt may have landed before the connection dropped: the object is read back and
        counts as ours when its bytes equal ``data`` (so put something unique, e.g. a token).
        """
        from botocore.exceptions import BotoCoreError, ClientError

        attempt = 0
        while True:
            attempt += 1
            try:
                call_with_retry(
                    lambda: self.client.put_object(
                        Bucket=self.bucket, Key=self._key(name), Body=data, IfNoneMatch="*"
                    ),
                    self.policy,
                )
            except ClientError as e:
                code = error_code(e)
                if code == "ConditionalRequestConflict":  # a concurrent conditional write
                    if attempt < self.policy.max_attempts:
                        time.sleep(self.policy.delay(attempt))
                        continue
                    raise self._fail(e, name, attempt) from None
                if code not in ("PreconditionFailed", "HTTP 412"):
                    raise self._fail(e, name) from None
                retried = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
                if not retried and not getattr(e, "sia_cut_retries", 0):
                    return False  # a first try that met the object: someone else's
                try:
                    return self.get_bytes(name) == data
                except FileNotFoundError:
                    return False
            except BotoCoreError as e:
                raise self._fail(e, name) from None
            return True

    def get_bytes(self, rel: str) -> bytes:
        return self.open_read(rel).read()

    def _get(self, rel: str, offset: int = 0, etag: str | None = None) -> dict:
        from botocore.exceptions import ClientError

        kw = {"Bucket": self.bucket, "Key": self._key(rel)}
        if offset:
            kw["Range"] = f"bytes={offset}-"
        if etag:
            kw["IfMatch"] = etag
        try:
            return self._retry(self.client.get_object, **kw)
        except ClientError as e:
            code = error_code(e)
            if code in ("NoSuchKey", "HTTP 404"):
                msg = f"not found: {join_url(self.url, rel)}"
                raise FileNotFoundError(msg) from None
            if code in ("PreconditionFailed", "HTTP 412"):
                msg = f"{join_url(self.url, rel)} changed while it was being read"
                raise StorageError(msg, code) from None
            raise self._fail(e, rel) from None
        except Exception as e:  # connection, credentials
            raise self._fail(e, rel) from None

    def open_read(self, rel: str) -> IO[bytes]:
        """A streamed read that resumes at the byte reached when the connection is cut."""
        return ResumableBody(
            reopen=lambda offset, etag: self._get(rel, offset, etag),
            first=self._get(rel),
            fail=lambda err, tries: self._fail(err, rel, tries),
            policy=self.policy,
        )

    def size(self, rel: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            head = self._retry(self.client.head_object, Bucket=self.bucket, Key=self._key(rel))
        except ClientError as e:
            if error_code(e) in ("HTTP 404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(e, rel) from None
        except Exception as e:
            raise self._fail(e, rel) from None
        return int(head["ContentLength"])

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def delete(self, rel: str) -> None:
        for name in self.list(rel) or [rel]:
            self._call(self.client.delete_object, rel, Bucket=self.bucket, Key=self._key(name))

    def list(self, prefix: str = "") -> list[str]:
        """Like a folder listing: the object ``prefix`` itself and everything under
        ``prefix/`` (so ``shards`` never matches ``shards_old/...``)."""
        base = self._key(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")

        def listing() -> list[str]:
            pages = paginator.paginate(Bucket=self.bucket, Prefix=base)
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

        try:
            out = self._retry(listing)
        except Exception as e:
            raise self._fail(e, prefix) from None
        under = f"{base}/" if base else ""
        return sorted(k[len(root) :] for k in out if k == base or k.startswith(under))


Storage = LocalStorage | S3Storage


def open_storage(url: str | os.PathLike, endpoint_url: str | None = None) -> Storage:
    """Storage for a URL: ``s3://bucket/prefix``, ``file:///path`` or a plain path."""
    url = str(url)
    if not url:
        msg = "empty storage URL"
        raise StorageError(msg)
    if is_s3(url):
        return S3Storage(url, endpoint_url)
    if url.startswith("file://"):
        url = urlparse(url).path
    elif "://" in url:
        msg = f"unsupported URL scheme in {url!r} (use a path, file:// or s3://)"
        raise StorageError(msg)
    return LocalStorage(Path(url).expanduser())


def iter_files(storage: Storage, prefix: str, suffixes: tuple[str, ...]) -> Iterator[str]:
    """Relative names under ``prefix`` whose suffix (case-insensitive) is in ``suffixes``."""
    for name in storage.list(prefix):
        if name.lower().endswith(suffixes):
            yield name
