"""The installed methods introspect like the functions they are (issue 9, item 14): signature,
help(), type hints and autospec, after a class-level and an instance-level install."""

from __future__ import annotations

import inspect
import pydoc
import re
import typing
from typing import Any, Callable, Iterator
from unittest import mock

import pytest

import optimizely_odp_ext
from optimizely_odp_ext.manager import OdpEventStats

SEND_SIGNATURE = "(action, identifiers, type='fullstack', data=None)"


def _plain(function: Any, **kwargs: Any) -> str:
    """The signature without annotations: names, kinds and defaults."""
    signature = inspect.signature(function, **kwargs)
    return str(signature.replace(parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
                                 return_annotation=signature.empty))


@pytest.fixture(params=["class", "instance"])
def client(request: pytest.FixtureRequest, make_client: Callable[..., Any]) -> Iterator[Any]:
    """A real client with the plugin installed on its class or on itself."""
    made = make_client("https://odp.example")
    if request.param == "class":
        assert optimizely_odp_ext.install() is True
    else:
        assert optimizely_odp_ext.install(made) is True
    try:
        yield made
    finally:
        optimizely_odp_ext.uninstall()


def test_signature_of_send_odp_event(client: Any) -> None:
    assert _plain(client.send_odp_event) == SEND_SIGNATURE
    assert _plain(client.send_odp_event, follow_wrapped=False) == SEND_SIGNATURE
    assert str(inspect.signature(client.send_odp_event).return_annotation) == "None"


def test_signatures_of_the_other_methods(client: Any) -> None:
    assert _plain(client.flush_odp_events) == "(timeout=None)"
    assert _plain(client.odp_event_stats) == "()"
    assert _plain(client.close) == "()"


def test_help_shows_the_signature_and_the_docstring(client: Any) -> None:
    text = pydoc.render_doc(client.send_odp_event, renderer=pydoc.plaintext)
    # Python 3.13 puts each parameter on a line of its own.
    assert re.search(r"send_odp_event\(\s*action: '?str'?,\s*identifiers: '?Dict\[str, str\]'?,\s*"
                     r"type: '?str'? = 'fullstack',\s*data: .+ = None\s*\)", text), text
    assert "Sends an event to ODP" in text


def test_type_hints(client: Any) -> None:
    hints = typing.get_type_hints(client.send_odp_event)
    assert hints["action"] is str
    assert hints["identifiers"] == typing.Dict[str, str]
    assert hints["type"] is str
    assert set(hints) == {"action", "identifiers", "type", "data", "return"}
    assert typing.get_type_hints(client.odp_event_stats)["return"] is OdpEventStats
    assert typing.get_type_hints(client.flush_odp_events)["return"] is bool


def test_autospec_checks_the_arguments(client: Any) -> None:
    spec = mock.create_autospec(client.send_odp_event)
    spec("purchased", {"fs_user_id": "u"})
    spec("purchased", {"fs_user_id": "u"}, "fullstack", {"price": 1.0})
    spec(action="a", identifiers={"fs_user_id": "u"}, type="t", data=None)
    with pytest.raises(TypeError):
        spec("purchased")  # identifiers missing
    with pytest.raises(TypeError):
        spec("purchased", {"fs_user_id": "u"}, colour="red")
    with pytest.raises(TypeError):
        spec("a", {"fs_user_id": "u"}, "t", None, "one too many")


def test_what_was_replaced_is_kept_under_a_private_attribute(make_client: Callable[..., Any]) -> None:
    from optimizely.optimizely import Optimizely

    sdk_own = Optimizely.__dict__.get("send_odp_event")  # 5.x has one; 4.1.1 has none
    assert optimizely_odp_ext.install() is True
    try:
        method = make_client("https://odp.example").send_odp_event
        assert method._odp_ext_applied is True
        assert not hasattr(method, "__wrapped__")
        assert method._odp_ext_replaced is sdk_own
    finally:
        optimizely_odp_ext.uninstall()
    assert Optimizely.__dict__.get("send_odp_event") is sdk_own

    client = make_client("https://odp.example")
    assert optimizely_odp_ext.install(client) is True
    method = client.send_odp_event
    assert method._odp_ext_applied is True
    assert not hasattr(method, "__wrapped__")
    assert method._odp_ext_replaced is None  # nothing was on the instance before
