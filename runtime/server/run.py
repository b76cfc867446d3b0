"""Running the app under uvicorn, with a clean shutdown."""

from __future__ import annotations

import socket

import uvicorn

from runtime.server.app import server_app
from runtime.server.auth import Keys
from runtime.server.config import ServerConfig
from runtime.server.models import ModelHost


class GracefulServer(uvicorn.Server):
    """On Ctrl-C/SIGTERM: in-flight generations get `grace` seconds to finish, then are cancelled
    cleanly (streams get an error event and `[DONE]`) before uvicorn closes the connections."""

    def __init__(self, config: uvicorn.Config, host: ModelHost, grace: float):
        super().__init__(config)
        self.host, self.grace = host, grace

    async def shutdown(self, sockets: list | None = None) -> None:
        await self.host.drain(self.grace)
        await super().shutdown(sockets)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any model loads: a bad address or a busy port fails at
    once (OptionError: one line, exit 2), not after minutes of loading."""
    from pixtral.errors import OptionError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        raise OptionError(f"--host {host!r}: not an address or host name this machine can listen on ({err})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OptionError(
            f"cannot listen on {host}:{port}: {err.strerror or err} (network.host / network.port)"
        ) from None
    sock.listen(2048)
    return sock


def serve_forever(settings: ServerConfig, keys: Keys | None, startup_model: str | None, sock: socket.socket) -> None:
    """Serve on the bound socket until interrupted."""
    app = server_app(settings, keys, startup_model=startup_model)
    config = uvicorn.Config(
        app, host=settings.network.host, port=settings.network.port, log_level="info", timeout_graceful_shutdown=2
    )
    GracefulServer(config, app.state.host, settings.limits.shutdown_grace_seconds).run(sockets=[sock])
