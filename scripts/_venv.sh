# Sourced by scripts/demo and scripts/test: makes .venv (once) and installs federatls with
# the extras named in FEDERATLS_EXTRAS, re-installing only when pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEDERATLS_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "federatls needs Python 3.11 or newer ($PY is $("$PY" -V 2>&1))" >&2
  exit 1
fi
if [[ ! -x $VENV/bin/python ]]; then
  echo ">> creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.federatls-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) ${FEDERATLS_EXTRAS}"
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
  echo ">> installing federatls[${FEDERATLS_EXTRAS}] into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -e "$ROOT[${FEDERATLS_EXTRAS}]" >&2
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
