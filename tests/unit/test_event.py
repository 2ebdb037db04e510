"""Unit tests for optimizely_odp_ext.event: validation, normalization, defaults, encoding."""

from __future__ import annotations

import copy
import json
import math
import uuid
from typing import Any, Dict, Optional
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimizely_odp_ext import _compat, event
from optimizely_odp_ext.event import Encoded, batch_size_bytes, default_data, encode, join, validate

INVALID_ACTION = "ODP action is not valid (cannot be empty)."
INVALID_IDENTIFIERS = "ODP events must have at least one key-value pair in identifiers."
INVALID_DATA = "ODP data is not valid."
IDS = {"fs_user_id": "user-1"}
DEFAULTS = default_data("9.9.9")


class _Opaque:
    pass


class _FloatSub(float):
    """Like numpy.float64: a float subclass."""


def test_sdk_messages_are_the_sdks_words() -> None:
    assert _compat.ODP_INVALID_ACTION == INVALID_ACTION
    assert _compat.ODP_INVALID_IDENTIFIERS == INVALID_IDENTIFIERS
    assert _compat.ODP_INVALID_DATA == INVALID_DATA


# ----------------------------------------------------------------- the validation table


@pytest.mark.parametrize(
    ("action", "identifiers", "type_", "data", "expected"),
    [
        pytest.param(None, IDS, None, None, INVALID_ACTION, id="action-None"),
        pytest.param("", IDS, None, None, INVALID_ACTION, id="action-empty"),
        pytest.param(5, IDS, None, None, "ODP action is not valid (must be a string, got int).", id="action-int"),
        pytest.param(b"buy", IDS, None, None, "ODP action is not valid (must be a string, got bytes).",
                     id="action-bytes"),
        pytest.param("a", None, None, None, INVALID_IDENTIFIERS, id="ids-None"),
        pytest.param("a", {}, None, None, INVALID_IDENTIFIERS, id="ids-empty"),
        pytest.param("a", [("fs_user_id", "u")], None, None, INVALID_IDENTIFIERS, id="ids-list"),
        pytest.param("a", "fs_user_id=u", None, None, INVALID_IDENTIFIERS, id="ids-str"),
        pytest.param("a", {1: "u"}, None, None,
                     "ODP identifiers are not valid (keys must be strings, got int).", id="ids-key-int"),
        pytest.param("a", {"email": 42}, None, None,
                     'ODP identifiers are not valid (value of "email" must be a string, got int).',
                     id="ids-value-int"),
        pytest.param("a", {"fs_user_id": "u", "email": None}, None, None,
                     'ODP identifiers are not valid (value of "email" must be a string, got NoneType).',
                     id="ids-value-None"),
        pytest.param("a", IDS, 7, None, "ODP type is not valid (must be a string, got int).", id="type-int"),
        pytest.param("a", IDS, ["x"], None, "ODP type is not valid (must be a string, got list).", id="type-list"),
        pytest.param("a", IDS, None, "data", INVALID_DATA, id="data-str"),
        pytest.param("a", IDS, None, [("k", "v")], INVALID_DATA, id="data-list"),
        pytest.param("a", IDS, None, {"k": [1, 2]}, INVALID_DATA, id="data-value-list"),
        pytest.param("a", IDS, None, {"k": {"x": 1}}, INVALID_DATA, id="data-value-dict"),
        pytest.param("a", IDS, None, {"k": _Opaque()}, INVALID_DATA, id="data-value-object"),
        pytest.param("a", IDS, None, {"k": b"bytes"}, INVALID_DATA, id="data-value-bytes"),
        pytest.param("a", IDS, None, {"price": math.nan},
                     'ODP data is not valid (value of "price" is not a finite number).', id="data-nan"),
        pytest.param("a", IDS, None, {"price": math.inf},
                     'ODP data is not valid (value of "price" is not a finite number).', id="data-inf"),
        pytest.param("a", IDS, None, {"price": -math.inf},
                     'ODP data is not valid (value of "price" is not a finite number).', id="data-minus-inf"),
        pytest.param("a", IDS, None, {3: "v"}, "ODP data is not valid (keys must be strings, got int).",
                     id="data-key-int"),
    ],
)
def test_bad_input_returns_the_exact_error_line(
    action: Any, identifiers: Any, type_: Any, data: Any, expected: str
) -> None:
    assert validate(action, identifiers, type_, data) == expected


def test_identifier_value_error_names_the_key_never_the_value() -> None:
    secret = 12345678901234
    line = validate("a", {"fs_user_id": "u", "phone": secret}, None, None)
    assert line == 'ODP identifiers are not valid (value of "phone" must be a string, got int).'
    assert str(secret) not in line


def test_action_is_checked_before_identifiers_and_identifiers_before_data() -> None:
    assert validate("", None, 5, "x") == INVALID_ACTION
    assert validate("a", None, 5, "x") == INVALID_IDENTIFIERS
    assert validate("a", IDS, 5, "x") == "ODP type is not valid (must be a string, got int)."


def test_nan_in_a_float_subclass_is_refused_at_validation() -> None:
    assert validate("a", IDS, None, {"price": _FloatSub("nan")}) == (
        'ODP data is not valid (value of "price" is not a finite number).')


def test_every_validated_event_can_be_encoded_lone_surrogate() -> None:
    pending = validate("a", {"fs_user_id": "user\ud800"}, None, None)
    assert isinstance(pending, tuple)
    body = json.loads(encode(pending, DEFAULTS).body)
    assert body["identifiers"] == {"fs_user_id": "user\ud800"}


# ----------------------------------------------------------------- valid input


@pytest.mark.parametrize("type_", [None, ""])
def test_missing_type_means_fullstack(type_: Optional[str]) -> None:
    assert validate("a", IDS, type_, None) == ("fullstack", "a", {"fs_user_id": "user-1"}, None)


def test_explicit_type_is_kept() -> None:
    assert validate("a", IDS, "custom", None) == ("custom", "a", {"fs_user_id": "user-1"}, None)


@pytest.mark.parametrize("variant", ["fs-user-id", "FS_USER_ID", "Fs-User_Id", "FS-USER-ID", "fs_USER-id"])
def test_fs_user_id_variants_are_normalized_in_place(variant: str) -> None:
    pending = validate("a", {"email": "e@x", variant: "u1", "other": "o"}, None, None)
    assert isinstance(pending, tuple)
    assert list(pending[2].items()) == [("email", "e@x"), ("fs_user_id", "u1"), ("other", "o")]


@pytest.mark.parametrize("variant", ["fs-user-id", "FS_USER_ID"])
def test_a_real_fs_user_id_is_never_overwritten(variant: str) -> None:
    for identifiers in ({variant: "from-variant", "fs_user_id": "real"}, {"fs_user_id": "real", variant: "v"}):
        pending = validate("a", identifiers, None, None)
        assert isinstance(pending, tuple)
        assert pending[2] == identifiers  # both keys kept as they are
        assert pending[2]["fs_user_id"] == "real"


def test_keys_that_only_look_similar_are_not_normalized() -> None:
    identifiers = {"fs_user_ids": "a", "fsuserid": "b", "fs user id": "c"}
    pending = validate("a", identifiers, None, None)
    assert isinstance(pending, tuple)
    assert pending[2] == identifiers


@pytest.mark.parametrize("value", [True, False, 0, -7, 2**70, 1.5, -0.0, None, "", "text"])
def test_accepted_data_values(value: Any) -> None:
    pending = validate("a", IDS, None, {"k": value})
    assert pending == ("fullstack", "a", {"fs_user_id": "user-1"}, {"k": value})


def test_empty_data_is_no_data() -> None:
    assert validate("a", IDS, None, {}) == ("fullstack", "a", {"fs_user_id": "user-1"}, None)


def test_caller_dicts_are_never_mutated_and_the_queued_copy_is_independent() -> None:
    identifiers = {"FS-USER-ID": "u1", "email": "a@b.c"}
    data: Dict[str, Any] = {"price": 50.0, "item": "shirt"}
    ids_before, data_before = copy.deepcopy(identifiers), copy.deepcopy(data)

    pending = validate("buy", identifiers, "fullstack", data)

    assert identifiers == ids_before
    assert list(identifiers) == ["FS-USER-ID", "email"]
    assert data == data_before
    assert isinstance(pending, tuple)
    assert pending[2] is not identifiers
    assert pending[3] is not data

    identifiers["email"] = "changed"
    identifiers["new"] = "x"
    data["price"] = 1.0
    del data["item"]
    assert pending == ("fullstack", "buy", {"fs_user_id": "u1", "email": "a@b.c"}, {"price": 50.0, "item": "shirt"})
    body = json.loads(encode(pending, DEFAULTS).body)
    assert body["identifiers"] == {"fs_user_id": "u1", "email": "a@b.c"}
    assert body["data"]["price"] == 50.0
    assert body["data"]["item"] == "shirt"


def test_bad_input_does_not_mutate_the_callers_dicts() -> None:
    identifiers = {"FS-USER-ID": "u1"}
    data = {"k": [1]}
    validate("a", identifiers, None, data)
    assert identifiers == {"FS-USER-ID": "u1"}
    assert data == {"k": [1]}


# ----------------------------------------------------------------- encode / join


def test_default_data() -> None:
    assert default_data("5.7.0") == {
        "data_source_type": "sdk", "data_source": "python-sdk", "data_source_version": "5.7.0"}


def test_encode_adds_defaults_and_a_uuid4_idempotence_id() -> None:
    encoded = encode(("fullstack", "buy", {"fs_user_id": "u"}, {"price": 5}), default_data("5.7.0"))
    body = json.loads(encoded.body)
    assert list(body) == ["type", "action", "identifiers", "data"]
    assert body["type"] == "fullstack"
    assert body["action"] == "buy"
    assert body["identifiers"] == {"fs_user_id": "u"}
    idempotence_id = body["data"].pop("idempotence_id")
    assert body["data"] == {
        "data_source_type": "sdk", "data_source": "python-sdk", "data_source_version": "5.7.0", "price": 5}
    assert isinstance(idempotence_id, str)
    parsed = uuid.UUID(idempotence_id)
    assert parsed.version == 4
    assert str(parsed) == idempotence_id
    assert encoded.idempotence_id == idempotence_id
    assert len(encoded) == len(encoded.body)
    assert encoded.seq == 0
    assert encoded.spool_id is None


def test_encode_without_data_still_carries_the_defaults() -> None:
    body = json.loads(encode(("t", "a", {"k": "v"}, None), default_data("4.1.1")).body)
    assert set(body["data"]) == {"idempotence_id", "data_source_type", "data_source", "data_source_version"}
    assert body["data"]["data_source_version"] == "4.1.1"


def test_each_encode_gets_a_new_idempotence_id() -> None:
    pending = ("fullstack", "a", {"k": "v"}, None)
    ids = {encode(pending, DEFAULTS).idempotence_id for _ in range(50)}
    assert len(ids) == 50


def test_caller_keys_override_every_default_including_idempotence_id() -> None:
    data = {"idempotence_id": "mine-1", "data_source_type": "app", "data_source": "x", "data_source_version": "0"}
    encoded = encode(("fullstack", "a", {"k": "v"}, dict(data)), default_data("5.7.0"))
    assert json.loads(encoded.body)["data"] == data
    assert encoded.idempotence_id == "mine-1"


def test_encode_is_compact_json() -> None:
    encoded = encode(("fullstack", "a", {"k": "é ✓"}, {"idempotence_id": "i", "n": 1}), {})
    assert json.loads(encoded.body) == {
        "type": "fullstack", "action": "a", "identifiers": {"k": "é ✓"}, "data": {"idempotence_id": "i", "n": 1}}
    assert b", " not in encoded.body
    assert b": " not in encoded.body
    encoded.body.decode("utf-8")


def test_finite_float_subclass_is_accepted_and_encoded() -> None:
    pending = validate("a", IDS, None, {"price": _FloatSub(2.5)})
    assert isinstance(pending, tuple)
    assert json.loads(encode(pending, DEFAULTS).body)["data"]["price"] == 2.5


def _encoded(i: int, extra: str = "") -> Encoded:
    return encode(("fullstack", f"a{i}", {"fs_user_id": f"u{i}"}, {"x": extra} if extra else None), DEFAULTS)


@pytest.mark.parametrize("count", [0, 1, 2, 7])
def test_join_is_a_json_array_and_batch_size_bytes_matches(count: int) -> None:
    events = [_encoded(i, "y" * i) for i in range(count)]
    body = join(events)
    assert json.loads(body) == [json.loads(e.body) for e in events]
    assert batch_size_bytes(count, sum(len(e) for e in events)) == len(body)


def test_join_reuses_the_encoded_bytes() -> None:
    events = [_encoded(1), _encoded(2)]
    assert join(events) == b"[" + events[0].body + b"," + events[1].body + b"]"


def test_encoded_repr_shows_id_and_size_only() -> None:
    encoded = Encoded(b"12345", "the-id")
    assert repr(encoded) == "Encoded(idempotence_id='the-id', size=5)"


def test_module_constants() -> None:
    assert event.FS_USER_ID == "fs_user_id"
    assert event.DEFAULT_TYPE == "fullstack"


# ----------------------------------------------------------------- property


def _normalized(identifiers: Dict[str, str]) -> Dict[str, str]:
    """A reference model of the identifier normalization."""
    if "fs_user_id" in identifiers:
        return dict(identifiers)
    for key in identifiers:
        if key.lower().replace("-", "_") == "fs_user_id":
            return {("fs_user_id" if k == key else k): v for k, v in identifiers.items()}
    return dict(identifiers)


_keys = st.one_of(st.text(max_size=12), st.sampled_from(["fs_user_id", "fs-user-id", "FS_USER_ID", "idempotence_id"]))
_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))


@settings(max_examples=75, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    action=st.text(min_size=1, max_size=20),
    identifiers=st.dictionaries(_keys, st.text(max_size=20), min_size=1, max_size=4),
    type_=st.one_of(st.none(), st.text(max_size=10)),
    data=st.one_of(st.none(), st.dictionaries(_keys, _values, max_size=5)),
)
def test_property_valid_input_round_trips(
    action: str, identifiers: Dict[str, str], type_: Optional[str], data: Optional[Dict[str, Any]]
) -> None:
    ids_before, data_before = copy.deepcopy(identifiers), copy.deepcopy(data)
    pending = validate(action, identifiers, type_, data)
    assert isinstance(pending, tuple)
    assert identifiers == ids_before
    assert data == data_before

    decoded = json.loads(encode(pending, DEFAULTS).body)
    assert decoded["type"] == (type_ or "fullstack")
    assert decoded["action"] == action
    assert decoded["identifiers"] == _normalized(identifiers)
    expected_data = {**DEFAULTS, **(data or {})}
    idempotence_id = decoded["data"].pop("idempotence_id")
    if data and "idempotence_id" in data:
        assert idempotence_id == data["idempotence_id"]
    else:
        assert uuid.UUID(idempotence_id).version == 4
    expected_data.pop("idempotence_id", None)
    assert decoded["data"] == expected_data


def test_generated_idempotence_ids_are_unique_uuid4_and_differ_after_fork() -> None:
    import os
    import uuid
    import warnings

    from optimizely_odp_ext.event import _ids

    drawn = [_ids.next() for _ in range(2000)]
    assert len(set(drawn)) == 2000
    for value in drawn[:300]:
        parsed = uuid.UUID(value)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, value)
    if not hasattr(os, "fork"):
        return
    read, write = os.pipe()
    with warnings.catch_warnings():  # 3.12+: "multi-threaded, use of fork() may lead to deadlocks"
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its next id must not be the parent's next one
        os.write(write, _ids.next().encode())
        os._exit(0)
    os.close(write)
    child_id = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child_id != _ids.next()
    assert uuid.UUID(child_id).version == 4


def _reference_body(pending: event.Pending, idempotence_id: Any) -> bytes:
    """How the event was encoded before the worker's fast path: one ``json`` call on the merged dict."""
    type_, action, identifiers, data = pending
    merged: Dict[str, Any] = {"idempotence_id": idempotence_id}
    merged.update(DEFAULTS)
    merged.update(data or {})
    obj = {"type": type_, "action": action, "identifiers": identifiers, "data": merged}
    return json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _pure_python_chunks() -> Any:
    with mock.patch.object(json.encoder, "c_make_encoder", None):
        return event._chunker()


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    identifiers=st.dictionaries(_keys, st.text(max_size=20), min_size=1, max_size=4),
    data=st.one_of(st.none(), st.dictionaries(
        st.one_of(_keys, st.sampled_from(sorted(DEFAULTS))), _values, max_size=6)),
    seq=st.integers(min_value=0, max_value=2**40),
)
def test_property_encode_is_json_dumps_of_the_merged_event_byte_for_byte(
    identifiers: Dict[str, str], data: Optional[Dict[str, Any]], seq: int
) -> None:
    # Key order too: the id first, then the defaults, the caller's keys overriding them in place.
    pending = validate("a\u00e9\ud800", identifiers, None, data)
    assert isinstance(pending, tuple)
    idempotence_id = data["idempotence_id"] if data and "idempotence_id" in data else "drawn-id"
    expected = _reference_body(pending, idempotence_id)
    with mock.patch.object(event._ids, "next", return_value="drawn-id"):
        encoded = encode(pending, DEFAULTS, seq)
        with mock.patch.object(event, "_chunks", _pure_python_chunks()):
            assert encode(pending, DEFAULTS, seq).body == expected
    assert encoded.body == expected
    assert encoded.idempotence_id == str(idempotence_id)
    assert encoded.seq == seq


def test_encoding_without_the_c_accelerator_gives_the_same_bytes_and_errors() -> None:
    pure = _pure_python_chunks()
    assert pure is not event._chunks
    obj = {"type": "t", "action": "\u00e9", "identifiers": {"k": "\ud800"},
           "data": {"f": _FloatSub(1.5), "i": 2**70, "b": True, "n": None}}
    assert "".join(pure(obj, 0)) == "".join(event._chunks(obj, 0)) == json.dumps(
        obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    for chunks in (pure, event._chunks):
        with pytest.raises(ValueError, match="not JSON compliant"):
            chunks({"x": math.nan}, 0)
        with pytest.raises(TypeError, match="not JSON serializable"):
            chunks({"x": _Opaque()}, 0)


_C_MAKE = json.encoder.c_make_encoder


@pytest.mark.parametrize("make", [
    lambda *args: (_ for _ in ()).throw(TypeError("takes 10 arguments")),  # another signature
    # Encodes differently (only ours: json's own encoder passes its markers dict, ours None).
    lambda markers, *args: (lambda obj, level: ("{}",)) if markers is None else _C_MAKE(markers, *args),
])
def test_a_c_encoder_that_does_not_match_falls_back_to_json(make: Any) -> None:
    with mock.patch.object(json.encoder, "c_make_encoder", make):
        chunks = event._chunker()
    obj = {"a": ["\u00e9", 1.5]}
    assert "".join(chunks(obj, 0)) == json.dumps(obj, separators=(",", ":"))
