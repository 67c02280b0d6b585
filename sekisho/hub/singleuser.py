"""An analyst's server: the published report notebooks in a read-only folder, then JupyterLab.

The hub starts every server as ``python -m sekisho.hub.singleuser [args]`` (``Spawner.cmd``,
``sekisho.hub.config``), already as the person's own OS user. This program

1. puts the report notebooks shipped with Sekisho (``reports/*.ipynb``) into
   ``~/公表レポート/``, each with the Sekisho kernel as its kernelspec — so they open in
   the kernel where ``con`` is connected to the guard — the files read-only (0444) in a
   read-only folder (0555): JupyterLab opens them read-only, and an analyst who wants to
   change one saves a copy in their own folder (「名前を付けて保存」). The copies are
   refreshed at every start, so a new Sekisho version's notebooks arrive; the analyst's
   own files elsewhere are never touched, and a ``公表レポート`` that is not a plain
   directory (a symlink, a file) is left alone;
2. replaces itself (``exec``, same process id, which the spawner watches) with
   ``jupyterhub-singleuser`` and the same arguments.

A failure in step 1 is printed and the server starts anyway: the folder is a convenience,
the notebooks are also published by the reports service.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

import nbformat

from sekisho.resources import resource_dir

REPORTS_FOLDER = "公表レポート"
KERNEL_NAME = "sekisho"       # kernels/sekisho (sekisho.client.kernel.KERNEL_NAME)
FILE_MODE = 0o444
FOLDER_MODE = 0o555
README_NAME = "はじめにお読みください.md"
README = """# 公表レポート（読み取り専用）

関所が公表しているレポートのノートブックです。開くと「Sekisho（安全な分析環境）」カーネルで動き、
集計はすべて関所のガードを通ります（公表値と同じ保護済みの数値）。

* このフォルダのファイルは読み取り専用です。変更したいときは「ファイル」→「名前を付けて保存」で
  ご自分のフォルダに保存してから編集してください。
* このフォルダはサーバーを起動するたびに最新の版に置き換わります。
"""


def kernelspec() -> dict[str, str]:
    """The Sekisho kernel's kernelspec entry for a notebook's metadata."""
    spec = json.loads((resource_dir("kernels") / KERNEL_NAME / "kernel.json").read_text(encoding="utf-8"))
    return {"name": KERNEL_NAME, "display_name": spec["display_name"], "language": spec.get("language", "python")}


def notebook_for_analysts(source: Path, spec: dict[str, str]) -> str:
    """A shipped notebook as an analyst's copy: the Sekisho kernel, no stored outputs."""
    nb = nbformat.read(source, as_version=4)
    nb.metadata["kernelspec"] = dict(spec)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nbformat.writes(nb)


def _write(directory: Path, name: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".sekisho-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, directory / name)   # replaces the previous (read-only) copy atomically
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def stage_reports(home: str | os.PathLike, source: Path | None = None) -> list[Path]:
    """Put the report notebooks into ``home/公表レポート`` (see the module); returns the
    files written, ``[]`` when the folder is not ours to write."""
    folder = Path(home) / REPORTS_FOLDER
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        folder.mkdir(mode=0o755)
        st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        print(f"sekisho: {folder} is not a directory of this user; the report notebooks are not copied",
              file=sys.stderr)
        return []
    spec = kernelspec()
    notebooks = sorted((source or resource_dir("reports")).glob("*.ipynb"))
    os.chmod(folder, 0o755)   # writable while the copies are refreshed
    written = []
    try:
        for path in notebooks:
            _write(folder, path.name, notebook_for_analysts(path, spec))
            written.append(folder / path.name)
        _write(folder, README_NAME, README)
        written.append(folder / README_NAME)
    finally:
        os.chmod(folder, FOLDER_MODE)
    return written


def singleuser_command(argv: list[str]) -> list[str]:
    """The command this program replaces itself with: ``jupyterhub-singleuser`` of this Python."""
    script = Path(sys.executable).with_name("jupyterhub-singleuser")
    return [sys.executable, str(script), *argv]


def main(argv: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if argv is None else argv
    try:
        stage_reports(os.environ.get("HOME") or os.path.expanduser("~"))
    except Exception as exc:   # never keep the server from starting
        print(f"sekisho: the report notebooks could not be copied: {exc}", file=sys.stderr)
    command = singleuser_command(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
