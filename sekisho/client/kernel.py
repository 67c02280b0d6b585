"""The analysts' kernel "Sekisho（安全な分析環境）".

``kernels/sekisho/kernel.json`` starts an ordinary IPython kernel that runs
``from sekisho.client.kernel import start; con = start()`` first: ``con`` is connected to
the guard with the server's hub token, and the first cell's output begins with who you
are, which views you may use and how much privacy budget is left (printed at the first
cell because output produced while the kernel starts is not shown by JupyterLab).

``install_kernelspec(prefix)`` installs it (the hub configuration makes it the default).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import ibis
from jupyter_client.kernelspec import KernelSpecManager

from sekisho.access import role_label
from sekisho.resources import resource_dir

KERNEL_NAME = "sekisho"
DISPLAY_NAME = "Sekisho（安全な分析環境）"


def greeting(con: Any) -> str:
    """What the analyst reads first: role, views, remaining budget (Japanese)."""
    lines = ["関所（安全な分析環境）に接続しました。",
             f"利用者: {con.user}（役割: {role_label(con.role)}）"]
    views = con.views
    if views:
        lines.append("利用できるビュー（表）:")
        for name in sorted(views):
            title = views[name].get("title") if isinstance(views[name], dict) else None
            lines.append(f"  - {name}" + (f"（{title}）" if title else ""))
    else:
        lines.append("利用できるビューはありません。")
    lines.append("ビューの一覧: con.describe()　列の説明（分類・値の範囲）: con.describe(\"residents\")")
    b: dict[str, Any] = {}
    try:
        b = con.budget()
        lines.append(f"今期（{b.get('period')}）のプライバシー予算: 残り ε = {_num(b.get('remaining'))}"
                     f" / {_num(b.get('total'))}（使用済み {_num(b.get('spent'))}）")
    except Exception as e:  # the greeting must not hide the connection
        lines.append(f"プライバシー予算を取得できませんでした: {e}")
    lines += ["使い方（現在の住民を地域ブロック別に数える）:",
              "  t = con.table(\"residents\"); cur = t.filter(t.is_current)",
              "  cur.group_by(\"block\").agg(n=cur.count()).execute()",
              "結果は保護済みの集計値です（秘匿・撹乱の内容は df.attrs[\"sekisho\"] に入ります）。",
              dp_hint(b)]
    return "\n".join(lines)


def dp_hint(budget: dict[str, Any]) -> str:
    """How to ask for differential privacy, with the ε range the policy allows per query."""
    low, high = budget.get("epsilon_per_query_min"), budget.get("epsilon_per_query_max")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        example = min(max(0.5, low), high)
        return (f"差分プライバシー（DP）で集計: .execute(mode=\"dp\", epsilon={example:g})"
                f"（1回の ε は {low:g}〜{high:g}。使った ε は今期の予算から差し引かれます）")
    return "差分プライバシー（DP）で集計: .execute(mode=\"dp\", epsilon=ε)（使った ε は今期の予算から差し引かれます）"


def _num(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else str(value)


def start() -> Any:
    """Connect ``ibis.sekisho`` and arrange for the greeting to open the first cell's output.

    Returns the connection, or ``None`` (with the reason shown at the first cell) when the
    guard cannot be reached — the kernel still starts, so the analyst can read the message.
    """
    try:
        con = ibis.sekisho.connect()
        message = greeting(con)
    except Exception as e:
        con = None
        message = (f"関所サービスに接続できませんでした: {e}\n"
                   "ハブのホームからサーバーを再起動するか、管理者に連絡してください。"
                   "\n(could not connect to the Sekisho guard)")
    _show_at_first_cell(message)
    install_display(con)
    return con


def install_display(con: Any = None) -> bool:
    """Results as Japanese tables (秘匿 as X, accuracy header) and refusals as short panels
    with a way forward, the traceback folded away (``sekisho.client.display``). Returns
    whether an IPython shell was there to install them in."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    from sekisho.client.display import install

    install(shell, con)
    return True


def _show_at_first_cell(message: str) -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        print(message)
        return
    shell = get_ipython()
    if shell is None:
        print(message)
        return

    def show(*_args: Any) -> None:
        shell.events.unregister("pre_run_cell", show)
        print(message, flush=True)

    shell.events.register("pre_run_cell", show)


def spec_dir() -> Path:
    return resource_dir("kernels") / KERNEL_NAME


def install_kernelspec(prefix: str | os.PathLike | None = None, *, user: bool = False) -> str:
    """Install the kernelspec under ``prefix`` (default: this Python's prefix, so
    ``/opt/sekisho/venv/share/jupyter/kernels/sekisho``). Returns the installed path."""
    return KernelSpecManager().install_kernel_spec(
        str(spec_dir()), kernel_name=KERNEL_NAME, user=user,
        prefix=None if user else str(prefix or sys.prefix), replace=None)


if __name__ == "__main__":
    print(install_kernelspec(sys.argv[1] if len(sys.argv) > 1 else None))
