"""The ibis backend ``ibis.sekisho`` against the guard service (HTTP layer, guard double).

Protection itself is shown with the real guard in test_client_e2e.py; here: connection
settings, compilation to DuckDB SQL, results and summaries, refusals and read-only-ness.
"""

from __future__ import annotations

import ibis
import pandas as pd
import pytest

import sekisho.client as client
from sekisho.client import GuardError, GuardRefusal, ReadOnlyError, guard_url_from_env
from sekisho.instance import Instance
from sekisho.services.guard import GuardService
from sekisho.state import set_role
from client_fixtures import GUARD_SCOPE, FakeRefused, GuardDouble, HubApiDouble, ServiceThread, hub_oauth

TOKEN = "tok-client-analyst"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    hub = HubApiDouble().start()
    hub.add_token(TOKEN, "tanaka", [GUARD_SCOPE])
    hub.add_token("tok-client-noscope", "tanaka", [])
    inst = Instance.create(tmp_path_factory.mktemp("cli") / "home")
    set_role(inst, "tanaka", "analyst")
    guards: list[GuardDouble] = []

    def factory(instance):
        guards.append(GuardDouble(instance))
        return guards[-1]

    svc = GuardService(inst, hub_auth=hub_oauth(hub.api_url), guard_factory=factory,
                       refusal_types=(FakeRefused,), workers=1)
    thread = ServiceThread(svc).start()
    yield thread, guards
    thread.stop()
    svc.pool.shutdown()
    hub.stop()


@pytest.fixture
def con(served, monkeypatch):
    thread, _ = served
    monkeypatch.setenv("SEKISHO_GUARD_URL", thread.url)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", TOKEN)
    return ibis.sekisho.connect()


def last_sql(served):
    return [c for c in served[1][-1].calls if c[0] == "query"][-1][1]


def test_connect_lists_views_as_tables(con):
    assert con.list_tables() == ["residents"]
    t = con.table("residents")
    assert t.schema() == ibis.schema({"person_id": "string", "block": "string", "age": "int64"})
    assert con.user == "tanaka" and con.role == "analyst"
    assert con.budget()["remaining"] == 8.5


def test_expression_compiles_to_duckdb_sql_and_returns_protected_frame(con, served):
    t = con.table("residents")
    old = t.filter(t.age >= 65)
    expr = old.group_by("block").agg(n=old.count())
    df = expr.execute()
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["block", "n"]
    assert df.attrs["sekisho"]["cells_suppressed"] == 1
    assert con.last_summary == df.attrs["sekisho"]
    sql = last_sql(served)
    assert '"residents"' in sql and "GROUP BY" in sql and ">= 65" in sql
    assert sql == ibis.to_sql(expr, dialect="duckdb", pretty=False)


def test_mode_and_epsilon_are_passed(con, served):
    t = con.table("residents")
    t.group_by("block").agg(n=t.count()).execute(mode="dp", epsilon=0.25)
    call = [c for c in served[1][-1].calls if c[0] == "query"][-1]
    assert call[3:] == ("dp", 0.25)
    assert con.last_summary["epsilon_spent"] == 0.25


def test_sql_runs_as_written_with_schema_from_describe(con, served):
    q = "SELECT block, count(*) AS n FROM residents GROUP BY block"
    expr = con.sql(q)
    assert expr.schema() == ibis.schema({"block": "string", "n": "int64"})
    df = expr.execute()
    assert last_sql(served) == q
    assert df["n"].isna().sum() == 1   # the suppressed cell stays missing


def test_refusal_raises_query_refused_with_guard_fields(con):
    with pytest.raises(GuardRefusal) as info:
        con.table("residents").execute()      # SELECT * FROM residents
    assert info.value.code == "row_level_output"
    assert info.value.part == "SELECT *"
    assert "個票" in info.value.reason


def test_describe_refusal_raises_query_refused(con):
    with pytest.raises(GuardRefusal):
        con.sql("SELECT * FROM residents")


@pytest.mark.parametrize("action", [
    lambda con: con.create_table("x", schema=ibis.schema({"a": "int64"})),
    lambda con: con.insert("residents", pd.DataFrame({"a": [1]})),
    lambda con: con.drop_table("residents"),
    lambda con: con.create_view("v", con.table("residents")),
    lambda con: con.drop_view("v"),
    lambda con: con.truncate_table("residents"),
    lambda con: con.raw_sql("DELETE FROM residents"),
    lambda con: con.read_csv("/etc/passwd"),
    lambda con: con.table("residents").cache(),
])
def test_writes_are_refused_clearly(con, action):
    with pytest.raises(ReadOnlyError, match="関所"):
        action(con)


def test_memtables_are_refused_and_never_sent(con, served):
    n_calls = len(served[1][-1].calls)
    t = con.table("residents")
    mine = ibis.memtable({"block": ["北部"], "x": [1]})
    with pytest.raises(ReadOnlyError, match="memtable"):
        joined = t.join(mine, "block")
        joined.group_by("block").agg(n=joined.count()).execute()
    assert len(served[1][-1].calls) == n_calls


def test_udfs_are_refused(con):
    @ibis.udf.scalar.python
    def leak(x: str) -> str:
        return x

    t = con.table("residents")
    with pytest.raises(ReadOnlyError, match="UDF"):
        t.group_by(b=leak(t.block)).agg(n=t.count()).execute()


def test_unknown_view_names_the_available_ones(con):
    with pytest.raises(Exception, match="residents"):
        con.table("secret_table")


def test_token_without_scope_cannot_connect(served, monkeypatch):
    monkeypatch.setenv("SEKISHO_GUARD_URL", served[0].url)
    with pytest.raises(GuardError) as info:
        ibis.sekisho.connect(token="tok-client-noscope")
    assert info.value.status == 403 and info.value.code == "missing_scope"


def test_unreachable_guard_is_a_clear_error():
    with pytest.raises(GuardError, match="cannot reach"):
        ibis.sekisho.connect(url="http://127.0.0.1:9/services/guard/", token="tok-whatever-1")


def test_guard_url_from_env(monkeypatch):
    monkeypatch.delenv("SEKISHO_GUARD_URL", raising=False)
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api")
    assert guard_url_from_env() == "http://127.0.0.1:8081/services/guard/"
    monkeypatch.setenv("SEKISHO_GUARD_URL", "http://127.0.0.1:8470/services/guard")
    assert guard_url_from_env() == "http://127.0.0.1:8470/services/guard/"
    monkeypatch.delenv("SEKISHO_GUARD_URL")
    monkeypatch.delenv("JUPYTERHUB_API_URL")
    with pytest.raises(GuardError):
        guard_url_from_env()


def test_no_token_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    with pytest.raises(GuardError, match="token"):
        ibis.sekisho.connect(url="http://127.0.0.1:9/services/guard/")


def test_backend_entry_point():
    assert ibis.sekisho.name == "sekisho"
    assert client.Backend.name == "sekisho"
