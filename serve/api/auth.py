"""Tenants: bearer tokens -> (tenant, role), and who may use, list or describe which adapter.

The tokens file is TOML, one ``[[token]]`` table per credential::

    [[token]]
    token_sha256 = "9f86d08..."   # sha256 hex of the token (preferred), or: token = "plain-text"
    tenant = "acme"               # the tenant whose private adapters (acme/...) it may use
    role = "user"                 # "user" (default) or "admin" (Load/Unload, sees every adapter)

Rules: public adapters are for everyone; a private adapter only for its tenant (``acme/tone`` is
acme's) and admins. Asking for another tenant's private adapter -- or for one of its names that does
not exist -- gets the same PERMISSION_DENIED, so tenants cannot probe each other's names.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path

from hotswap.errors import AdapterNotFound, InvalidArgument, PermissionDenied, Unauthenticated
from hotswap.registry import AdapterRef, Manifest, Registry
from hotswap.registry.refs import check_part

ROLES = ("user", "admin")


@dataclass(frozen=True)
class Principal:
    tenant: str | None  # None: no tenant of its own (admins, or everyone when auth is off)
    role: str = "user"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, visibility: str, tenant: str | None) -> bool:
        return self.is_admin or visibility == "public" or (tenant is not None and tenant == self.tenant)


# Used when the server runs with --no-auth: every caller may do everything.
ANONYMOUS_ADMIN = Principal(tenant=None, role="admin")


@dataclass(frozen=True)
class _Credential:
    digest: bytes  # sha256 of the token
    principal: Principal


class TokenAuth:
    """Authenticates ``authorization: Bearer <token>`` metadata against a tokens file."""

    def __init__(self, credentials: list[_Credential]) -> None:
        if not credentials:
            raise InvalidArgument("the tokens file defines no [[token]]; use --no-auth to run without auth")
        self._credentials = credentials

    @classmethod
    def from_file(cls, path: str | Path) -> TokenAuth:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InvalidArgument(f"tokens file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise InvalidArgument(f"tokens file {path} is not valid TOML: {e}") from None
        unknown = set(data) - {"token"}
        if unknown:
            raise InvalidArgument(f"tokens file {path}: unknown top-level keys {sorted(unknown)}")
        creds = []
        for i, entry in enumerate(data.get("token", []), 1):
            where = f"tokens file {path}, [[token]] #{i}"
            extra = set(entry) - {"token", "token_sha256", "tenant", "role"}
            if extra:
                raise InvalidArgument(f"{where}: unknown keys {sorted(extra)}")
            if ("token" in entry) == ("token_sha256" in entry):
                raise InvalidArgument(f"{where}: give exactly one of token and token_sha256")
            if "token" in entry:
                digest = hashlib.sha256(str(entry["token"]).encode()).digest()
            else:
                try:
                    digest = bytes.fromhex(entry["token_sha256"])
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise InvalidArgument(f"{where}: token_sha256 must be 64 hex digits")
            role = entry.get("role", "user")
            if role not in ROLES:
                raise InvalidArgument(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
            tenant = entry.get("tenant")
            if tenant is not None:
                check_part(tenant, "tenant")
            elif role != "admin":
                raise InvalidArgument(f"{where}: a user token needs a tenant")
            creds.append(_Credential(digest, Principal(tenant=tenant, role=role)))
        return cls(creds)

    def authenticate(self, metadata: dict[str, str]) -> Principal:
        header = metadata.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <token>'")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for cred in self._credentials:  # compare against every entry, in constant time each
            if hmac.compare_digest(cred.digest, digest):
                found = cred.principal
        if found is None:
            raise Unauthenticated("unknown token")
        return found


def authorize(registry: Registry, principal: Principal, ref: str) -> Manifest:
    """Resolve ``ref`` for ``principal``: its manifest, or PermissionDenied / AdapterNotFound.

    Checked before anything else about the adapter (e.g. its base), so nothing leaks to other tenants.
    """
    parsed = AdapterRef.parse(ref)
    foreign = parsed.tenant is not None and parsed.tenant != principal.tenant and not principal.is_admin
    denied = PermissionDenied(f"adapter {parsed.full_name} is private to tenant {parsed.tenant}")
    try:
        manifest = registry.resolve(parsed)
    except AdapterNotFound:
        if foreign:
            raise denied from None
        raise
    if not principal.may_see(manifest.visibility, manifest.tenant):
        raise denied if manifest.tenant else PermissionDenied(f"adapter {manifest.name} is private (admins only)")
    return manifest
