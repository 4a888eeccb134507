"""``corral.secrets``: the tenant's secrets, set here and used by sandboxes without entering them.

    from corral import secrets
    secrets.set("openai", "sk-...")
    Sandbox.create(secrets=[SecretBinding("openai", hosts=["api.openai.com"],
                                          header="Authorization", format="Bearer {value}")])

Values are write-only: ``list`` and ``get`` answer names and times, never a value. Each call
opens a connection for itself (like ``Template``) and goes through the ``Client``/``AsyncClient``
method of the same job; ``api_key``/``base_url`` default to ``CORRAL_API_KEY``/``CORRAL_URL``,
then the admin key file on the server's host. ``AsyncSecrets`` has the same calls for asyncio.
"""

from __future__ import annotations

import builtins

from corral.sdk.async_sandbox import AsyncClient
from corral.sdk.models import SecretBinding, SecretInfo
from corral.sdk.sandbox import Client

__all__ = ["AsyncSecrets", "SecretBinding", "SecretInfo", "delete", "get", "list", "set"]


def set(
    name: str, value: str, *, api_key: str | None = None, base_url: str | None = None
) -> SecretInfo:
    """Create the secret ``name`` or replace its value; answer its name and times.

    Names are 1 to 64 letters, digits, ``.``, ``_`` and ``-`` (starting with a letter or digit);
    values 1 to 16384 characters without control characters (they are sent in HTTP headers).
    Either wrong: ``InvalidRequestError``; beyond 1000 secrets: ``QuotaExceededError``.
    """
    with Client(api_key=api_key, base_url=base_url) as client:
        return client.set_secret(name, value)


def get(name: str, *, api_key: str | None = None, base_url: str | None = None) -> SecretInfo:
    """One secret's name and times, not its value (``NotFoundError`` if there is none)."""
    with Client(api_key=api_key, base_url=base_url) as client:
        return client.get_secret(name)


def list(*, api_key: str | None = None, base_url: str | None = None) -> builtins.list[SecretInfo]:
    """The tenant's secrets by name."""
    with Client(api_key=api_key, base_url=base_url) as client:
        return client.list_secrets()


def delete(name: str, *, api_key: str | None = None, base_url: str | None = None) -> None:
    """Delete a secret (``NotFoundError`` if there is none by that name)."""
    with Client(api_key=api_key, base_url=base_url) as client:
        client.delete_secret(name)


class AsyncSecrets:
    """``corral.secrets`` for asyncio."""

    @staticmethod
    async def set(
        name: str, value: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> SecretInfo:
        async with AsyncClient(api_key=api_key, base_url=base_url) as client:
            return await client.set_secret(name, value)

    @staticmethod
    async def get(
        name: str, *, api_key: str | None = None, base_url: str | None = None
    ) -> SecretInfo:
        async with AsyncClient(api_key=api_key, base_url=base_url) as client:
            return await client.get_secret(name)

    @staticmethod
    async def list(
        *, api_key: str | None = None, base_url: str | None = None
    ) -> builtins.list[SecretInfo]:
        async with AsyncClient(api_key=api_key, base_url=base_url) as client:
            return await client.list_secrets()

    @staticmethod
    async def delete(name: str, *, api_key: str | None = None, base_url: str | None = None) -> None:
        async with AsyncClient(api_key=api_key, base_url=base_url) as client:
            await client.delete_secret(name)
