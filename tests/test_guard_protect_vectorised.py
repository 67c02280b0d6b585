"""The vectorised helpers of threshold protection (``cells_from_arrow``, ``number``,
``densify``, the top-contribution columns) give bit-identical results to the element-wise
versions they replaced, which are kept here as the reference; so every released cell
(and its perturbation) is unchanged for the same inputs. Group keys now stay Arrow
arrays (looked up in Arrow's hash kernels where Arrow's equality is Python's): they
must hold the same Python values as the reference's object arrays."""

from __future__ import annotations

import datetime as dt
import decimal
import itertools
import random
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from sekisho.guard.protect import densify as densify_module
from sekisho.guard.protect import threshold as th
from sekisho.guard.protect.cellkey import PerturbationTable


# ---- the element-wise reference (the code before vectorisation) --------------------------
def ref_cells_from_arrow(table: pa.Table) -> dict:
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            out[name] = col.to_numpy(zero_copy_only=False).astype(float) if col.null_count else \
                col.to_numpy(zero_copy_only=False)
        else:
            values = col.to_pylist()
            arr = np.empty(len(values), dtype=object)
            for i, v in enumerate(values):
                arr[i] = v
            out[name] = arr
    return out


def ref_number(cells, name, dtype=float):
    if name not in cells:
        return np.zeros(th.size(cells), dtype=dtype)
    values = cells[name]
    if values.dtype == object:
        values = np.array([0 if v is None else v for v in values], dtype=float)
    return np.nan_to_num(values.astype(float), nan=0.0).astype(dtype)


def ref_densify(cells, domains):
    if not domains or any(d is None for d in domains):
        return cells, None
    n_grid = 1
    for d in domains:
        n_grid *= len(d)
    if n_grid > th.MAX_DENSE_CELLS:
        return cells, None
    keys = [f"__g{j}" for j in range(len(domains))]
    present = list(zip(*[cells[k].tolist() for k in keys])) if th.size(cells) else []
    index = {key: i for i, key in enumerate(present)}
    grid = list(itertools.product(*domains))
    grid_set = set(grid)
    positions = np.array([index.get(key, -1) for key in grid], dtype=np.int64)
    found = positions >= 0
    dense = {}
    for j, k in enumerate(keys):
        dense[k] = np.array([key[j] for key in grid], dtype=object)
    for col, values in cells.items():
        if col in keys:
            continue
        out = np.zeros(len(grid), dtype=values.dtype) if values.dtype.kind in "iuf" else \
            np.empty(len(grid), dtype=object)
        out[found] = values[positions[found]]
        dense[col] = out
    outside_mask = np.array([key not in grid_set for key in present], dtype=bool)
    return dense, th.take(cells, outside_mask) if th.size(cells) else cells


def ref_tops(tops):
    return (np.array([th._nth(t, 0) for t in tops], dtype=float),
            np.array([th._nth(t, 1) for t in tops], dtype=float))


# ---- exact comparison ----------------------------------------------------------------------
def same_value(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and np.isnan(a):
        return bool(np.isnan(b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b


def as_reference(a, like: np.ndarray):
    """Group keys are Arrow arrays now; the reference kept them as object arrays of the
    same Python values (integer keys with a NULL: floats with NaN)."""
    if not isinstance(a, pa.Array):
        return a
    values = a.to_pylist()
    if like.dtype.kind == "f":
        assert pa.types.is_integer(a.type)
        return np.array([np.nan if v is None else v for v in values], dtype=float)
    if like.dtype.kind in "iu":
        assert pa.types.is_integer(a.type) and a.null_count == 0
        return np.array(values, dtype=like.dtype)
    out = np.empty(len(a), dtype=object)
    out[:] = values
    return out


def assert_same_array(a: np.ndarray, b: np.ndarray) -> None:
    a, b = as_reference(a, b), as_reference(b, a)
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == object:
        assert all(same_value(x, y) for x, y in zip(a.tolist(), b.tolist()))
    else:
        assert a.tobytes() == b.tobytes()   # bit for bit (NaN payloads and -0.0 included)


def key_values(column) -> list:
    """A group key column as the values it is released as: the reference mixed integer
    keys from the grid (int) with those outside it (float, NaN for NULL) in one object
    array, which both became the same int64 Arrow column; Arrow keys are ints and None."""
    values = column.to_pylist() if isinstance(column, pa.Array) else column.tolist()
    out = []
    for v in values:
        if isinstance(v, float) and np.isnan(v):
            v = None
        elif isinstance(v, float) and v.is_integer():
            v = int(v)
        out.append(v)
    return out


def assert_same_cells(a: dict | None, b: dict | None) -> None:
    assert (a is None) == (b is None)
    if a is None:
        return
    assert list(a) == list(b)
    for k in a:
        if k.startswith("__g") and (isinstance(a[k], pa.Array) or isinstance(b[k], pa.Array)):
            assert key_values(a[k]) == key_values(b[k]), k
        else:
            assert_same_array(a[k], b[k])


# ---- random inputs -------------------------------------------------------------------------
BLOCKS = ["飾磨", "広畑", "網干", "中央", "東"]
BANDS = [f"{i * 5}-{i * 5 + 4}" for i in range(6)]


def random_table(rng: random.Random, n: int) -> pa.Table:
    def maybe(v):
        return None if rng.random() < 0.1 else v
    return pa.table({
        "__g0": pa.array([maybe(rng.choice(BLOCKS + ["外"])) for _ in range(n)], type=pa.string()),
        "__g1": pa.array([maybe(rng.randrange(0, 8)) for _ in range(n)], type=pa.int64()),
        "__g2": pa.array([rng.randrange(0, 3) for _ in range(n)], type=pa.int32()),
        "__gb": pa.array([maybe(rng.random() < 0.5) for _ in range(n)], type=pa.bool_()),
        "__gd": pa.array([maybe(dt.date(2020, 1, 1) + dt.timedelta(days=rng.randrange(900))) for _ in range(n)]),
        "__gl": pa.array([maybe(rng.choice(BANDS)) for _ in range(n)], type=pa.large_string()),
        "__dec": pa.array([maybe(decimal.Decimal(rng.randrange(10**6)) / 100) for _ in range(n)],
                          type=pa.decimal128(12, 2)),
        "__n": pa.array([rng.randrange(0, 40) for _ in range(n)], type=pa.int64()),
        "__ck": pa.array([rng.randrange(0, 256) for _ in range(n)], type=pa.int32()),
        "__x0": pa.array([maybe(rng.randrange(0, 40)) for _ in range(n)], type=pa.int64()),
        "__s1": pa.array([maybe(rng.choice([rng.uniform(-1e6, 1e6), float("inf"), float("-inf"), 0.0, -0.0]))
                          for _ in range(n)], type=pa.float64()),
        "__c1": pa.array([rng.randrange(0, 40) for _ in range(n)], type=pa.int64()),
        "__t1": pa.array([maybe([rng.uniform(0, 1e5) for _ in range(rng.randrange(0, 3))]) for _ in range(n)],
                         type=pa.list_(pa.float64())),
    })


@pytest.mark.parametrize("seed", range(8))
def test_cells_from_arrow_is_unchanged(seed) -> None:
    rng = random.Random(seed)
    table = random_table(rng, rng.choice([0, 1, 7, 300]))
    if seed % 2:   # several record batches, as DuckDB returns for larger results
        table = pa.concat_tables([table.slice(0, len(table) // 2), table.slice(len(table) // 2)])
    assert_same_cells(th.cells_from_arrow(table), ref_cells_from_arrow(table))


@pytest.mark.parametrize("seed", range(8))
def test_number_is_unchanged(seed) -> None:
    rng = random.Random(seed)
    cells = ref_cells_from_arrow(random_table(rng, rng.choice([0, 5, 200])))
    cells["__obj"] = np.array([None if rng.random() < 0.3 else rng.choice([3, 2.5, float("nan")])
                               for _ in range(len(cells["__n"]))] + [None], dtype=object)[:-1]
    for name in ("__n", "__ck", "__x0", "__s1", "__c1", "__g1", "__g2", "__obj", "__missing"):
        for dtype in (float, np.int64):
            with np.errstate(invalid="ignore"):   # +-inf cast to int64, in both versions
                assert_same_array(th.number(cells, name, dtype), ref_number(cells, name, dtype))


@pytest.mark.parametrize("seed", range(12))
def test_densify_is_unchanged(seed) -> None:
    rng = random.Random(seed)
    n = rng.choice([0, 1, 20, 400])
    table = random_table(rng, n)
    cells = ref_cells_from_arrow(table)
    # group keys are unique in a GROUP BY result: keep the first row of each key
    keys = list(zip(cells["__g0"].tolist(), cells["__g1"].tolist(), cells["__g2"].tolist()))
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(repr(key), i)
    cells = th.take(cells, np.array(sorted(first.values()), dtype=np.int64))
    domains = [tuple(BLOCKS), tuple(range(6)), (0, 1, 2)]
    for doms in (domains, domains[:1], [domains[0], None], [], [tuple(BLOCKS), tuple(range(8)), (0, 1)]):
        k = len(doms)
        sub = {c: v for c, v in cells.items() if not c.startswith("__g") or c in {f"__g{j}" for j in range(k)}}
        new, ref = th.densify(sub, doms), ref_densify(sub, doms)
        assert_same_cells(new[0], ref[0])
        assert_same_cells(new[1], ref[1])


def test_densify_with_repeated_keys_keeps_the_old_tie_break() -> None:
    cells = {"__g0": np.array(["a", "a", "b"], dtype=object), "__n": np.array([1, 2, 3]),
             "__ck": np.array([4, 5, 6])}
    for doms in ([("a", "b", "c")], [("a", "b", "a")]):
        new, ref = th.densify(cells, doms), ref_densify(cells, doms)
        assert_same_cells(new[0], ref[0])
        assert_same_cells(new[1], ref[1])


@pytest.mark.parametrize("seed", range(4))
def test_top_contributions_are_unchanged(seed) -> None:
    rng = random.Random(seed)
    tops = ref_cells_from_arrow(random_table(rng, 100))["__t1"]
    tops = np.concatenate([tops, np.array([None, float("nan"), np.array([3.0, 1.0]), (2.0,)] + [None],
                                          dtype=object)[:-1]])
    for new, ref in zip(th._tops(tops), ref_tops(tops)):
        assert_same_array(new, ref)


@pytest.mark.parametrize("seed", range(10))
def test_protected_cells_and_their_perturbation_are_unchanged(seed, monkeypatch) -> None:
    rng = random.Random(seed)
    table = random_table(rng, rng.choice([0, 3, 50, 500]))
    domains = [tuple(BLOCKS), tuple(range(6))] if seed % 3 else [None, tuple(range(6))]
    aggregates = [SimpleNamespace(kind="count_rows", cls="dimension"),
                  SimpleNamespace(kind=rng.choice(["sum", "avg"]),
                                  cls=rng.choice(["sensitive_measure", "measure"]))]
    ptable = PerturbationTable(b"s" * 32, max_noise=2, variance=1.0)
    params = {"k": 10, "table": ptable, "min_count": 3, "nk_n": 2, "nk_k": 0.85, "p_percent": 10.0,
              "perturb": seed % 4 != 0}

    def run(cells):
        cells = {c: v for c, v in cells.items() if c not in ("__gb", "__gd", "__gl", "__dec")}
        return th.protect_threshold(cells, aggregates, domains, **params)

    new_out, new_stats = run(th.cells_from_arrow(table))
    with monkeypatch.context() as m:
        m.setattr(th, "number", ref_number)
        m.setattr(th, "densify", ref_densify)
        m.setattr(th, "_tops", ref_tops)
        ref_out, ref_stats = run(ref_cells_from_arrow(table))
    assert_same_cells(new_out, ref_out)
    assert new_stats == ref_stats


# ---- group keys as Arrow arrays: the lookups agree with the dict's (Python) equality --------
def arrow_and_reference(columns: dict[str, pa.Array], n: np.ndarray) -> tuple[dict, dict]:
    table = pa.table({**columns, "__n": pa.array(n), "__ck": pa.array(n % 256)})
    return th.cells_from_arrow(table), ref_cells_from_arrow(table)


@pytest.mark.parametrize("seed", range(12))
def test_densify_of_arrow_keys_matches_the_reference(seed) -> None:
    rng = random.Random(seed)
    table = random_table(rng, rng.choice([0, 1, 20, 400]))
    first = {}
    for i, key in enumerate(zip(*(table.column(c).to_pylist() for c in ("__g0", "__gl", "__g1", "__g2")))):
        first.setdefault(key, i)
    table = table.take(pa.array(sorted(first.values()), type=pa.int64()))
    keys = table.select(["__g0", "__gl", "__g1", "__g2"]).rename_columns(["__g0", "__g1", "__g2", "__g3"])
    new_cells = th.cells_from_arrow(pa.table({**{c: keys.column(c) for c in keys.column_names},
                                              "__n": table.column("__n"), "__ck": table.column("__ck")}))
    assert all(isinstance(new_cells[f"__g{j}"], pa.Array) for j in range(4))
    ref_cells = {c: (ref_cells_from_arrow(keys)[c] if c.startswith("__g") else v) for c, v in new_cells.items()}
    domains = [tuple(BLOCKS), tuple(BANDS[:4]), tuple(range(6)), (0, 1, 2)]
    for doms in (domains, [domains[0], domains[1], domains[2], (2, 0)], [(), *domains[1:]]):
        new, ref = th.densify(new_cells, doms), ref_densify(ref_cells, doms)
        assert_same_cells(new[0], ref[0])
        assert_same_cells(new[1], ref[1])


@pytest.mark.parametrize("keys, domain, found", [
    # an int8 key cannot hold 300: the lookup falls back to the dict, and still finds 5
    (pa.array([5, 7, None], type=pa.int8()), (5, 300), [True, False, False]),
    # uint64 keys are not wrapped into int64: 2**64-1 is not -1
    (pa.array([2**64 - 1, 0], type=pa.uint64()), (-1, 0), [False, True]),
    # a negative integer domain, NULLs and keys outside its range
    (pa.array([-3, None, -1, 40, -7], type=pa.int16()), (-1, -3, -2), [True, False, True, False, False]),
    # "1" is not 1 in Python (nor in the dict): no key of a text column is in an int domain
    (pa.array(["1", "2"]), (1, 2), [False, False]),
    # True == 1 in Python: a bool domain against integer keys matches as the dict does
    (pa.array([1, 0, 2], type=pa.int64()), (False, True), [True, True, False]),
    # floats (0.0 == -0.0, NaN) always go through the dict
    (pa.array([-0.0, float("nan"), 2.0]), (0.0, 2), [True, False, True]),
    (pa.array(["飾磨", None, "外"], type=pa.large_string()), ("飾磨", "外"), [True, False, True]),
])
def test_arrow_key_lookups_keep_python_equality(keys, domain, found) -> None:
    n = np.full(len(keys), 20)
    new_cells, ref_cells = arrow_and_reference({"__g0": keys}, n)
    new, ref = th.densify(new_cells, [domain]), ref_densify(ref_cells, [domain])
    assert_same_cells(new[0], ref[0])
    assert_same_cells(new[1], ref[1])
    assert len(new[1]["__n"]) == len(keys) - sum(found)


def test_text_and_integer_keys_are_looked_up_in_arrow() -> None:
    """The common keys (blocks, bands, ages) take Arrow's lookup, not the dict's."""
    assert densify_module._arrow_domain((tuple(BLOCKS), (str,) * len(BLOCKS)), pa.string()) is not None
    assert densify_module._arrow_domain((tuple(range(101)), (int,) * 101), pa.int32()) is not None
    assert densify_module._arrow_domain(((False, True), (bool, bool)), pa.int64()) is None


def test_scalar_perturbation_is_the_vectorised_one() -> None:
    # the population check perturbs one count with the scalar form: it must be the very
    # same draw as the vectorised form, small counts, cycling columns and large counts alike
    ptable = PerturbationTable(b"q" * 32, max_noise=3, variance=2.0)
    counts = np.array([0, 1, 2, 9, 10, 31, 32, 33, 63, 64, 1000, 530_495, 5_304_950], dtype=np.int64)
    for key in (0, 1, 17, 128, 255, 256, 511):
        keys = np.full(len(counts), key, dtype=np.int64)
        assert [ptable.perturb_count(key, c) for c in counts] == ptable.perturb_counts(keys, counts).tolist()


def test_a_missing_count_is_the_contributor_count_only_where_it_must_be() -> None:
    cells = {"__n": np.array([12, 30]), "__ck": np.array([3, 4])}
    assert th.counted(cells, 0, "count_rows").tolist() == [12, 30]
    assert th.counted(cells, 0, "count_persons").tolist() == [12, 30]
    for kind in ("count_nonnull", "count_households"):
        with pytest.raises(KeyError):   # never a zero or the person count in its place
            th.counted(cells, 0, kind)
    cells["__x0"] = np.array([20, 41])
    assert th.counted(cells, 0, "count_rows").tolist() == [20, 41]
