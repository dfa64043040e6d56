"""Who is calling: bearer tokens -> tenants, and the admin token (RKV API v1.1).

Rules, in the order the server applies them:

* No tenant tokens configured: every caller is the anonymous operator (`Caller(None)`),
  as in RKV API v1; claims are not scoped.
* Tenant tokens configured: a request must carry `Authorization: Bearer <token>` naming a
  tenant or the admin; anything else is 401. A tenant sees only its own claims, events and
  block hashes; the admin sees everything.
* Admin routes (reset, fault injection) are off unless an admin token is configured, and
  then need it (403 for a tenant token, 401 for none); off, they answer 501.

Tokens are compared in constant time and never printed or logged. This module knows
nothing about claims: the runtime gets only the tenant name (`Caller.tenant`).
"""

from __future__ import annotations

import hmac
import os
import re
from dataclasses import dataclass, field

TOKENS_ENV = "RKV_TOKENS"  # "token=tenant,token=tenant"
ADMIN_TOKEN_ENV = "RKV_ADMIN_TOKEN"
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class AuthError(Exception):
    """A request the tenancy rules refuse: `status` 401 (who are you?), 403 (not you) or
    501 (an admin route on a server started without an admin token)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Caller:
    tenant: str | None  # None: not tenant-scoped (no tenancy, or the admin)
    admin: bool = False


@dataclass(frozen=True)
class Tenancy:
    tokens: dict[str, str] = field(default_factory=dict)  # bearer token -> tenant
    admin_token: str | None = None

    def __post_init__(self) -> None:
        for token, tenant in self.tokens.items():
            if not _TENANT.fullmatch(tenant):
                raise ValueError(f"tenant name {tenant!r} must match {_TENANT.pattern}")
            if len(token) < 8:
                raise ValueError(f"the token of tenant {tenant!r} is shorter than 8 characters")
        if self.admin_token is not None:
            if len(self.admin_token) < 8:
                raise ValueError("the admin token is shorter than 8 characters")
            if self.admin_token in self.tokens:
                raise ValueError("the admin token is also a tenant's token")

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    @property
    def tenants(self) -> list[str]:
        return sorted(set(self.tokens.values()))

    @classmethod
    def parse(cls, tokens: str | None, admin_token: str | None) -> "Tenancy":
        """From "token=tenant,token=tenant" (the RKV_TOKENS form) and an admin token."""
        pairs: dict[str, str] = {}
        for item in (tokens or "").split(","):
            if not item.strip():
                continue
            token, sep, tenant = item.strip().partition("=")
            if not sep or not token or not tenant:
                raise ValueError("tenant tokens must be given as TOKEN=TENANT, comma-separated")
            if token in pairs:
                raise ValueError(f"one token is given twice (tenants {pairs[token]!r} and {tenant!r})")
            pairs[token] = tenant
        return cls(pairs, admin_token or None)

    @classmethod
    def from_env(cls) -> "Tenancy":
        return cls.parse(os.environ.get(TOKENS_ENV), os.environ.get(ADMIN_TOKEN_ENV))

    def caller(self, authorization: str | None) -> Caller:
        """The caller an `Authorization` header names. Raises AuthError(401)."""
        token = _bearer(authorization)
        if token is not None and self.admin_token is not None and _same(token, self.admin_token):
            return Caller(None, admin=True)
        if not self.enabled:
            if token is not None and self.admin_token is None:
                return Caller(None)  # v1 servers ignore tokens they do not know
            if token is not None:
                raise AuthError(401, "unknown bearer token")
            return Caller(None)
        if token is None:
            raise AuthError(401, "this server has tenants: send Authorization: Bearer <token>")
        for known, tenant in self.tokens.items():
            if _same(token, known):
                return Caller(tenant)
        raise AuthError(401, "unknown bearer token")

    def admin(self, caller: Caller) -> None:
        """Raise AuthError unless `caller` may use an admin route."""
        if self.admin_token is None:
            raise AuthError(501, "admin routes are off: the server was started without an admin token")
        if not caller.admin:
            raise AuthError(403, "this route needs the admin token")


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError(401, "Authorization must be 'Bearer <token>'")
    return value.strip()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
