"""Running the app under uvicorn, with a clean shutdown."""

from __future__ import annotations

import uvicorn

from .app import server_app
from .auth import Keys
from .config import ServerConfig
from .models import ModelHost


class GracefulServer(uvicorn.Server):
    """On Ctrl-C/SIGTERM: in-flight generations get `grace` seconds to finish, then are cancelled
    cleanly (streams get an error event and `[DONE]`) before uvicorn closes the connections."""

    def __init__(self, config: uvicorn.Config, host: ModelHost, grace: float):
        super().__init__(config)
        self.host, self.grace = host, grace

    async def shutdown(self, sockets: list | None = None) -> None:
        await self.host.drain(self.grace)
        await super().shutdown(sockets)


def serve_forever(settings: ServerConfig, keys: Keys | None, startup_model: str | None) -> None:
    """Serve until interrupted."""
    app = server_app(settings, keys, startup_model=startup_model)
    config = uvicorn.Config(app, host=settings.network.host, port=settings.network.port, log_level="info", timeout_graceful_shutdown=2)
    GracefulServer(config, app.state.host, settings.limits.shutdown_grace_seconds).run()
