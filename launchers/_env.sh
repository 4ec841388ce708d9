# Sourced by the launchers: the repo's python (its .venv when present, else $PYTHON or python3) and the deepspeed
# launcher next to it ($DEEPSPEED overrides).
HERE="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
[ -x "$REPO/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$REPO/.venv/bin/python"
DS="${DEEPSPEED:-$(dirname "$PY")/deepspeed}"
command -v "$DS" >/dev/null 2>&1 || DS=deepspeed
