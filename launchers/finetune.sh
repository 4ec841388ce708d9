#!/usr/bin/env bash
# The finetune phase under the deepspeed launcher; same arguments as phase.sh after its PHASE.
exec "$(dirname "${BASH_SOURCE[0]}")/phase.sh" finetune "$@"
