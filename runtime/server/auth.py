"""API and admin keys, as TabbyAPI: `x-api-key` / `x-admin-key` / `Authorization: Bearer`.

Keys live in a YAML file (`api_key`, `admin_key`), generated with `secrets.token_hex(16)` on first
start (mode 0600). Comparison is constant-time (`hmac.compare_digest`), unlike TabbyAPI's `==`.
The admin key also passes api-key checks; `disable_auth` makes every caller admin.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from runtime.server.config import ServerConfigError

API, ADMIN = "api", "admin"


@dataclass(frozen=True)
class Keys:
    api_key: str
    admin_key: str

    def permission(self, presented: list[str]) -> str | None:
        """'admin', 'api' or None for the keys a request presents (every key is compared)."""
        level = None
        for key in presented:
            if hmac.compare_digest(key.encode(), self.admin_key.encode()):
                return ADMIN
            if hmac.compare_digest(key.encode(), self.api_key.encode()):
                level = API
        return level


def load_or_create_keys(path: Path) -> tuple[Keys, bool]:
    """The keys in `path`, creating the file with fresh keys if it does not exist; (keys, created)."""
    import yaml

    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ServerConfigError(f"{path}: cannot read the API keys file ({err})") from err
        if not (
            isinstance(data, dict) and isinstance(data.get("api_key"), str) and isinstance(data.get("admin_key"), str)
        ):
            raise ServerConfigError(f"{path}: expected `api_key: ...` and `admin_key: ...`")
        if len(data["api_key"]) < 16 or len(data["admin_key"]) < 16:
            raise ServerConfigError(f"{path}: keys must be at least 16 characters")
        return Keys(data["api_key"], data["admin_key"]), False
    keys = Keys(secrets.token_hex(16), secrets.token_hex(16))
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(f"api_key: {keys.api_key}\nadmin_key: {keys.admin_key}\n")
    return keys, True


def presented_keys(headers: dict[str, str] | object) -> list[str]:
    """Keys a request carries in any of the accepted headers."""
    get = headers.get  # type: ignore[attr-defined]
    keys = [get("x-api-key"), get("x-admin-key")]
    authorization = get("authorization") or ""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer":
        keys.append(token.strip())
    return [k for k in keys if k]
