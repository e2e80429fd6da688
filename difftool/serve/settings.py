"""What the operator chose on the ``difftool serve`` command line, checked once."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from difftool.core.errors import ParameterError

#: Largest request body accepted (bytes): a 4096 x 4096 RGBA PNG in base64 fits with room to spare.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
#: Largest image (width x height) a request may send or ask for: 4096 x 4096, well under the command
#: line's 89.5 MP, because a few kilobytes of PNG can decode to gigabytes (checked from the header).
DEFAULT_MAX_PIXELS = 4096 * 4096
#: A request's outputs together (pixels x count) may be this many times ``max_pixels``.
WORK_OUTPUTS = 4


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
    #: Seconds a client has to send a request's headers after connecting (or after the previous response).
    header_timeout: float = 10.0
    #: Largest image a request may send or ask for (pixels); its outputs together: ``WORK_OUTPUTS`` times this.
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def max_work_pixels(self) -> int:
        """The most output pixels (size x count) one request may ask for."""
        return WORK_OUTPUTS * self.max_pixels

    def check(self) -> ServeSettings:
        """Raise :class:`ParameterError` for an unsafe or impossible configuration; return ``self``."""
        if not is_loopback(self.host) and not self.api_token and not self.insecure:
            raise ParameterError(
                f"--host {self.host} listens beyond this machine without authentication",
                "pass --api-token TOKEN (clients send 'Authorization: Bearer TOKEN') or --insecure",
            )
        if self.api_token is not None:
            if len(self.api_token.strip()) < 8:
                raise ParameterError("--api-token is shorter than 8 characters", "use a long random token")
            token = self.api_token
            if not (token.isascii() and token.isprintable()) or " " in token:
                raise ParameterError(
                    "--api-token holds spaces or characters an HTTP header cannot carry",
                    "use letters, digits and punctuation, e.g. from Python's secrets.token_urlsafe()",
                )
        if self.host.startswith("[") or self.host.endswith("]"):
            raise ParameterError(f"--host {self.host}: write an IPv6 address without brackets", "pass e.g. --host ::1")
        if not 1 <= self.max_pixels <= 1 << 31:
            raise ParameterError(f"--max-pixels {self.max_pixels} is out of range", "pass 1 to 2147483648")
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
