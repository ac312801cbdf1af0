# Sourced by scripts/demo and scripts/test: makes .venv (once) and installs federatls with
# the extras named in FEDERATLS_EXTRAS (and those installed before), re-installing only when
# pyproject.toml changes or an extra is missing.
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
# The stamp holds pyproject.toml's hash and the extras installed. A script installs again
# only when pyproject.toml changed or it needs an extra not there yet, and then installs the
# union of both, so ./scripts/demo (ca) and ./scripts/test (ca,test) do not undo each other.
stamp="$VENV/.federatls-installed"
hash="$(sha256sum < "$ROOT/pyproject.toml" | cut -d' ' -f1)"
had_hash="" had_extras=""
if [[ -f $stamp ]]; then
  read -r had_hash had_extras < "$stamp" || true
fi
extra_set() { tr ', ' '\n\n' | sed '/^$/d' | sort -u | paste -sd, -; }
had_extras="$(printf '%s' "$had_extras" | extra_set)"
extras="$(printf '%s,%s' "$had_extras" "$FEDERATLS_EXTRAS" | extra_set)"
if [[ $had_hash != "$hash" || $extras != "$had_extras" ]]; then
  echo ">> installing federatls[${extras}] into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -e "$ROOT[${extras}]" >&2
  echo "$hash $extras" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
