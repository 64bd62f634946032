#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# One srun task per node (started by slurm/common.sh): torchrun with this node's rank; SIGUSR1 is
# handed to the training processes (SIGTERM from Slurm reaches torchrun, which forwards it itself).
#
#     bash slurm/task.sh TORCHRUN_ARGS... -- PROGRAM_ARGS...
#
# torchrun itself must not receive SIGUSR1 (its default action would kill it and orphan the workers),
# so it starts with the signal ignored; the workers reset that when the trainer installs its handler.
set -euo pipefail
OPCD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=common.sh
source "$OPCD_ROOT/slurm/common.sh"

launcher=()
while [[ $# -gt 0 && $1 != "--" ]]; do
    launcher+=("$1")
    shift
done
[[ $# -gt 0 ]] || opcd_die "usage: task.sh TORCHRUN_ARGS... -- PROGRAM_ARGS..."
shift

if [[ -n "${OPCD_VENV:-}" ]]; then
    # shellcheck source=/dev/null
    source "$OPCD_VENV/bin/activate"
fi

trap '' USR1
"${launcher[@]}" --node-rank "${SLURM_NODEID:?SLURM_NODEID is not set (run under srun)}" "$@" &
torchrun_pid=$!
# shellcheck disable=SC2329  # invoked by the trap below
_opcd_to_workers() {
    # The workers are torchrun's children; SIGTERM goes to torchrun, which forwards it itself.
    pkill "-$1" -P "$torchrun_pid" 2>/dev/null || true
}
trap '_opcd_to_workers USR1' USR1
rc=0
opcd_wait "$torchrun_pid" || rc=$?
exit "$rc"
