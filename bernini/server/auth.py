"""Who may call the server (loopback by default; a bearer token beyond it) and how much one caller may ask for."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

LOCALHOST = "127.0.0.1"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")  # exactly these: any other address, 127.0.0.2 included, needs the token
TOKEN_ENV = "BERNINI_API_TOKEN"


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 500 * 1024 * 1024  # one request body
    max_queued: int = 100  # jobs waiting; more get HTTP 429
    max_page: int = 100  # GET /v1/videos?limit=

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1024:
            raise ValueError(f"--max_upload_mb {self.max_upload_bytes / 2**20:g} is too small: allow at least 1 KiB (0.001)")
        if self.max_queued < 1:
            raise ValueError(f"--max_queue {self.max_queued} is invalid: at least 1 job must be able to wait")


@dataclass(frozen=True)
class Access:
    """Where the server listens and the token callers must send (None: no token, loopback only)."""

    host: str = LOCALHOST
    port: int = 8000
    token: str | None = field(default=None, repr=False)  # never in a log line or a repr

    def allows(self, authorization: str | None) -> bool:
        """Whether an Authorization header passes (constant-time comparison)."""
        if self.token is None:
            return True
        scheme, _, sent = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(sent.strip().encode(), self.token.encode())


def access_for(host: str, port: int, environ: Mapping[str, str]) -> Access:
    """Refuse to listen beyond this machine without a token; ValueError says what to set."""
    if not 0 < port < 65536:
        raise ValueError(f"--port {port} is not a TCP port (1-65535)")
    token = environ.get(TOKEN_ENV) or None
    if token is not None and not token.strip():
        raise ValueError(f"{TOKEN_ENV} is blank; set a secret (e.g. `export {TOKEN_ENV}=$(openssl rand -hex 32)`) or unset it")
    if host not in LOOPBACK_NAMES and token is None:
        raise ValueError(
            f"--host {host} would let anyone who reaches that address use the GPU: set {TOKEN_ENV} to a secret "
            f"(e.g. `export {TOKEN_ENV}=$(openssl rand -hex 32)`; clients send it as a bearer token), or serve on {LOCALHOST}"
        )
    return Access(host, port, token.strip() if token else None)
