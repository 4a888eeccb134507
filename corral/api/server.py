"""``corral server``: run the API with uvicorn."""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import uvicorn

from corral.api.app import create_app
from corral.config import ServerConfig

__all__ = ["run_server"]


def run_server(
    listen: str | None,
    data_dir: Path | None,
    *,
    config_file: Path | None = None,
    log_level: str = "info",
) -> None:
    config = ServerConfig.load(config_file, listen=listen, data_dir=data_dir)
    # The egress proxy holds six descriptors per sandbox connection: take all we are allowed.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, port = config.listen_host_port()
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_level=log_level,
        # Exec latency is what agents feel: keep per-request overhead minimal.
        access_log=False,
        timeout_graceful_shutdown=5,
    )
