#!/usr/bin/env bash
# Incubate one module under the deepspeed launcher: launchers/incubate_module.sh I [launcher options] [-- dsincubate options]
set -euo pipefail
I="${1:?usage: incubate_module.sh MODULE_INDEX [launcher options] [-- dsincubate options]}"; shift
LARGS=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do LARGS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
exec "$(dirname "${BASH_SOURCE[0]}")/phase.sh" incubate "${LARGS[@]+"${LARGS[@]}"}" -- --module "$I" "$@"
