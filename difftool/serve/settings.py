"""What the operator chose on the ``difftool serve`` command line, checked once."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from difftool.core.errors import ParameterError

#: Largest request body accepted (bytes): a 4096 x 4096 RGBA PNG in base64 fits with room to spare.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServeSettings:
    """The server's configuration; :meth:`check` refuses unsafe combinations with a one-line error."""

    host: str = "127.0.0.1"
    port: int = 7860
    api_token: str | None = None
    insecure: bool = False
    allow_paths: tuple[Path, ...] = ()
    cors_origins: tuple[str, ...] = ()
    queue_size: int = 16
    devices: tuple[str, ...] = ("cpu",)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Finished jobs kept for ``GET /v1/jobs/{id}`` and their results; the oldest are forgotten first.
    keep_jobs: int = 256
    #: Seconds a cancelled job may take to stop before it is abandoned and its worker replaced.
    abandon_after: float = 10.0
    #: Seconds open requests and running jobs get at shutdown (SIGTERM) before they are cancelled.
    shutdown_timeout: float = 30.0
    #: The A1111 ``sd_model_checkpoint`` option at start (``None``: the first Stable Diffusion model found).
    default_model: str | None = None

    def check(self) -> ServeSettings:
        """Raise :class:`ParameterError` for an unsafe or impossible configuration; return ``self``."""
        if not is_loopback(self.host) and not self.api_token and not self.insecure:
            raise ParameterError(
                f"--host {self.host} listens beyond this machine without authentication",
                "pass --api-token TOKEN (clients send 'Authorization: Bearer TOKEN') or --insecure",
            )
        if self.api_token is not None and len(self.api_token) < 8:
            raise ParameterError("--api-token is shorter than 8 characters", "use a long random token")
        for root in self.allow_paths:
            if not root.is_dir():
                raise ParameterError(f"--allow-path {root} is not a folder", "pass an existing folder")
        if not 1 <= self.queue_size <= 100_000:
            raise ParameterError(f"--queue-size {self.queue_size} is out of range", "pass 1 to 100000")
        if not self.devices:
            raise ParameterError("no --device given", "pass --device cpu or --device cuda:N")
        return self


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
