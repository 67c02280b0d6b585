#!/usr/bin/env bash
# Install Sekisho on a fresh Debian machine as root (Python 3.11). Safe to re-run.
#   scripts/install.sh        the runtime: system packages, /opt/sekisho/venv, sekisho
#   scripts/install.sh --dev  the same plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SEKISHO_VENV:-/opt/sekisho/venv}
EXTRAS=""
[ "${1:-}" = "--dev" ] && EXTRAS="[dev]"

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (it creates system users, a venv under /opt and installs packages)" >&2
  exit 1
fi

# System packages: the Python that analysts' processes may execute (not root's pyenv),
# PAM for hub logins, sudo for stewards' uploads, Node for the hub's proxy,
# chromium for browser tests and report checks (Debian's build; never a downloaded one).
need=()
for pkg in python3 python3-venv python3-dev libpam0g sudo chromium fonts-noto-cjk; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
# Node.js may come from another packaging that bundles npm (and conflicts with Debian's
# npm package): ask for the commands, not the package names
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v configurable-http-proxy >/dev/null; then
  echo "==> npm install -g configurable-http-proxy"
  npm install -g --silent configurable-http-proxy >/dev/null
fi

# The venv lives under a world-readable path and is built from /usr/bin/python3 so that
# analysts' servers and kernels (their own OS users) can execute it.
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV from /usr/bin/python3"
  mkdir -p "$(dirname "$VENV")"
  /usr/bin/python3 -m venv "$VENV"
fi
chmod 755 "$(dirname "$VENV")" "$VENV"
# pip's exit status decides (pipefail); the filter only drops notes about absent local mirrors
pip_install() { "$VENV/bin/pip" install -q "$@" 2>&1 | { grep -v "is ignored" || true; }; }
echo "==> pip install .${EXTRAS} into $VENV"
pip_install --upgrade pip
pip_install ".${EXTRAS}"
# JupyterLab defaults for analysts: Japanese UI, nothing fetched from the internet
install -D -m 644 extensions/jupyterlab/overrides.d/sekisho.json \
  "$VENV/share/jupyter/lab/settings/overrides.d/sekisho.json"
"$VENV/bin/python" -c "import sekisho, ibis, diffprivlib, jupyterhub; print('sekisho', sekisho.__version__, 'installed in', '$VENV')"
