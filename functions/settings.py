"""Configuration of the HTTP functions, read lazily and kept for the cold start.

Every value comes from the environment (names as in API.md). Any of them may
instead come from AWS Secrets Manager: set `<NAME>_SECRET_ARN` (for example
`CLERK_JWT_KEY_SECRET_ARN`) and the secret is read once per cold start, the
first time the value is needed. A secret holds either the value itself or a
JSON object with the value under `<NAME>`, so one secret can carry several
values (each ARN is fetched once however many names point at it). When both
`<NAME>` and `<NAME>_SECRET_ARN` are set, the secret wins: the ARN is the
deliberate production setting, the plain variable is often a leftover.

boto3 is imported inside that code path only: a function whose configuration
has no ARN never pays for it at cold start.

The database URL is read by database/config.py from the environment, so
`DATABASE_URL_SECRET_ARN` / `POSTGRES_URL_SECRET_ARN` /
`POSTGRES_URL_NON_POOLING_SECRET_ARN` are resolved into os.environ by
`load_database_secrets()` before the first statement (the request middleware
calls it; a command-line entry point calls it before touching the database).
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

from database import ConfigurationError, Unavailable
from database import config as database_config

T = TypeVar("T")

SECRET_ARN_SUFFIX = "_SECRET_ARN"  # noqa: S105 (a variable-name suffix, not a secret)

DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_ANON_SIGNUPS_PER_IP_PER_HOUR = 5
DEFAULT_YOOKASSA_API_URL = "https://api.yookassa.ru/v3"
# YooKassa's published notification source addresses
# (https://yookassa.ru/developers/using-api/webhooks#ip)
DEFAULT_YOOKASSA_TRUSTED_NETWORKS = (
    "185.71.76.0/27",
    "185.71.77.0/27",
    "77.75.153.0/25",
    "77.75.156.11/32",
    "77.75.156.35/32",
    "77.75.154.128/25",
    "2a02:5180::/32",
)
DATABASE_URL_NAMES = ("DATABASE_URL", "POSTGRES_URL", "POSTGRES_URL_NON_POOLING")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_resets: list[Callable[[], None]] = []


def _per_cold_start(function: Callable[[], T]) -> Callable[[], T]:
    """Compute once, keep until `reset()` (tests change the environment)."""
    cached = cache(function)
    _resets.append(cached.cache_clear)
    return cached


# ------------------------------------------------------------ Secrets Manager

# what each ARN held, and the clients by region: one GetSecretValue per ARN per cold start
_secret_strings: dict[str, str] = {}
_clients: dict[str, Any] = {}


def _region_of(arn: str, name: str) -> str:
    # arn:aws:secretsmanager:<region>:<account>:secret:<name>
    parts = arn.split(":")
    if len(parts) < 7 or parts[0] != "arn" or parts[2] != "secretsmanager" or not parts[3]:
        raise ConfigurationError(f"{name}{SECRET_ARN_SUFFIX} is not a Secrets Manager ARN")
    return parts[3]


def secrets_client(region: str) -> Any:
    client = _clients.get(region)
    if client is None:
        import boto3  # only functions configured with an ARN pay for boto3

        client = _clients[region] = boto3.client("secretsmanager", region_name=region)
    return client


def _secret_string(arn: str, name: str) -> str:
    if arn in _secret_strings:
        return _secret_strings[arn]
    from botocore.exceptions import BotoCoreError, ClientError

    client = secrets_client(_region_of(arn, name))
    try:
        response = client.get_secret_value(SecretId=arn)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        if code in ("ThrottlingException", "InternalServiceError"):
            raise Unavailable("Configuration store unavailable") from exc
        # access denied, missing secret: the deployment is wrong, not the request
        raise ConfigurationError(f"{name}{SECRET_ARN_SUFFIX} could not be read ({code})") from exc
    except BotoCoreError as exc:
        raise Unavailable("Configuration store unavailable") from exc
    if "SecretString" in response:
        text = str(response["SecretString"])
    else:
        text = bytes(response["SecretBinary"]).decode("utf-8")
    _secret_strings[arn] = text
    return text


def _from_secret(arn: str, name: str) -> str:
    text = _secret_string(arn, name)
    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except ValueError:
            document = None
        if isinstance(document, dict):
            if name not in document:
                raise ConfigurationError(f"the secret in {name}{SECRET_ARN_SUFFIX} has no key {name}")
            return str(document[name])
    return text


def value(name: str) -> str | None:
    """The named setting from its secret (when `<NAME>_SECRET_ARN` is set) or the
    environment; blank counts as unset."""
    arn = os.environ.get(name + SECRET_ARN_SUFFIX, "").strip()
    raw = _from_secret(arn, name) if arn else os.environ.get(name)
    if raw is None:
        return None
    raw = raw.strip()
    return raw or None


_database_secrets_loaded = False


def load_database_secrets() -> None:
    """Put database URLs kept in Secrets Manager into os.environ, once per cold start,
    before database/config.py reads them."""
    global _database_secrets_loaded
    if _database_secrets_loaded:
        return
    changed = False
    for name in DATABASE_URL_NAMES:
        arn = os.environ.get(name + SECRET_ARN_SUFFIX, "").strip()
        if arn:
            os.environ[name] = _from_secret(arn, name).strip()
            changed = True
    if changed:
        # settings read before this point would still hold the old URL
        database_config.reset()
    _database_secrets_loaded = True


# ------------------------------------------------------------------- parsing


def integer(name: str, default: int, minimum: int) -> int:
    """The named whole-number setting, or a ConfigurationError that says
    what is wrong with it (never a bare ValueError from deep inside a job)."""
    raw = value(name)
    if raw is None:
        return default
    try:
        number = int(raw)
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from exc
    if number < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum}, got {number}")
    return number


def _list(name: str) -> tuple[str, ...]:
    raw = value(name) or ""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


# ------------------------------------------------------------------ settings


@_per_cold_start
def clerk_jwt_key() -> str | None:
    """The PEM public key of the Clerk instance (see identity.py for accepted forms)."""
    return value("CLERK_JWT_KEY")


@_per_cold_start
def clerk_issuer() -> str | None:
    return value("CLERK_ISSUER")


@_per_cold_start
def clerk_authorized_parties() -> frozenset[str]:
    return frozenset(_list("CLERK_AUTHORIZED_PARTIES"))


@_per_cold_start
def yookassa_shop_id() -> str | None:
    return value("YOOKASSA_SHOP_ID")


@_per_cold_start
def yookassa_secret_key() -> str | None:
    return value("YOOKASSA_SECRET_KEY")


@_per_cold_start
def yookassa_api_url() -> str:
    return (value("YOOKASSA_API_URL") or DEFAULT_YOOKASSA_API_URL).rstrip("/")


@_per_cold_start
def yookassa_return_url() -> str | None:
    return value("YOOKASSA_RETURN_URL")


@_per_cold_start
def yookassa_trusted_networks() -> tuple[IPNetwork, ...]:
    names = _list("YOOKASSA_TRUSTED_NETWORKS") or DEFAULT_YOOKASSA_TRUSTED_NETWORKS
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in names)
    except ValueError as exc:
        raise ConfigurationError(f"YOOKASSA_TRUSTED_NETWORKS has a bad network: {exc}") from exc


@_per_cold_start
def generation_callback_secret() -> str | None:
    return value("GENERATION_CALLBACK_SECRET")


@_per_cold_start
def db_init_secret() -> str | None:
    return value("DB_INIT_SECRET")


@_per_cold_start
def anon_signups_per_ip_per_hour() -> int:
    return integer("ANON_SIGNUPS_PER_IP_PER_HOUR", DEFAULT_ANON_SIGNUPS_PER_IP_PER_HOUR, minimum=0)


@_per_cold_start
def images_bucket() -> str | None:
    return value("IMAGES_BUCKET")


@_per_cold_start
def max_body_bytes() -> int:
    return integer("MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, minimum=1)


def reset() -> None:
    """Forget every value, secret and client: the next use reads again (tests)."""
    global _database_secrets_loaded
    for clear in _resets:
        clear()
    _secret_strings.clear()
    _clients.clear()
    _database_secrets_loaded = False
