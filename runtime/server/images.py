"""Image parts of a request -> preprocessed pictures, under the server's limits.

`data:` URLs always; `http(s)` URLs only with `images.allow_remote` (an optional host allow-list, a
timeout, no redirects, a byte cap while downloading); `file://` URLs only from inside
`images.local_folder`. Decoding refuses oversized files and decoded-pixel bombs before decoding.
Everything here blocks: the app calls it off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from pixtral.image import ImageError, open_image
from pixtral.prompt import PromptImage, prepare_image
from runtime.server.config import ImagesConfig

DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<payload>.*)$", re.S
)


def load_image_url(url: str, limits: ImagesConfig) -> PromptImage:
    """Fetch (where allowed), check and preprocess the image an `image_url` part points to."""
    scheme = url.split(":", 1)[0].lower() if ":" in url[:10] else ""
    if scheme == "data":
        data = _data_url(url, limits)
    elif scheme in ("http", "https"):
        data = _fetch(url, limits)
    elif scheme == "file":
        data = _local_file(url, limits)
    else:
        raise ImageError(
            f"image URL {url[:40]!r}: expected a data: URL"
            + (", an http(s) URL" if limits.allow_remote else "")
            + (" or a file:// URL" if limits.local_folder else "")
        )
    return prepare_image(open_image(data, limits.max_image_pixels, limits.max_image_bytes, name=_label(url)))


def _label(url: str) -> str:
    return url[:32] + "…" if len(url) > 40 else url


def _data_url(url: str, limits: ImagesConfig) -> bytes:
    match = DATA_URL.match(url)
    if match is None or not match["b64"]:
        raise ImageError(f"image URL {_label(url)!r}: not a base64 data URL (data:image/png;base64,...)")
    if match["mime"] and not match["mime"].lower().startswith("image/"):
        raise ImageError(f"image URL {_label(url)!r}: media type {match['mime']} is not an image")
    payload = match["payload"].strip()
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise ImageError(
            f"image of about {len(payload) * 3 // 4} bytes is over the {limits.max_image_bytes}-byte limit"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(f"image URL {_label(url)!r}: invalid base64 ({err})") from err


def _fetch(url: str, limits: ImagesConfig) -> bytes:
    if not limits.allow_remote:
        raise ImageError(
            "remote image URLs are disabled on this server (images.allow_remote); send the image as a data: URL"
        )
    host = (urlparse(url).hostname or "").lower()
    if limits.remote_hosts and host not in {h.lower() for h in limits.remote_hosts}:
        raise ImageError(f"image host {host!r} is not in this server's allow-list (images.remote_hosts)")
    import httpx

    try:
        with httpx.stream("GET", url, timeout=limits.fetch_timeout_seconds, follow_redirects=False) as response:
            if response.status_code != 200:
                raise ImageError(f"image URL {_label(url)!r}: the server answered {response.status_code}")
            data = bytearray()
            for block in response.iter_bytes():
                data += block
                if len(data) > limits.max_image_bytes:
                    raise ImageError(f"image at {_label(url)!r} is over the {limits.max_image_bytes}-byte limit")
            return bytes(data)
    except httpx.HTTPError as err:
        raise ImageError(f"image URL {_label(url)!r}: could not fetch it ({type(err).__name__})") from err


def _local_file(url: str, limits: ImagesConfig) -> bytes:
    if not limits.local_folder:
        raise ImageError("file:// image URLs are disabled on this server (images.local_folder)")
    folder = Path(limits.local_folder).resolve()
    path = Path(unquote(urlparse(url).path)).resolve()
    if not path.is_relative_to(folder):
        raise ImageError(f"image path {path} is outside the folder this server may read ({folder})")
    if not path.is_file():
        raise ImageError(f"image path {path}: no such file")
    return path.read_bytes()
