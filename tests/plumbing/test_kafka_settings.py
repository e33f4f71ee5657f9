"""KafkaSettings refuses what its protocol would silently ignore, however it is built."""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from plumbing.kafka import KafkaSettings, client_kwargs

SASL = {"sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "secret"}


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SASL_PLAINTEXT"])
@pytest.mark.parametrize("fields", [
    {"ssl_cafile": "ca.pem"},
    {"ssl_certfile": "cert.pem"},
    {"ssl_certfile": "cert.pem", "ssl_keyfile": "key.pem"},
    {"ssl_check_hostname": False},
])
def test_ssl_settings_without_tls_are_refused(protocol: str, fields: dict[str, Any]) -> None:
    sasl = SASL if protocol.startswith("SASL") else {}
    with pytest.raises(ValueError, match=r"given but security_protocol is .*use SSL or SASL_SSL"
                       ) as caught:
        KafkaSettings(security_protocol=protocol, **sasl, **fields)
    assert all(name in str(caught.value) for name in fields)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL"])
@pytest.mark.parametrize("fields", [
    {"sasl_mechanism": "PLAIN"},
    {"sasl_username": "u"},
    {"sasl_password": "secret"},
    SASL,
])
def test_sasl_settings_without_sasl_are_refused(protocol: str, fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"given but security_protocol is .*use SASL_SSL"
                       ) as caught:
        KafkaSettings(security_protocol=protocol, **fields)
    assert all(name in str(caught.value) for name in fields)
    assert "secret" not in str(caught.value)  # field names, never values


@pytest.mark.parametrize(("fields", "problem"), [
    ({"security_protocol": "SSL", "ssl_keyfile": "key.pem"}, "ssl_keyfile needs ssl_certfile"),
    ({"security_protocol": "SASL_SSL", "sasl_username": "u", "sasl_password": "p"},
     "needs sasl_mechanism"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "sasl_username": "u",
      "sasl_password": "p"}, "needs sasl_mechanism"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
     "needs a SASL username and password"),
    ({"security_protocol": "ssl"}, "security_protocol must be one of"),
    ({"bootstrap_servers": " "}, "bootstrap_servers is empty"),
])
def test_other_inconsistent_settings_are_refused(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        KafkaSettings(**fields)


@pytest.mark.parametrize("fields", [
    {},
    {"security_protocol": "SSL"},
    {"security_protocol": "SSL", "ssl_cafile": "ca.pem", "ssl_certfile": "cert.pem",
     "ssl_keyfile": "key.pem", "ssl_check_hostname": False},
    {"security_protocol": "SASL_PLAINTEXT", **SASL},
    {"security_protocol": "SASL_SSL", **SASL, "ssl_cafile": "ca.pem"},
])
def test_consistent_settings_are_accepted(fields: dict[str, Any]) -> None:
    settings = KafkaSettings(**fields)
    assert settings.with_fast_groups().security_protocol == settings.security_protocol


def test_tls_settings_reach_the_ssl_context() -> None:
    kwargs = client_kwargs(KafkaSettings(security_protocol="SSL"))
    context = kwargs["ssl_context"]
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
