"""Configuration: defaults, validation, and secrets from AWS Secrets Manager
(moto) read once per cold start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import ip_address

import boto3
import pytest
from moto import mock_aws

from database import ConfigurationError
from database import config as database_config
from functions import settings
from functions.init_db import handler as init_db_handler
from tests.functions.lambda_events import EVENT_BUILDERS, invoke

REGION = "eu-central-1"
CONFIG_NAMES = [
    "CLERK_JWT_KEY",
    "CLERK_ISSUER",
    "CLERK_AUTHORIZED_PARTIES",
    "YOOKASSA_SHOP_ID",
    "YOOKASSA_SECRET_KEY",
    "YOOKASSA_API_URL",
    "YOOKASSA_RETURN_URL",
    "YOOKASSA_TRUSTED_NETWORKS",
    "GENERATION_CALLBACK_SECRET",
    "DB_INIT_SECRET",
    "ANON_SIGNUPS_PER_IP_PER_HOUR",
    "IMAGES_BUCKET",
    "MAX_BODY_BYTES",
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CONFIG_NAMES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name + "_SECRET_ARN", raising=False)
    settings.reset()


@pytest.fixture
def secretsmanager(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        yield boto3.client("secretsmanager", region_name=REGION)


def count_fetches(region: str = REGION) -> list[str]:
    """Every GetSecretValue the settings module sends, by secret id."""
    fetched: list[str] = []
    client = settings.secrets_client(region)
    client.meta.events.register(
        "before-parameter-build.secrets-manager.GetSecretValue",
        lambda params, **_: fetched.append(params["SecretId"]),
    )
    return fetched


def test_defaults() -> None:
    assert settings.max_body_bytes() == 64 * 1024
    assert settings.anon_signups_per_ip_per_hour() == 5
    assert settings.clerk_jwt_key() is None
    assert settings.clerk_authorized_parties() == frozenset()
    assert settings.db_init_secret() is None
    assert settings.yookassa_api_url() == "https://api.yookassa.ru/v3"
    networks = settings.yookassa_trusted_networks()
    assert any(ip_address("185.71.76.5") in network for network in networks)
    assert not any(ip_address("192.168.0.1") in network for network in networks)


def test_values_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLERK_AUTHORIZED_PARTIES", " https://a.example ,https://b.example,, ")
    monkeypatch.setenv("ANON_SIGNUPS_PER_IP_PER_HOUR", "0")
    monkeypatch.setenv("MAX_BODY_BYTES", "1024")
    monkeypatch.setenv("YOOKASSA_TRUSTED_NETWORKS", "10.0.0.0/8,2001:db8::1")
    monkeypatch.setenv("DB_INIT_SECRET", "   ")
    assert settings.clerk_authorized_parties() == {"https://a.example", "https://b.example"}
    assert settings.anon_signups_per_ip_per_hour() == 0
    assert settings.max_body_bytes() == 1024
    assert [str(n) for n in settings.yookassa_trusted_networks()] == ["10.0.0.0/8", "2001:db8::1/128"]
    assert settings.db_init_secret() is None  # blank is unset


def test_values_are_kept_for_the_cold_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_BODY_BYTES", "1024")
    assert settings.max_body_bytes() == 1024
    monkeypatch.setenv("MAX_BODY_BYTES", "2048")
    assert settings.max_body_bytes() == 1024
    settings.reset()
    assert settings.max_body_bytes() == 2048


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("MAX_BODY_BYTES", "lots"),
        ("MAX_BODY_BYTES", "0"),
        ("ANON_SIGNUPS_PER_IP_PER_HOUR", "-1"),
        ("YOOKASSA_TRUSTED_NETWORKS", "not-a-network"),
    ],
)
def test_bad_values_are_refused_by_name(monkeypatch: pytest.MonkeyPatch, name: str, raw: str) -> None:
    monkeypatch.setenv(name, raw)
    getter = getattr(settings, name.lower())
    with pytest.raises(ConfigurationError, match=name):
        getter()


def test_secret_is_read_once_per_cold_start(secretsmanager: object, monkeypatch: pytest.MonkeyPatch) -> None:
    arn = secretsmanager.create_secret(Name="dreamlens/clerk-key", SecretString="pem-from-secrets-manager")[
        "ARN"
    ]  # type: ignore[attr-defined]
    monkeypatch.setenv("CLERK_JWT_KEY", "stale-plain-value")
    monkeypatch.setenv("CLERK_JWT_KEY_SECRET_ARN", arn)
    fetched = count_fetches()
    for _ in range(5):
        assert settings.clerk_jwt_key() == "pem-from-secrets-manager"  # the ARN wins
    assert fetched == [arn]
    settings.reset()  # a new cold start reads it again
    fetched = count_fetches()
    assert settings.clerk_jwt_key() == "pem-from-secrets-manager"
    assert fetched == [arn]


def test_one_json_secret_serves_several_names_with_one_call(
    secretsmanager: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = {"YOOKASSA_SECRET_KEY": "live_abc", "GENERATION_CALLBACK_SECRET": "cb-123"}
    arn = secretsmanager.create_secret(Name="dreamlens/app", SecretString=json.dumps(document))["ARN"]  # type: ignore[attr-defined]
    monkeypatch.setenv("YOOKASSA_SECRET_KEY_SECRET_ARN", arn)
    monkeypatch.setenv("GENERATION_CALLBACK_SECRET_SECRET_ARN", arn)
    fetched = count_fetches()
    assert settings.yookassa_secret_key() == "live_abc"
    assert settings.generation_callback_secret() == "cb-123"
    assert fetched == [arn]


def test_json_secret_without_the_key_names_it(
    secretsmanager: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    arn = secretsmanager.create_secret(Name="dreamlens/other", SecretString='{"SOMETHING": "x"}')["ARN"]  # type: ignore[attr-defined]
    monkeypatch.setenv("DB_INIT_SECRET_SECRET_ARN", arn)
    with pytest.raises(ConfigurationError, match="DB_INIT_SECRET"):
        settings.db_init_secret()


def test_unreadable_secret_names_the_variable_not_the_value(
    secretsmanager: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = f"arn:aws:secretsmanager:{REGION}:123456789012:secret:dreamlens/missing-AbCdEf"
    monkeypatch.setenv("YOOKASSA_SECRET_KEY_SECRET_ARN", missing)
    with pytest.raises(ConfigurationError, match="YOOKASSA_SECRET_KEY_SECRET_ARN"):
        settings.yookassa_secret_key()
    monkeypatch.setenv("YOOKASSA_SECRET_KEY_SECRET_ARN", "not-an-arn")
    settings.reset()
    with pytest.raises(ConfigurationError, match="not a Secrets Manager ARN"):
        settings.yookassa_secret_key()


def test_database_url_from_secrets_manager_is_in_place_before_the_database_config(
    secretsmanager: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "postgresql://app:pw@db.internal:5432/dreamlens"
    direct = "postgresql://app:pw@db-direct.internal:5432/dreamlens"
    arn = secretsmanager.create_secret(Name="dreamlens/db", SecretString=url)["ARN"]  # type: ignore[attr-defined]
    direct_arn = secretsmanager.create_secret(  # type: ignore[attr-defined]
        Name="dreamlens/db-direct", SecretString=json.dumps({"POSTGRES_URL_NON_POOLING": direct})
    )["ARN"]
    monkeypatch.setenv("DATABASE_URL", "postgresql://placeholder/none")
    monkeypatch.delenv("POSTGRES_URL", raising=False)
    # set (not deleted) so monkeypatch records it and undoes what the secret writes
    monkeypatch.setenv("POSTGRES_URL_NON_POOLING", "")
    monkeypatch.setenv("DATABASE_URL_SECRET_ARN", arn)
    monkeypatch.setenv("POSTGRES_URL_NON_POOLING_SECRET_ARN", direct_arn)
    fetched = count_fetches()
    settings.load_database_secrets()
    settings.load_database_secrets()
    assert os.environ["DATABASE_URL"] == url
    loaded = database_config.settings()
    assert (loaded.url, loaded.non_pooling_url) == (url, direct)
    assert sorted(fetched) == sorted([arn, direct_arn])


async def test_init_secret_from_secrets_manager_through_the_handler(
    secretsmanager: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    arn = secretsmanager.create_secret(Name="dreamlens/init", SecretString="from-the-vault")["ARN"]  # type: ignore[attr-defined]
    monkeypatch.setenv("DB_INIT_SECRET_SECRET_ARN", arn)
    fetched = count_fetches()
    for secret, status in (("wrong", 403), ("from-the-vault", 200), ("from-the-vault", 200)):
        event = EVENT_BUILDERS["v2"]("POST", "/api/init-db", headers={"X-Init-Secret": secret})
        assert (await invoke(init_db_handler, event)).status == status
    assert fetched == [arn]


def test_cold_start_imports_no_boto3_and_no_jwt() -> None:
    """A function whose configuration has no ARN never loads boto3; health and
    init-db never identify a caller, so they do not load PyJWT either."""
    code = (
        "import sys, functions.health, functions.init_db; "
        "print(sorted(m for m in ('boto3', 'botocore', 'jwt', 'cryptography') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
