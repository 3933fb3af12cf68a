"""Images behind URIs: `s3://`, `gs://`, `http(s)://`, `file://` and any other fsspec protocol.

A corpus often lives in object storage. `open_image` hands anything with a scheme to
`read_bytes`, which reads it whole through fsspec (with s3fs, gcsfs or aiohttp for the
protocol: the `corpus` extra installs them) and retries what a network throws at a long run
(a timeout, a dropped connection, a 5xx) with backoff; a missing object or a refused one is
an error at once, since asking again cannot change it. Each failure is an `ImageError` naming
the URI, so a bad object becomes its own error row and the others go on.

`expand` lists the images a URI folder (ending in "/") or glob names, as `find_images` does
for local folders.
"""

from __future__ import annotations

import re
import time

from rali_edge.errors import ImageError, MissingDependencyError

ATTEMPTS = 4  # one read and three retries: 0.5 + 1 + 2 s of backoff, a few seconds of outage
BACKOFF_S = 0.5
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# What retrying cannot change: the object is not there, or we may not read it.
_FINAL = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}


def is_uri(source) -> bool:
    """True for 'scheme://...' strings (a Windows drive letter or a local path never matches)."""
    return isinstance(source, str) and bool(_SCHEME.match(source))


def filesystem(uri: str):
    """The fsspec filesystem and the path inside it; a protocol whose package is missing says what to install."""
    try:
        import fsspec
    except ImportError:
        raise MissingDependencyError("reading URIs needs fsspec: pip install 'rali-edge[corpus]'") from None
    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        protocol = uri.split("://", 1)[0].lower()
        package = _PROTOCOL_PACKAGES.get(protocol)
        hint = f"pip install {package} (or 'rali-edge[corpus]', which has it)" if package else "is the protocol spelled right?"
        raise MissingDependencyError(f"{uri}: cannot read {protocol}:// URIs ({e}); {hint}") from None


def read_bytes(uri: str, attempts: int = ATTEMPTS, backoff_s: float = BACKOFF_S) -> bytes:
    """The whole object at `uri`, retried with exponential backoff on transient errors."""
    fs, path = filesystem(uri)
    for attempt in range(attempts):
        try:
            return fs.cat_file(path)
        except _FINAL as e:
            raise ImageError(f"{uri}: {_final_reason(e)}") from None
        except Exception as e:  # fsspec backends raise their own types for timeouts and 5xx
            if _is_final_http(e) or attempt == attempts - 1:
                tries = f" after {attempts} attempts" if attempt else ""
                raise ImageError(f"{uri}: cannot read{tries} ({type(e).__name__}: {str(e)[:160]})") from None
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def expand(uri: str, suffixes) -> list[str]:
    """A URI folder ('.../', every image under it) or glob -> its images' URIs, sorted; any other URI as it is."""
    from glob import has_magic

    fs, path = filesystem(uri)
    protocol = uri.split("://", 1)[0]
    if uri.endswith("/"):
        found = [p for p in fs.find(path) if _suffix(p) in suffixes]
    elif has_magic(path):
        found = [p for p in fs.glob(path) if not fs.isdir(p)]
    else:
        return [uri]
    return sorted(p if is_uri(p) else f"{protocol}://{p}" for p in found)


def _suffix(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _final_reason(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "not found"
    if isinstance(e, PermissionError):
        return "access denied"
    return "is a folder, not an image file"


def _is_final_http(e: Exception) -> bool:
    """An HTTP 4xx other than 408/429 (fsspec's http raises aiohttp's ClientResponseError)."""
    status = getattr(e, "status", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


__all__ = ["ATTEMPTS", "expand", "filesystem", "is_uri", "read_bytes"]
