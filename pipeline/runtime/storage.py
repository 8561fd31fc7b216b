"""One way to name data: a URI (``/local/path``, ``file://...``, ``s3://bucket/prefix``) -> ``Location``.

The S3 endpoint comes from ``SPAE_S3_ENDPOINT``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (in
that order); credentials and region from the standard AWS variables and profiles, resolved once by
boto3 and handed to pyarrow explicitly (pyarrow ignores ``AWS_ENDPOINT_URL``). Failures raise
``StorageError`` naming the URI: missing bucket, bad credentials, unreachable endpoint, unwritable
local parent. Credentials are never put into messages.

Transient faults are retried (``retrying``; every ``Location`` call and the shard writer's commits go
through it): connection refused or reset, timeouts, HTTP 5xx, ``SlowDown`` / ``ServiceUnavailable``,
with exponential backoff (``RETRY_ATTEMPTS`` tries, ``RETRY_BASE_S`` doubling up to ``RETRY_MAX_S``,
about 30 s in all: a restarting S3 server is back within that). Credential, permission, missing-bucket
and not-found errors are never retried. A connection error from an endpoint this process has never
reached is not retried either (a wrong or stopped endpoint at start fails in seconds); once the
endpoint has answered, losing it is a transient fault.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

ENDPOINT_ENV = ("SPAE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
CONNECT_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 2  # per request, inside boto3 / pyarrow (their own quick retry)
RETRY_ATTEMPTS = 8  # tries of one storage operation on a transient fault (``retrying``)
RETRY_BASE_S = 0.5  # first backoff; doubles each try
RETRY_MAX_S = 8.0  # backoff cap: 0.5 + 1 + 2 + 4 + 8 + 8 + 8 = 31.5 s of waiting at most

log = logging.getLogger(__name__)
T = TypeVar("T")

_CREDENTIAL_CODES = {
    "InvalidAccessKeyId": "the access key is not known to the server",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "AccessDenied": "access denied",
    "403": "access denied (HTTP 403)",
    "InvalidToken": "the session token is invalid",
    "ExpiredToken": "the session token has expired",
}
_BUCKET_CODES = {"NoSuchBucket", "404"}
_TRANSIENT_MARKERS = (
    "connection refused",
    "couldn't connect",
    "network_connection",
    "curlcode: 7,",
    "curlcode: 28",
    "curlcode: 52",
    "curlcode: 55",
    "curlcode: 56",
    "timed out",
    "timeout",
    "connection reset",
    "connection aborted",
    "broken pipe",
    "slowdown",
    "slow down",
    "serviceunavailable",
    "service unavailable",
    "internalerror",
    "internal error",
    "requesttimeout",
    "http status 500",
    "http status 502",
    "http status 503",
    "http status 504",
    "status code: 500",
    "status code: 502",
    "status code: 503",
    "status code: 504",
)
_CONNECTION_MARKERS = ("connection refused", "couldn't connect", "curlcode: 7,", "network_connection")
_REACHED: set[str] = set()  # endpoints ("" = local disk / AWS) that answered once in this process
_REACHED_LOCK = threading.Lock()


class StorageError(RuntimeError):
    """A URI cannot be used: the message names the URI and the cause."""


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is and who we are; built from the environment. ``repr`` hides the secrets."""

    endpoint: str  # "" = AWS itself; else "http://host:port"
    region: str
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @property
    def endpoint_host(self) -> str:
        return urlparse(self.endpoint).netloc if self.endpoint else ""

    @property
    def scheme(self) -> str:
        return (urlparse(self.endpoint).scheme or "https") if self.endpoint else "https"


def s3_endpoint() -> str:
    """The S3 endpoint URL from the environment, "" for AWS itself."""
    for name in ENDPOINT_ENV:
        value = os.environ.get(name, "").strip()
        if value:
            return value if "://" in value else f"http://{value}"
    return ""


def s3_settings() -> S3Settings:
    import boto3

    session = boto3.Session()
    creds = session.get_credentials()
    frozen = creds.get_frozen_credentials() if creds is not None else None
    return S3Settings(
        endpoint=s3_endpoint(),
        region=session.region_name or os.environ.get("AWS_REGION") or "us-east-1",
        access_key=frozen.access_key if frozen else None,
        secret_key=frozen.secret_key if frozen else None,
        session_token=frozen.token if frozen else None,
    )


def s3_client(settings: S3Settings | None = None) -> Any:
    """A boto3 S3 client for the same endpoint and credentials as ``resolve`` uses; fails fast."""
    import boto3
    from botocore.config import Config

    s = settings or s3_settings()
    return boto3.client(
        "s3",
        endpoint_url=s.endpoint or None,
        region_name=s.region,
        aws_access_key_id=s.access_key,
        aws_secret_access_key=s.secret_key,
        aws_session_token=s.session_token,
        config=Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=REQUEST_TIMEOUT_S,
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            s3={"addressing_style": "path"} if s.endpoint else None,
        ),
    )


@lru_cache(maxsize=8)
def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = dict(
        region=settings.region,
        connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
    )
    if settings.endpoint:
        kwargs.update(endpoint_override=settings.endpoint_host, scheme=settings.scheme)
    if settings.access_key:
        kwargs.update(
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            session_token=settings.session_token,
        )
    return pafs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class Location:
    """A file or folder on a local disk or S3. ``path`` is inside ``fs`` (no scheme)."""

    uri: str  # canonical: an absolute local path or s3://bucket/key
    fs: pafs.FileSystem = field(repr=False, compare=False)
    path: str
    is_s3: bool

    def join(self, *parts: str) -> Location:
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        if not tail:
            return self
        path = f"{self.path.rstrip('/')}/{tail}"
        uri = f"{self.uri.rstrip('/')}/{tail}"
        return Location(uri=uri, fs=self.fs, path=path, is_s3=self.is_s3)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0] if self.is_s3 else ""

    @property
    def key(self) -> str:
        return self.path.split("/", 1)[1] if self.is_s3 and "/" in self.path else ""

    def exists(self) -> bool:
        info = self._call("check", lambda: self.fs.get_file_info(self.path))
        return info.type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        info = self._call("check", lambda: self.fs.get_file_info(self.path))
        return info.type == pafs.FileType.Directory

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()

        return self._call("read", read)

    def write_bytes(self, data: bytes) -> None:
        """Atomic: write a temporary sibling, then move it over the target."""
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:12]}"

        def write() -> None:
            if not self.is_s3:
                self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, self.path)

        try:
            self._call("write", write)
        finally:
            try:
                if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                    self.fs.delete_file(tmp)
            except OSError:
                pass

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def list(self, recursive: bool = False) -> list[Location]:
        """Children of a folder (files and folders), sorted by path; [] if it does not exist."""
        selector = pafs.FileSelector(self.path.rstrip("/"), recursive=recursive, allow_not_found=True)
        infos = self._call("list", lambda: self.fs.get_file_info(selector))
        base = self.path.rstrip("/")
        out = [self.join(info.path[len(base) :]) for info in infos if info.path.startswith(base + "/")]
        return sorted(out, key=lambda loc: loc.path)

    def delete(self) -> None:
        """Delete a file or a whole folder; nothing if it does not exist."""

        def delete() -> None:
            info = self.fs.get_file_info(self.path)
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path)
            elif info.type != pafs.FileType.NotFound:
                self.fs.delete_file(self.path)

        self._call("delete", delete)

    def mkdir(self) -> None:
        self._call("create", lambda: self.fs.create_dir(self.path, recursive=True))

    def call(self, verb: str, fn: Callable[[], T]) -> T:
        """``fn()`` on this location: transient faults retried (``retrying``), the rest raised as
        ``StorageError`` naming the URI (``FileNotFoundError`` stays one)."""
        return self._call(verb, fn)

    def _call(self, verb: str, fn: Any) -> Any:
        try:
            return retrying(fn, self, verb)
        except StorageError:
            raise
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.uri} does not exist") from e
        except OSError as e:
            raise _translate(self, verb, e) from e

    def __str__(self) -> str:
        return self.uri


def as_location(where: Location | str | os.PathLike[str]) -> Location:
    """``where`` itself when it is a ``Location``, else ``resolve(where)`` (a path, ``Path`` or URI)."""
    return where if isinstance(where, Location) else resolve(where)


def resolve(uri: str | os.PathLike[str]) -> Location:
    """``/abs``, ``rel/path``, ``file:///abs`` or ``s3://bucket/prefix`` -> ``Location``."""
    text = os.fspath(uri).strip()
    if not text:
        raise ValueError("empty storage URI; give a local path, file://... or s3://bucket/prefix")
    if text.startswith("s3://"):
        rest = text[len("s3://") :].strip("/")
        if not rest:
            raise ValueError(f"{text}: an s3:// URI needs a bucket, e.g. s3://bucket/prefix")
        fs = _s3_filesystem(s3_settings())
        return Location(uri=f"s3://{rest}", fs=fs, path=rest, is_s3=True)
    if "://" in text and not text.startswith("file://"):
        scheme = text.split("://", 1)[0]
        raise ValueError(f"{text}: unsupported scheme '{scheme}://'; use a local path, file:// or s3://")
    if text.startswith("file://"):
        text = urlparse(text).path
    path = str(Path(text).expanduser().resolve())
    return Location(uri=path, fs=pafs.LocalFileSystem(), path=path, is_s3=False)


def check_access(loc: Location, write: bool = True) -> None:
    """A cheap probe that raises ``StorageError`` naming the URI if ``loc`` cannot be used."""
    if loc.is_s3:
        client = s3_client()
        try:
            client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.key, MaxKeys=1)
        except Exception as e:  # botocore errors: ClientError, EndpointConnectionError, ...
            raise _translate(loc, "access", e) from e
        return
    existing = Path(loc.path)
    while not existing.exists():
        existing = existing.parent
    if write and not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"{loc.uri}: cannot write here; {existing} is not writable")


def ray_storage(loc: Location) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``.

    With a filesystem object the path carries no ``s3://``; a local path needs no filesystem.
    """
    if loc.is_s3:
        return loc.path, loc.fs
    return loc.path, None


def _translate(loc: Location, verb: str, e: BaseException) -> StorageError:
    """Turn a boto3 or pyarrow error into a StorageError naming the URI (never the secrets)."""
    text = str(e)
    code = ""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    endpoint = s3_endpoint() or "AWS S3"
    if loc.is_s3:
        if code in _BUCKET_CODES or "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
            return StorageError(f"{loc.uri}: bucket '{loc.bucket}' does not exist at {endpoint}")
        why = _CREDENTIAL_CODES.get(code) or next(
            (
                why
                for key, why in _CREDENTIAL_CODES.items()
                if not key.isdigit() and key.upper() in text.upper()
            ),
            None,
        )
        if why is None and "ACCESS_DENIED" in text:
            why = _CREDENTIAL_CODES["AccessDenied"]
        if why is not None:
            return StorageError(
                f"{loc.uri}: bad credentials for {endpoint}: {why}; check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        if _is_connection_error(e, text):
            return StorageError(
                f"{loc.uri}: cannot reach the S3 endpoint {endpoint}; is the server running? "
                "(set SPAE_S3_ENDPOINT or AWS_ENDPOINT_URL_S3)"
            )
        return StorageError(f"{loc.uri}: {verb} failed: {text}")
    if isinstance(e, PermissionError) or "Permission denied" in text:
        return StorageError(f"{loc.uri}: cannot {verb}: permission denied")
    return StorageError(f"{loc.uri}: {verb} failed: {text}")


def is_transient(e: BaseException, endpoint: str | None = None) -> bool:
    """A storage fault worth retrying: connection lost, timeout, 5xx, throttling (see the module
    docstring). Never: not found, permission, credentials, missing bucket, or a connection error from
    an ``endpoint`` that never answered in this process."""
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    if not isinstance(e, OSError) and not type(e).__module__.startswith(("botocore", "urllib3")):
        return False
    text = str(e).lower()
    code = ""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"):
            return True
    if code in _BUCKET_CODES or code in _CREDENTIAL_CODES or "no_such_bucket" in text:
        return False
    if any(key.lower() in text for key in _CREDENTIAL_CODES if not key.isdigit()) or "access_denied" in text:
        return False
    connection = _is_connection_error(e, str(e)) or any(m in text for m in _CONNECTION_MARKERS)
    if connection and endpoint is not None and endpoint not in _REACHED:
        return False  # never reached: a wrong or stopped endpoint, not a blip
    return connection or any(m in text for m in _TRANSIENT_MARKERS)


def retrying(fn: Callable[[], T], where: Location | str, verb: str = "call") -> T:
    """``fn()``, retried with exponential backoff while it raises a transient storage fault
    (``is_transient``); the last error is raised as it is. ``where``: the location (for the endpoint
    and the log line)."""
    is_s3 = where.is_s3 if isinstance(where, Location) else str(where).startswith("s3://")
    endpoint = (s3_endpoint() or "aws") if is_s3 else "local"
    delay = RETRY_BASE_S
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            result = fn()
        except Exception as e:
            if attempt == RETRY_ATTEMPTS or not is_transient(e, endpoint):
                raise
            log.warning(
                "%s: %s failed (%s: %s); retry %d of %d in %.1f s",
                where,
                verb,
                type(e).__name__,
                str(e).splitlines()[0][:200] if str(e) else "",
                attempt,
                RETRY_ATTEMPTS - 1,
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
            continue
        if endpoint not in _REACHED:
            with _REACHED_LOCK:
                _REACHED.add(endpoint)
        return result
    raise AssertionError("unreachable")  # the loop returns or raises


def _is_connection_error(e: BaseException, text: str) -> bool:
    try:
        from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

        if isinstance(e, EndpointConnectionError | ConnectTimeoutError):
            return True
    except ImportError:  # pragma: no cover - boto3 is a dependency
        pass
    markers = ("Couldn't connect", "Connection refused", "NETWORK_CONNECTION", "curlCode: 7", "timed out")
    return any(m.lower() in text.lower() for m in markers)
