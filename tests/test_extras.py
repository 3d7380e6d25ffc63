"""A driver or broker client left out of the install is named with the extra that brings it."""

from __future__ import annotations

import sys

import pytest

from alembic_counterfill.actors import broker_from_url
from alembic_counterfill.config import _create_engine
from alembic_counterfill.errors import ConfigurationError


def _without(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    # A None entry in sys.modules makes "import x" raise ImportError, as if not installed.
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize(
    ("url", "modules", "extra"),
    [
        ("redis://127.0.0.1:1/0", ("redis", "dramatiq.brokers.redis"), "redis"),
        ("amqp://guest:secret@127.0.0.1:1/", ("pika", "dramatiq.brokers.rabbitmq"), "rabbitmq"),
    ],
)
def test_missing_broker_client_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, url: str, modules: tuple[str, ...], extra: str
) -> None:
    _without(monkeypatch, *modules)
    with pytest.raises(ConfigurationError) as err:
        broker_from_url(url)
    message = str(err.value)
    assert f"pip install 'alembic_counterfill[{extra}]'" in message
    assert "secret" not in message and "\n" not in message


def test_missing_database_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "psycopg")
    with pytest.raises(ConfigurationError) as err:
        _create_engine("postgresql+psycopg://postgres@127.0.0.1:1/test", "alembic.ini")
    assert "pip install 'alembic_counterfill[postgresql]'" in str(err.value)
