"""The guard service's wire protocol (``sekisho.protocol``): the request envelope, the error
body and the one table from codes to HTTP statuses. The service over HTTP is in
test_guard_service.py; the same codes through the real guard in test_guard_service_e2e.py."""

from __future__ import annotations

import json
import math
from datetime import date
from decimal import Decimal

import numpy as np
import pytest

from sekisho.guard.errors import REASONS
from sekisho.protocol import (REFUSAL_STATUS, STATUS_OF_CODE, DescribeRequest, ErrorEnvelope, QueryRequest,
                              RequestError, decode_summary, encode_summary, jsonable, status_for)


def body(**data) -> bytes:
    return json.dumps(data).encode()


def test_every_guard_refusal_is_422_and_every_other_code_has_its_status():
    for code in REASONS:
        if code not in STATUS_OF_CODE:
            assert status_for(code) == REFUSAL_STATUS, code
    assert status_for("bad_request") == 400 and status_for("missing_scope") == 403
    assert status_for("audit_unavailable") == 503 and status_for("internal_error") == 500


def test_query_request_defaults_and_round_trip():
    request = QueryRequest.from_body(b'{"sql": "SELECT 1"}')
    assert request == QueryRequest(sql="SELECT 1", mode=None, epsilon=None, format="arrow")
    full = QueryRequest(sql="SELECT 1", mode="dp", epsilon=0.5, format="json")
    assert QueryRequest.from_body(json.dumps(full.to_json()).encode()) == full
    assert "mode" not in request.to_json() and "epsilon" not in request.to_json()


@pytest.mark.parametrize("raw,part", [
    (b"", None), (b"not json", None), (b"[1, 2]", None), (b"\xff\xfe", None),
    (body(), "sql"),
    (body(sql=5), "sql"),
    (body(sql="SELECT 1", mode=1), "mode"),
    (body(sql="SELECT 1", mode="dp", epsilon="1"), "epsilon"),
    (body(sql="SELECT 1", mode="dp", epsilon=True), "epsilon"),
    (body(sql="SELECT 1", format="csv"), "format"),
    (body(sql="SELECT 1", user="suzuki"), "user"),     # nobody asks as someone else
])
def test_a_malformed_envelope_is_bad_request_naming_the_key(raw, part):
    with pytest.raises(RequestError) as info:
        QueryRequest.from_body(raw)
    envelope = info.value.envelope()
    assert envelope.code == "bad_request" and envelope.part == part and envelope.status == 400


@pytest.mark.parametrize("data", [
    {"sql": "  "}, {"sql": "x" * 100_001}, {"sql": "SELECT 1", "mode": "raw"},
    {"sql": "SELECT 1", "mode": "dp", "epsilon": -1}, {"sql": "SELECT 1", "mode": "dp", "epsilon": 1e9},
    {"sql": "SELECT 1", "epsilon": 1.0},    # ε without DP: the guard refuses it (epsilon_invalid)
])
def test_values_pass_the_envelope_for_the_guard_to_judge(data):
    request = QueryRequest.from_body(json.dumps(data).encode())
    assert request.sql == data["sql"] and request.mode == data.get("mode")


def test_describe_request():
    assert DescribeRequest.from_body(b'{"sql": "SELECT 1"}') == DescribeRequest("SELECT 1")
    with pytest.raises(RequestError):
        DescribeRequest.from_body(body(sql="SELECT 1", mode="dp"))


def test_error_envelope_from_json_fills_what_a_proxy_left_out():
    assert ErrorEnvelope.from_json({"code": "row_level_output", "reason": "r", "part": "SELECT *"}, 422) == \
        ErrorEnvelope("row_level_output", "r", "SELECT *")
    assert ErrorEnvelope.from_json(None, 422).code == "refused"
    assert ErrorEnvelope.from_json("<html>", 502).code == "http_502"


def test_summary_encoding():
    summary = {"mode": "dp", "epsilon_remaining": math.inf, "notes_ja": ["秘匿"], "cells": np.int64(3),
               "day": date(2026, 10, 31), "sum": Decimal("1.5")}
    assert decode_summary(encode_summary(summary)) == {"mode": "dp", "epsilon_remaining": None, "notes_ja": ["秘匿"],
                                                       "cells": 3, "day": "2026-10-31", "sum": 1.5}
    assert decode_summary(None) == {} and jsonable(float("nan")) is None
