"""Pieces the RSMQ tests share (tests/rsmq is on pytest's pythonpath: pyproject.toml)."""

from __future__ import annotations

import json
from typing import Any

from volley_rsmq import RsmqClient, parse_settings


def seed(config: dict[str, Any], qname: str, count: int) -> None:
    """``count`` JSON messages ``{"id": i}`` on ``qname``, sent with Volley's own RSMQ client."""
    client = RsmqClient(parse_settings(config, qname, "output"))
    try:
        client.send(qname, [(None, json.dumps({"id": i}).encode()) for i in range(count)])
    finally:
        client.close()
