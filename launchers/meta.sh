#!/usr/bin/env bash
# The meta phase under the deepspeed launcher; same arguments as phase.sh after its PHASE.
exec "$(dirname "${BASH_SOURCE[0]}")/phase.sh" meta "$@"
