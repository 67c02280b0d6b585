"""``ibis.sekisho``: an ibis backend whose every query goes through the guard.

In an analyst's kernel::

    import ibis
    con = ibis.sekisho.connect()            # the guard service, with the hub token
    t = con.table("residents")
    df = t.group_by("block").agg(n=t.count()).execute()
    df.attrs["sekisho"]                      # disclosure summary (also con.last_summary)
    df.sekisho.status, df.sekisho.low        # per-cell status and accuracy (sekisho.client.status)
    con.sql("SELECT block, count(*) AS n FROM residents GROUP BY block").execute()

Expressions are compiled to DuckDB SQL with ibis's own DuckDB compiler and sent to the
guard; the protected result comes back as Arrow. Nothing here protects anything: the
kernel is untrusted and the guard (service side) decides. This module only makes the
guard pleasant to use and its refusals clear. Writes (``create_table``, ``insert``,
``drop_*``), in-memory tables and Python UDFs are refused here with a clear message —
the guard would refuse them anyway, as it never sees local data.

For publishing reports in-process (a process that can read the instance — the service
account or root): ``ibis.sekisho.connect(home=PATH, user="reports")`` calls
``sekisho.guard.Guard`` directly with the same SQL.
"""

from __future__ import annotations

import os
from importlib.metadata import version as package_version
from typing import TYPE_CHECKING, Any, ClassVar

import ibis
import ibis.common.exceptions as exc
import ibis.expr.operations as ops
import ibis.expr.schema as sch
import pyarrow as pa
from ibis.backends import NoExampleLoader, NoUrl
from ibis.backends.sql import SQLBackend
from ibis.backends.sql.compilers.duckdb import compiler as duckdb_compiler
from ibis.backends.sql.datatypes import DuckDBType

from sekisho.access import REPORTS_USER
from sekisho.client import display as _display  # noqa: F401  (registers the df.sekisho accessor)
from sekisho.client.describe import Description, order_by_domains
from sekisho.client.describe import describe as describe_views
from sekisho.client.status import attach
from sekisho.client.transport import (GuardError, GuardRefusal, GuardTimeout, HttpTransport, InProcessTransport,
                                      guard_url_from_env)
from sekisho.errors import SekishoError

if TYPE_CHECKING:
    from collections.abc import Mapping

    import ibis.expr.types as ir
    import pandas as pd

__all__ = ["Backend", "GuardRefusal", "GuardError", "GuardTimeout", "ReadOnlyError", "guard_url_from_env"]


class ReadOnlyError(SekishoError, exc.IbisError):
    """The Sekisho backend is read-only and aggregate-only."""


def _read_only(what: str) -> ReadOnlyError:
    return ReadOnlyError(
        f"{what} is not possible through Sekisho: the analysis environment is read-only and "
        f"returns only protected aggregates / 関所では{what}はできません（読み取り専用・集計のみ）")


class Backend(SQLBackend, NoUrl, NoExampleLoader):
    """ibis backend for the Sekisho guard (DuckDB SQL dialect)."""

    name: ClassVar[str] = "sekisho"
    compiler = duckdb_compiler
    supports_temporary_tables = False
    supports_python_udfs = False

    # ---- connecting ---------------------------------------------------------
    def do_connect(self, url: str | None = None, token: str | None = None, *,
                   home: str | os.PathLike | None = None, user: str | None = None,
                   mode: str | None = None, epsilon: float | None = None,
                   timeout: float = 120.0) -> None:
        """Connect to the guard.

        Parameters
        ----------
        url
            Guard service URL; default ``$SEKISHO_GUARD_URL``, else derived from
            ``$JUPYTERHUB_API_URL`` (``.../hub/api`` -> ``.../services/guard/``).
        token
            Hub token; default ``$JUPYTERHUB_API_TOKEN``.
        home, user
            In-process mode (reports): call the guard of the instance at ``home`` directly,
            as ``user``. Only works for a process that can read the instance.
        mode, epsilon
            Defaults for every query of this connection (``"threshold"`` or ``"dp"``);
            override per query with ``expr.execute(mode=..., epsilon=...)``.
        timeout
            Seconds to wait for each answer of the guard service; a query still running
            then raises ``GuardTimeout`` ("the query took longer than N s"). The guard's
            own time limit (config ``guard.query_seconds``) stops a query first, as the
            refusal ``resource_limit``.
        """
        if home is not None or user is not None:
            if url is not None or token is not None:
                raise ValueError("pass either url/token (service) or home/user (in-process), not both")
            if not user:
                raise ValueError("in-process mode needs user=, e.g. "
                                 f"ibis.sekisho.connect(home=PATH, user={REPORTS_USER!r})")
            self._transport = InProcessTransport(home, user)
        else:
            url = url or guard_url_from_env()
            token = token or os.environ.get("JUPYTERHUB_API_TOKEN")
            if not token:
                raise GuardError("no hub token: set JUPYTERHUB_API_TOKEN or pass token= "
                                 "/ ハブのトークンがありません")
            self._transport = HttpTransport(url, token, timeout=timeout)
        self.default_mode = mode
        self.default_epsilon = epsilon
        self.last_summary: dict[str, Any] | None = None
        self.last_cells: pa.Table | None = None
        self._views: dict[str, Any] | None = None
        self._schemas: dict[str, sch.Schema] = {}
        info = self._transport.views()
        self.user: str = info.get("user") or user or "?"
        self.role: str | None = info.get("role")
        self._views = info["views"]

    def disconnect(self) -> None:
        self._transport.close()

    @property
    def version(self) -> str:
        return package_version("sekisho")

    # ---- catalog -----------------------------------------------------------
    @property
    def views(self) -> dict[str, Any]:
        """The caller's views: ``{name: {title, purpose, columns: {...}}}``."""
        return dict(self._views or {})

    def list_tables(self, *, like: str | None = None, database: Any = None) -> list[str]:
        return self._filter_with_like(sorted(self._views or {}), like)

    def get_schema(self, table_name: str, *, catalog: str | None = None,
                   database: str | None = None) -> sch.Schema:
        if catalog or database:
            raise exc.IbisError("Sekisho views have no catalog or database / カタログ指定はできません")
        if table_name not in (self._views or {}):
            raise exc.TableNotFound(
                f"no view {table_name!r} for your role; available: {', '.join(self.list_tables())} "
                f"/ ビュー {table_name!r} はありません")
        if table_name not in self._schemas:
            columns = self._views[table_name].get("columns", {})
            self._schemas[table_name] = sch.Schema(
                {name: _dtype(spec) for name, spec in columns.items()})
        return self._schemas[table_name]

    def _get_schema_using_query(self, query: str) -> sch.Schema:
        try:
            return self._transport.describe(query)
        except GuardRefusal as e:   # con.sql(...) refused before it runs: the panel needs the SQL too
            e.sql, e.mode, e.epsilon, e.views = query, self.default_mode, self.default_epsilon, self._views
            raise

    def budget(self) -> dict[str, Any]:
        """The caller's privacy budget for this period (period, total, spent, remaining)."""
        return self._transport.budget()

    def describe(self, view: str | None = None) -> Description:
        """The caller's views, or the columns of ``view`` (type, class, description,
        domain), as a Japanese table: HTML in a notebook, text elsewhere."""
        return describe_views(self._views or {}, view)

    # ---- running -----------------------------------------------------------
    def _run_pre_execute_hooks(self, expr: ir.Expr) -> None:
        if expr.op().find(ops.InMemoryTable):
            raise _read_only("sending local data (memtable)")
        if expr.op().find((ops.ScalarUDF, ops.AggUDF)):
            raise _read_only("running user-defined functions (UDF)")
        for table in expr.op().find(ops.DatabaseTable):
            if table.source is not self:
                raise exc.IbisError(f"table {table.name!r} belongs to another backend "
                                    "/ 別の接続のテーブルは使えません")

    def _sql_for(self, expr: ir.Expr, params: Mapping | None, limit: int | str | None) -> str:
        table = expr.as_table()
        op = table.op()
        # A con.sql(...) expression runs as written: the guard sees the analyst's own SQL.
        if isinstance(op, ops.SQLQueryResult) and op.source is self and params is None and limit is None:
            return op.query
        # ibis writes conditional aggregates as FILTER clauses and boolean sums as
        # SUM(CAST(c AS INT)): the guard takes them as they are (sekisho.guard.idioms)
        return self.compile(table, params=params, limit=limit)

    def to_pyarrow(self, expr: ir.Expr, /, *, params: Mapping | None = None,
                   limit: int | str | None = None, mode: str | None = None,
                   epsilon: float | None = None, **kwargs: Any) -> pa.Table:
        """Run ``expr`` through the guard; the protected result as an Arrow table.

        The disclosure summary is in ``self.last_summary``.
        """
        if kwargs:
            raise TypeError(f"unexpected argument(s) {', '.join(kwargs)}")
        self._run_pre_execute_hooks(expr)
        limit = None if limit == "default" else limit
        sql = self._sql_for(expr, params, limit)
        mode = mode or self.default_mode
        if epsilon is None and mode != "threshold":
            epsilon = self.default_epsilon   # the default ε goes with DP queries only
        ask = getattr(self._transport, "query_with_cells", None)
        try:
            if ask is not None:
                table, summary, cells = ask(sql, mode=mode, epsilon=epsilon)
            else:
                (table, summary), cells = self._transport.query(sql, mode=mode, epsilon=epsilon), None
        except GuardRefusal as e:
            # what the refusal panel needs for a way forward (sekisho.client.display)
            e.sql, e.mode, e.epsilon, e.views = sql, mode, epsilon, self._views
            raise
        self.last_summary = summary
        self.last_cells = cells
        self.last_sql = sql
        return table

    def execute(self, expr: ir.Expr, /, *, params: Mapping | None = None,
                limit: int | str | None = None, mode: str | None = None,
                epsilon: float | None = None, **kwargs: Any) -> pd.DataFrame | pd.Series | Any:
        """Run ``expr`` through the guard and return pandas.

        A DataFrame result carries the disclosure summary in ``df.attrs["sekisho"]``
        and its per-cell status and accuracy in ``df.sekisho.status`` / ``.low`` /
        ``.high`` (the values themselves stay plain); the summary of the last query is
        also ``con.last_summary``, its cells table ``con.last_cells``. A refused query raises
        ``sekisho.client.GuardRefusal`` (``code``, ``reason``, ``part``).
        """
        table = self.to_pyarrow(expr, params=params, limit=limit, mode=mode, epsilon=epsilon, **kwargs)
        df = table.to_pandas()
        result = expr.__pandas_result__(df, schema=sch.Schema.from_pyarrow(table.schema))
        if not isinstance(result, _display.pd.DataFrame):
            if hasattr(result, "attrs"):
                result.attrs["sekisho"] = self.last_summary
            return result
        # plain values; per-cell status and accuracy through ``result.sekisho``, attached
        # to the rows as answered (aligned by label from then on)
        attach(result, self.last_summary, self.last_cells)
        # ordered public domains (age bands ...) in the policy's order, rows by label;
        # ordered without the attrs, which pandas would deep-copy at every column it touches
        attrs, result.attrs = result.attrs, {}
        ordered = order_by_domains(result, self._views, self.last_sql)
        ordered.attrs = attrs
        return ordered

    def to_pyarrow_batches(self, expr: ir.Expr, /, *, params: Mapping | None = None,
                           limit: int | str | None = None, chunk_size: int = 1_000_000,
                           **kwargs: Any) -> pa.ipc.RecordBatchReader:
        table = self.to_pyarrow(expr, params=params, limit=limit, **kwargs)
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=chunk_size))

    def raw_sql(self, query: str, **kwargs: Any) -> Any:
        raise _read_only("raw SQL execution (use con.sql(...).execute())")

    # ---- everything that would write or hold local data ----------------------
    def create_table(self, *args: Any, **kwargs: Any) -> Any:
        raise _read_only("creating tables (create_table)")

    def create_view(self, *args: Any, **kwargs: Any) -> Any:
        raise _read_only("creating views (create_view)")

    def drop_table(self, *args: Any, **kwargs: Any) -> None:
        raise _read_only("dropping tables (drop_table)")

    def drop_view(self, *args: Any, **kwargs: Any) -> None:
        raise _read_only("dropping views (drop_view)")

    def insert(self, *args: Any, **kwargs: Any) -> None:
        raise _read_only("inserting rows (insert)")

    def upsert(self, *args: Any, **kwargs: Any) -> None:
        raise _read_only("upserting rows (upsert)")

    def truncate_table(self, *args: Any, **kwargs: Any) -> None:
        raise _read_only("truncating tables (truncate_table)")

    def rename_table(self, *args: Any, **kwargs: Any) -> None:
        raise _read_only("renaming tables (rename_table)")

    def _register_in_memory_table(self, op: ops.InMemoryTable) -> None:
        raise _read_only("sending local data (memtable)")

    def _make_memtable_finalizer(self, name: str) -> None:
        return None

    def _create_cached_table(self, name: str, expr: ir.Table) -> ir.Table:
        raise _read_only("caching tables (cache)")

    def read_csv(self, *args: Any, **kwargs: Any) -> Any:
        raise _read_only("loading files (read_csv)")

    def read_parquet(self, *args: Any, **kwargs: Any) -> Any:
        raise _read_only("loading files (read_parquet)")

    def __repr__(self) -> str:
        transport = getattr(self, "_transport", None)
        if transport is None:
            return "<sekisho backend (not connected)>"
        return f"<sekisho backend: {transport.describe_target()} as {self.user}>"


def _dtype(spec: Any) -> Any:
    """An ibis dtype from a view column description (``{"type": ...}`` or a type string).

    Accepts ibis type strings (``int64``, ``!string``) and DuckDB ones (``VARCHAR``).
    """
    type_name = spec.get("type") if isinstance(spec, dict) else spec
    if not isinstance(type_name, str):
        raise GuardError(f"the guard described a column without a type: {spec!r}")
    try:
        return ibis.dtype(type_name)
    except Exception:
        try:
            return DuckDBType.from_string(type_name)
        except Exception:
            raise GuardError(f"the guard described a column with an unknown type {type_name!r}") from None
