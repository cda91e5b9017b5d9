"""The one place a `Sender` is built from `Settings`: the real Evolution client or the sandbox."""

from __future__ import annotations

import aiohttp

from evomsgd.config import Settings
from evomsgd.evolution.client import EvolutionClient, SandboxClient, Sender


def build_sender(settings: Settings, session: aiohttp.ClientSession) -> Sender:
    """The sandbox in sandbox mode, else an Evolution client over `session` (caller-owned)."""
    if settings.sandbox:
        return SandboxClient()
    settings.require_evolution()
    assert settings.evolution_url is not None and settings.evolution_key is not None
    return EvolutionClient(
        session,
        settings.evolution_url,
        settings.evolution_key.get_secret_value(),
        timeout=settings.evolution_timeout,
        api_version=settings.evolution_api_version,
    )
