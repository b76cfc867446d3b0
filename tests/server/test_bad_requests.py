"""A corpus of careless and hostile requests: each gets a 4xx with an OpenAI error body, none a 5xx,
and the server keeps answering."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serving import ADMIN, API, running_server

from runtime.server.config import ImagesConfig, LimitsConfig, ModelConfig, ServerConfig

OK_MESSAGES = [{"role": "user", "content": "Hi"}]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _data(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG that claims width×height RGB pixels and holds almost none of them."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _image_message(url: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    root = tmp_path_factory.mktemp("bad")
    (root / "models").mkdir()
    (root / "models" / "tiny").symlink_to(tiny_model, target_is_directory=True)
    (root / "allowed").mkdir()
    config = ServerConfig(
        model=ModelConfig(model_dir=str(root / "models"), backend="reference", device="cpu", max_seq_len=256),
        limits=LimitsConfig(max_request_bytes=2 * 2**20, max_n=4),
        images=ImagesConfig(local_folder=str(root / "allowed"), max_image_bytes=2**20),
    )
    with running_server(config, "tiny") as running:
        yield running


def _bomb() -> bytes:
    return _png(Image.new("1", (30000, 30000)))  # 900 Mpx that compress to ~100 KB


CHAT = "/v1/chat/completions"
CASES = [
    ("malformed JSON", CHAT, b'{"messages": [', None),
    ("a JSON array", CHAT, [1, 2], None),
    ("messages missing", CHAT, {"model": "tiny"}, None),
    ("empty messages", CHAT, {"messages": []}, None),
    ("messages not a list", CHAT, {"messages": "hello"}, None),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, None),
    ("content of the wrong type", CHAT, {"messages": [{"role": "user", "content": 42}]}, None),
    ("text part without text", CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, None),
    ("image part without a url", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
    ("unknown part type", CHAT, {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, None),
    ("negative max_tokens", CHAT, {"messages": OK_MESSAGES, "max_tokens": -5}, None),
    ("negative temperature", CHAT, {"messages": OK_MESSAGES, "temperature": -1}, None),
    ("top_p over 1", CHAT, {"messages": OK_MESSAGES, "top_p": 1.5}, None),
    ("n zero", CHAT, {"messages": OK_MESSAGES, "n": 0}, None),
    ("n over the server's limit", CHAT, {"messages": OK_MESSAGES, "n": 1000}, None),
    ("negative seed", CHAT, {"messages": OK_MESSAGES, "seed": -1}, None),
    ("stop of the wrong type", CHAT, {"messages": OK_MESSAGES, "stop": {"a": 1}}, None),
    ("stream not a boolean", CHAT, {"messages": OK_MESSAGES, "stream": []}, None),
    ("top_logprobs over 20", CHAT, {"messages": OK_MESSAGES, "logprobs": True, "top_logprobs": 50}, None),
    ("max_tokens zero", CHAT, {"messages": OK_MESSAGES, "max_tokens": 0}, None),
    ("temperature NaN", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
    ("top_p infinite", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', None),
    ("a tool without a name", CHAT, {"messages": OK_MESSAGES, "tools": [{"type": "function", "function": {}}]}, None),
    ("json_schema response_format", CHAT, {"messages": OK_MESSAGES, "response_format": {"type": "json_schema"}}, None),
    ("a corrupt image", CHAT, {"messages": _image_message(_data(b"\x89PNG\r\n\x1a\nnot really"))}, None),
    ("bad base64", CHAT, {"messages": _image_message("data:image/png;base64,@@@notbase64!!")}, None),
    ("a data URL that is not an image", CHAT, {"messages": _image_message(_data(b"hello", "text/plain"))}, None),
    ("a decompression-bomb PNG", CHAT, {"messages": _image_message(_data(_bomb()))}, None),
    ("a 20k x 20k image", CHAT, {"messages": _image_message(_data(_header_only_png(20000, 20000)))}, None),
    ("an image over the byte limit", CHAT, {"messages": _image_message(_data(b"\0" * (2**20 + 10)))}, None),
    ("a remote URL while disabled", CHAT,
     {"messages": _image_message("http://169.254.169.254/latest/meta-data")}, None),
    ("a local path outside the allowed folder", CHAT, {"messages": _image_message("file:///etc/passwd")}, None),
    ("a local path escaping with ..", CHAT, {"messages": _image_message("file:///ALLOWED/../../etc/hostname")}, None),
    ("too many images", CHAT, {"messages": _image_message(_data(_png(Image.new("RGB", (16, 16))))) * 20}, None),
    ("a prompt over the context", CHAT,
     {"messages": [{"role": "user", "content": "word " * 400}]}, "context_length_exceeded"),
    ("a body over the size limit", CHAT,
     {"messages": [{"role": "user", "content": "x" * (3 * 2**20)}]}, "request_too_large"),
    ("completions: empty prompt", "/v1/completions", {"prompt": ""}, None),
    ("completions: token ids out of range", "/v1/completions", {"prompt": [1, 10**9]}, None),
    ("completions: prompt over the context", "/v1/completions", {"prompt": "word " * 400}, "context_length_exceeded"),
    ("decode: ids out of range", "/v1/token/decode", {"tokens": [-1, 5]}, None),
    ("encode: wrong type", "/v1/token/encode", {"text": 17}, None),
    ("load: path traversal", "/v1/model/load", {"model_name": "../../etc"}, "model_not_found"),
    ("load: absolute path", "/v1/model/load", {"model_name": "/tmp"}, "model_not_found"),
]  # fmt: skip


def test_every_bad_request_gets_a_4xx_and_the_server_keeps_answering(server, tmp_path: Path) -> None:
    assert len(CASES) >= 25
    failures = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for name, route, body, code in CASES:
            headers = ADMIN if route.startswith("/v1/model/") else API
            if isinstance(body, bytes):
                response = http.post(route, content=body, headers=headers | {"content-type": "application/json"})
            else:
                payload = body
                if name == "a local path escaping with ..":
                    allowed = server.app.state.config.images.local_folder
                    payload = {"messages": _image_message(f"file://{allowed}/../../etc/hostname")}
                response = http.post(route, json=payload, headers=headers)
            try:
                error = response.json()["error"]
                ok = (
                    400 <= response.status_code < 500
                    and error["message"]
                    and error["type"]
                    and (code is None or error["code"] == code)
                )
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                failures.append((name, response.status_code, response.text[:200]))
        assert not failures, failures
        assert http.get("/v1/chat/completions", headers=API).status_code == 405
        assert http.get("/v1/nothing", headers=API).json()["error"]["code"] == "not_found"
        reply = http.post(CHAT, json={"messages": OK_MESSAGES, "max_tokens": 3}, headers=API)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
        assert http.get("/health").json()["status"] == "healthy"


def test_images_are_refused_where_vision_is_off(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> None:
    root = tmp_path_factory.mktemp("novision")
    (root / "tiny").symlink_to(tiny_model, target_is_directory=True)
    config = ServerConfig(model=ModelConfig(model_dir=str(root), backend="reference", device="cpu", vision=False))
    with running_server(config, "tiny") as running:
        response = httpx.post(
            f"{running.url}{CHAT}",
            json={"messages": _image_message(_data(_png(Image.new("RGB", (16, 16)))))},
            headers=API,
        )
        assert response.status_code == 400 and "vision is disabled" in response.json()["error"]["message"]


def test_a_local_image_inside_the_allowed_folder_is_served(server) -> None:
    allowed = Path(server.app.state.config.images.local_folder)
    Image.new("RGB", (32, 16), "blue").save(allowed / "blue.png")
    response = httpx.post(
        f"{server.url}{CHAT}",
        json={"messages": _image_message((allowed / "blue.png").as_uri()), "max_tokens": 2},
        headers=API,
        timeout=60,
    )
    assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] > 3
