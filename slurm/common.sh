# shellcheck shell=bash
# Shared by every slurm/*.sbatch (and slurm/task.sh): the environment Megatron wants on H100 nodes, the
# torchrun rendezvous, the optional pyxis container, per-job log folders, and requeue on SIGUSR1.
#
# An sbatch script sets OPCD_ROOT (the repository, default: the folder sbatch was called from), sources
# this file and calls
#     opcd_run CONFIG.yaml [key=value ...] -- "$@"
# The overrides before `--` are the script's (paths under $OPCD_DATA/$OPCD_CKPT/$OPCD_RUNS); those after
# come from the sbatch command line and win (`sbatch slurm/X.sbatch schedule.steps=10`).
#
# Knobs (environment variables, all optional):
#   OPCD_DATA, OPCD_CKPT, OPCD_RUNS  data, converted checkpoints, run outputs (default: $OPCD_ROOT/{data,ckpt,runs})
#   OPCD_LOGS                        per-job log folders (default: $OPCD_ROOT/logs)
#   OPCD_RUN_NAME                    run folder name under $OPCD_RUNS (default: the job name): keep it to resume
#   OPCD_GPUS_PER_NODE               training processes per node (default: $SLURM_GPUS_ON_NODE, else 8)
#   OPCD_VENV                        a virtual environment to activate on every node
#   CONTAINER_IMAGE                  run inside this image with pyxis (e.g. nvcr.io#nvidia/nemo:25.09)
#   CONTAINER_MOUNTS                 extra pyxis mounts, comma-separated (the roots above are added)
#   MASTER_PORT                      rendezvous port (default 29500)
#   OPCD_DRY_RUN=1                   print the resolved commands and exit 0 without launching
#   OPCD_NO_REQUEUE=1                do not requeue the job after a SIGUSR1 checkpoint
#
# Preemption lead time: each script asks for `#SBATCH --signal=B:USR1@120` (SIGUSR1 to this batch
# shell 120 s before the time limit). Change it per job on the command line, which wins over the
# #SBATCH line: `sbatch --signal=B:USR1@300 slurm/X.sbatch`. The trainer stops at the next safe point
# inside the step (every 8 decode steps, or the next micro-batch), saves the last completed step and
# exits 0 (docs/reliability.md, "Preemption"): the lead time must cover one checkpoint save of the
# model and its optimizer plus the exit; SLURM SIGKILLs at the limit. Keep the `B:` (batch shell only).

# ------------------------------------------------------------------------------------------------
# Environment for megatron-core on H100 nodes. Cluster-specific NCCL settings (NCCL_SOCKET_IFNAME,
# NCCL_IB_HCA, ...) are left to the user's environment: they pass through unchanged.
opcd_export_env() {
    # TP/SP communication must be issued in kernel order: one hardware queue per device.
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    # A failed collective raises instead of hanging until the job's time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # The 8 workers of a node share its cores; torch would start one thread per core in each.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
    export PYTHONUNBUFFERED=1
    export PYTHONPATH="${OPCD_ROOT}${PYTHONPATH:+:$PYTHONPATH}"
}

opcd_defaults() {
    : "${OPCD_ROOT:?OPCD_ROOT must be set (the repository folder) before sourcing slurm/common.sh}"
    OPCD_DATA="${OPCD_DATA:-$OPCD_ROOT/data}"
    OPCD_CKPT="${OPCD_CKPT:-$OPCD_ROOT/ckpt}"
    OPCD_RUNS="${OPCD_RUNS:-$OPCD_ROOT/runs}"
    OPCD_LOGS="${OPCD_LOGS:-$OPCD_ROOT/logs}"
    OPCD_RUN_NAME="${OPCD_RUN_NAME:-${SLURM_JOB_NAME:-opcd}}"
    MASTER_PORT="${MASTER_PORT:-29500}"
    export OPCD_DATA OPCD_CKPT OPCD_RUNS OPCD_LOGS OPCD_RUN_NAME MASTER_PORT
}

opcd_die() {
    echo "[opcd] error: $*" >&2
    exit 2
}

# Wait for PID while forwarding SIGUSR1 and SIGTERM to FORWARD_CMD (a function name); returns PID's
# exit status. `wait` returns early when a trapped signal arrives, so it is called until PID is gone.
opcd_wait() {
    local pid=$1 rc=0
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid" && rc=0 || rc=$?
    done
    # The last wait may have been cut short by a signal just as PID ended: ask once more.
    wait "$pid" && rc=0 || rc=$?
    return "$rc"
}

# ------------------------------------------------------------------------------------------------
# The batch shell: resolve the rendezvous, build srun + torchrun, launch (or print), requeue.
opcd_run() {
    [[ $# -ge 1 ]] || opcd_die "opcd_run CONFIG [key=value ...] -- [key=value ...]"
    local config=$1
    shift
    local -a overrides=()
    while [[ $# -gt 0 && $1 != "--" ]]; do
        overrides+=("$1")
        shift
    done
    [[ $# -gt 0 ]] && shift # the "--"
    overrides+=("$@")       # the sbatch command line comes last: it wins

    opcd_defaults
    : "${SLURM_JOB_ID:?not inside a SLURM job (submit with sbatch, or set fake SLURM_* with OPCD_DRY_RUN=1)}"
    : "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}"
    local nnodes="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:?SLURM_NNODES is not set}}"
    local gpus="${OPCD_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
    [[ -f "$OPCD_ROOT/$config" ]] || opcd_die "config $OPCD_ROOT/$config does not exist (is OPCD_ROOT the repository?)"

    # All hostnames, then the first (`| head -n1` would SIGPIPE scontrol, fatal under pipefail).
    local -a hosts
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    [[ ${#hosts[@]} -gt 0 && -n "${hosts[0]}" ]] || opcd_die "scontrol found no host in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    export MASTER_ADDR="${hosts[0]}"
    opcd_export_env

    local log_dir="$OPCD_LOGS/${SLURM_JOB_NAME:-opcd}-$SLURM_JOB_ID"
    # opcd-torchrun is torchrun (same arguments) that exits 0, not 1, when a SIGTERM made every
    # worker checkpoint and stop (megatron_opcd/torchrun.py); it comes with `pip install`.
    local -a launcher=(
        opcd-torchrun --nnodes "$nnodes" --nproc-per-node "$gpus"
        --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID"
        --max-restarts 0 --log-dir "$log_dir/torchrun" --tee 3
    )
    local -a program=(
        -m megatron_opcd.train --config "$OPCD_ROOT/$config"
        "checkpoint.save=$OPCD_RUNS/$OPCD_RUN_NAME" "${overrides[@]}"
    )
    local -a srun_cmd=(
        srun --nodes "$nnodes" --ntasks-per-node 1 --kill-on-bad-exit=1
        --cpus-per-task "${SLURM_CPUS_ON_NODE:-1}"
    )
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        local mounts="$OPCD_ROOT,$OPCD_DATA,$OPCD_CKPT,$OPCD_RUNS,$OPCD_LOGS${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
        srun_cmd+=(--container-image "$CONTAINER_IMAGE" --container-mounts "$mounts" --container-workdir "$OPCD_ROOT")
    fi
    srun_cmd+=(bash "$OPCD_ROOT/slurm/task.sh" "${launcher[@]}" -- "${program[@]}")

    echo "[opcd] job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-opcd}), restart ${SLURM_RESTART_COUNT:-0}: ${nnodes} node(s) x ${gpus} GPU(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
    echo "[opcd] config ${config}; runs in ${OPCD_RUNS}/${OPCD_RUN_NAME}; logs in ${log_dir}"
    echo "[opcd] env: CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS} TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING} NCCL_DEBUG=${NCCL_DEBUG} OMP_NUM_THREADS=${OMP_NUM_THREADS}"
    echo "[opcd] srun: ${srun_cmd[*]}"
    local node
    for ((node = 0; node < nnodes; node++)); do
        echo "[opcd] node ${node}: ${launcher[*]} --node-rank ${node} ${program[*]}"
    done
    if [[ "${OPCD_DRY_RUN:-0}" == 1 ]]; then
        echo "[opcd] OPCD_DRY_RUN=1: nothing launched"
        return 0
    fi

    mkdir -p "$log_dir" "$OPCD_RUNS"
    printf '%q ' "${srun_cmd[@]}" >"$log_dir/command.sh"
    env | sort >"$log_dir/env.txt"

    # #SBATCH --signal=B:USR1@120 signals this shell only: remember to requeue, and pass the signal
    # on to the tasks (srun forwards it; task.sh hands it to the training processes, which write a
    # checkpoint after the current step and exit 0).
    OPCD_SIGNALLED=0
    local srun_pid
    # shellcheck disable=SC2329  # invoked by the trap below
    _opcd_forward_usr1() {
        OPCD_SIGNALLED=1
        echo "[opcd] SIGUSR1: asking the trainer to checkpoint and stop"
        kill -USR1 "$srun_pid" 2>/dev/null || true
    }
    trap _opcd_forward_usr1 USR1
    "${srun_cmd[@]}" &
    srun_pid=$!
    local rc=0
    opcd_wait "$srun_pid" || rc=$?
    trap - USR1
    if [[ "$OPCD_SIGNALLED" == 1 && "$rc" == 0 && "${OPCD_NO_REQUEUE:-0}" != 1 ]]; then
        echo "[opcd] checkpointed before the time limit: requeueing job ${SLURM_JOB_ID} (it resumes from ${OPCD_RUNS}/${OPCD_RUN_NAME})"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
