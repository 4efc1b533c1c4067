"""Who is calling: a Clerk user or an anonymous device, and from where.

    user = await current_user(request)        # Clerk or device; 401/403/429
    user = await require_clerk_user(request)  # Clerk only; 401 without a session token
    user = await known_user(request)          # as current_user, but None for a caller never seen
    ip = source_ip(request)                   # API Gateway's view, never a client header

`Authorization: Bearer <jwt>` is a Clerk session token verified here, without
a network call: RS256 only, against the PEM key in CLERK_JWT_KEY; `exp` and
`nbf` with 5 s of clock skew; `iss` when CLERK_ISSUER is set; `azp` against
CLERK_AUTHORIZED_PARTIES when set (a token without `azp`, as a native app
gets, passes: Clerk's own verification skips the check then). `X-Device-Id`
is an anonymous device. Both: the Clerk user. Neither, a bad token or a
malformed device id: 401.

A warm Lambda keeps the users it has resolved for 30 s (keyed by Clerk id or
device id) so a repeat caller costs no database round trip for identity.
Linking a device must call `forget_identity(device_id=...)`; another warm
process may keep acting for the old device user until its entry expires,
which moves nothing: the tokens already left that wallet.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable
from functools import lru_cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

from cachetools import TTLCache
from starlette.requests import Request

from database import ConfigurationError, Unauthorized
from functions import settings

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

    from repositories.users import User

LEEWAY_SECONDS = 5
# a Clerk session token is ~1 KB; anything far larger is not one
MAX_TOKEN_LENGTH = 8192
MAX_SUBJECT_LENGTH = 255
MAX_EMAIL_LENGTH = 320
DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{8,128}")

IDENTITY_TTL_SECONDS = 30.0
IDENTITY_CACHE_SIZE = 10_000

# the clock is injectable so tests can expire entries without sleeping
clock: Callable[[], float] = time.monotonic


def _now() -> float:
    return clock()


_identities: TTLCache[tuple[str, str], Any] = TTLCache(
    maxsize=IDENTITY_CACHE_SIZE, ttl=IDENTITY_TTL_SECONDS, timer=_now
)


# ------------------------------------------------------------- Clerk tokens


def _pem_text(raw: str) -> str:
    """CLERK_JWT_KEY as PEM: environment variables often carry it with `\\n`
    escapes, or as the bare base64 body the dashboard also shows."""
    text = raw.strip().replace("\\n", "\n")
    if "-----BEGIN" in text:
        return text
    body = "".join(text.split())
    lines = [body[start : start + 64] for start in range(0, len(body), 64)]
    return "-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n"


@lru_cache(maxsize=4)
def _public_key(raw: str) -> RSAPublicKey:
    # parsed once per cold start, not per request
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(_pem_text(raw).encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ConfigurationError("CLERK_JWT_KEY is not a PEM public key") from exc
    if not isinstance(key, RSAPublicKey):
        raise ConfigurationError("CLERK_JWT_KEY is not an RSA public key")
    return key


def verify_session_token(token: str) -> dict[str, Any]:
    """The claims of a valid Clerk session token; Unauthorized for anything else."""
    # PyJWT loads cryptography (RSA, EC, X.509): imported by the first Bearer
    # token, so a cold start serving a device, the webhook or the worker never pays it
    import jwt

    raw_key = settings.clerk_jwt_key()
    if raw_key is None:
        raise ConfigurationError("CLERK_JWT_KEY is not set: Clerk session tokens cannot be verified")
    key = _public_key(raw_key)
    if len(token) > MAX_TOKEN_LENGTH:
        raise Unauthorized("Invalid session token")
    issuer = settings.clerk_issuer()
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            # the only algorithm: refuses `none` and HS256 keyed with the public key
            algorithms=["RS256"],
            leeway=LEEWAY_SECONDS,
            issuer=issuer,
            options={"require": ["exp", "sub"], "verify_aud": False},
        )
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise Unauthorized("Invalid or expired session token") from exc
    parties = settings.clerk_authorized_parties()
    azp = claims.get("azp")
    if parties and azp is not None and (not isinstance(azp, str) or azp not in parties):
        raise Unauthorized("Session token was issued to another origin")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_LENGTH:
        raise Unauthorized("Session token has no valid subject")
    return claims


def bearer_token(request: Request) -> str | None:
    """The session token, None when there is no Authorization header (an empty
    one counts as none); Unauthorized when it is not `Bearer <token>`."""
    header = request.headers.get("authorization")
    if header is None or not header.strip():
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization must be 'Bearer <session token>'")
    return token.strip()


def device_id(request: Request) -> str | None:
    value = request.headers.get("x-device-id")
    if value is None:
        return None
    if not DEVICE_ID.fullmatch(value):
        raise Unauthorized("X-Device-Id must be 8-128 characters of A-Z, a-z, 0-9, '_' and '-'")
    return value


# --------------------------------------------------------------- source IP


def _address(raw: object) -> str | None:
    """A single address; API Gateway's test events write it as `a.b.c.d/32`."""
    if not isinstance(raw, str) or not raw.strip():
        return None
    text, slash, prefix = raw.strip().partition("/")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if slash and prefix != str(address.max_prefixlen):
        return None
    return str(address)


def source_ip(request: Request) -> str | None:
    """The caller's IP as API Gateway saw the connection (v2
    `requestContext.http.sourceIp`, v1 `requestContext.identity.sourceIp`).
    Never X-Forwarded-For: a client writes that header. Outside API Gateway
    (the local server) the connection's peer address."""
    event = request.scope.get("aws.event")
    if isinstance(event, dict):
        context = event.get("requestContext")
        if not isinstance(context, dict):
            return None
        for part in ("http", "identity"):
            section = context.get(part)
            if isinstance(section, dict) and section.get("sourceIp"):
                return _address(section["sourceIp"])
        return None
    client = request.scope.get("client")
    return _address(client[0]) if client else None


# ------------------------------------------------------------------ callers


def _users() -> ModuleType:
    # imported on first use: the functions that never identify a caller
    # (health, init-db, the webhooks) do not load it at cold start
    from repositories import users

    return users


def _remember(kind: str, key: str, user: User) -> None:
    # a cached user was not created by the request that finds it
    _identities[(kind, key)] = user.model_copy(update={"created": False})


async def _clerk_user(claims: dict[str, Any]) -> User:
    clerk_id: str = claims["sub"]
    cached: User | None = _identities.get(("clerk", clerk_id))
    if cached is not None:
        return cached
    email = claims.get("email")
    if not isinstance(email, str) or not 0 < len(email) <= MAX_EMAIL_LENGTH:
        email = None
    user: User = await _users().get_or_create_clerk_user(clerk_id, email)
    _remember("clerk", clerk_id, user)
    return user


async def _device_user(device: str, request: Request) -> User:
    cached: User | None = _identities.get(("device", device))
    if cached is not None:
        return cached
    # raises DeviceLinked (403) for a device merged into an account and
    # RateLimited (429) past the per-IP signup limit: neither is cached
    user: User = await _users().get_or_create_device_user(
        device, source_ip(request), settings.anon_signups_per_ip_per_hour()
    )
    _remember("device", device, user)
    return user


def _identified(request: Request, user: User) -> User:
    request.state.user_id = user.id  # for the request log line
    return user


async def current_user(request: Request) -> User:
    """The caller, created on first sight: the Clerk user when a session token
    is sent (a device id beside it is ignored), else the device's user."""
    token = bearer_token(request)
    if token is not None:
        return _identified(request, await _clerk_user(verify_session_token(token)))
    device = device_id(request)
    if device is None:
        raise Unauthorized("Send a Clerk session token (Authorization: Bearer) or X-Device-Id")
    return _identified(request, await _device_user(device, request))


async def known_user(request: Request) -> User | None:
    """The caller as `current_user` finds it, or None for one never seen:
    for a request that can only answer what its caller did before, and so
    must not write a new caller's user and welcome bonus."""
    token = bearer_token(request)
    if token is not None:
        clerk_id: str = verify_session_token(token)["sub"]
        kind, key, find = "clerk", clerk_id, _users().find_clerk_user
    else:
        device = device_id(request)
        if device is None:
            raise Unauthorized("Send a Clerk session token (Authorization: Bearer) or X-Device-Id")
        kind, key, find = "device", device, _users().find_device_user
    user: User | None = _identities.get((kind, key))
    if user is None:
        user = await find(key)
        if user is None:
            return None
        _remember(kind, key, user)
    return _identified(request, user)


async def require_clerk_user(request: Request) -> User:
    """The signed-in caller, for endpoints a device alone may not use."""
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("Sign in first: send a Clerk session token (Authorization: Bearer)")
    return _identified(request, await _clerk_user(verify_session_token(token)))


def forget_identity(*, clerk_id: str | None = None, device_id: str | None = None) -> None:
    """Drop a cached caller (after linking a device, the device must resolve afresh)."""
    if clerk_id is not None:
        _identities.pop(("clerk", clerk_id), None)
    if device_id is not None:
        _identities.pop(("device", device_id), None)


def forget_all() -> None:
    _identities.clear()
