# Sourced by slurm/<stage>.sbatch: runs one latentpipe stage as one SLURM job.
#
#   sbatch [sbatch options] slurm/<stage>.sbatch [CONFIG.yaml] [key=value ...]
#
# One node, one process: the stage runs directly in the batch script. More (--nodes=N and/or
# LATENTPIPE_PROCS_PER_NODE / --gpus-per-node): one `torchrun` per node via srun, c10d
# rendezvous on the first node of the allocation at a port derived from the job id; NCCL on
# GPUs, gloo on CPU (the runtime picks). Preemption: USR1/TERM are forwarded to the stage,
# which checkpoints and exits 75 (pipeline.errors.REQUEUE_EXIT_CODE); after USR1 (the
# --signal=B:USR1@N warning) or the stage's own time budget the job is requeued
# (`scontrol requeue`) and the rerun resumes. After TERM (scancel, time limit, SLURM's own
# preemption) it is not: that would undo a scancel. A real failure is never requeued.
#
# Env: LATENTPIPE_PYTHON (the python with latentpipe installed; default: the active venv, the
#      python next to `latentpipe` on PATH, else python3), LATENTPIPE_PROCS_PER_NODE (default:
#      GPUs on the node, else 1), LATENTPIPE_REQUEUE_START_NOW=1 (start a requeued job at once
#      instead of after SLURM's ~120 s requeue hold; used by the local test cluster).

lp_log() { echo "[latentpipe-slurm $(date +%H:%M:%S) job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ task $SLURM_ARRAY_TASK_ID} node ${SLURMD_NODENAME:-$(hostname)}] $*"; }

lp_python() {
  if [ -n "${LATENTPIPE_PYTHON:-}" ]; then echo "$LATENTPIPE_PYTHON"
  elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then echo "$VIRTUAL_ENV/bin/python"
  elif command -v latentpipe >/dev/null && [ -x "$(dirname "$(command -v latentpipe)")/python" ]; then
    echo "$(dirname "$(command -v latentpipe)")/python"
  else command -v python3; fi
}

# latentpipe_stage STAGE [CONFIG.yaml] [key=value ...]
latentpipe_stage() {
  local stage=$1; shift
  LP_STAGE=$stage
  local args=()
  if [ $# -gt 0 ] && [[ "$1" != *=* ]] && [[ "$1" != -* ]]; then args=(--config "$1"); shift; fi
  args+=("$@")
  PY=$(lp_python)
  # whether the stage checkpoints on USR1 (then it is requeued) comes from pipeline/stage_registry.py
  LP_CHECKPOINTS=$("$PY" -m pipeline.stage_registry checkpoints "$stage" 2>/dev/null || echo unknown)
  lp_log "stage $stage: restart count ${SLURM_RESTART_COUNT:-0}, nodes ${SLURM_JOB_NODELIST:-local}, python $PY, checkpoints $LP_CHECKPOINTS, args ${args[*]}"

  # stray variables from a login shell or an outer launcher break the rendezvous
  unset NODE_RANK RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK MASTER_ADDR MASTER_PORT \
        TORCHELASTIC_RUN_ID TORCHELASTIC_RESTART_COUNT TORCHELASTIC_MAX_RESTARTS

  local nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  local gpus=${SLURM_GPUS_ON_NODE:-0}
  local procs=${LATENTPIPE_PROCS_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
  local world=$(( nnodes * procs ))

  LP_SIGNAL=""; LP_CHILD=""
  trap 'lp_forward USR1' USR1
  trap 'lp_forward TERM' TERM
  if [ "$world" -le 1 ]; then
    "$PY" -m pipeline.cli "$stage" "${args[@]}" &
  else
    local host port
    host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    port=$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))
    lp_log "launch: $nnodes node(s) x $procs process(es) = world $world, rendezvous $host:$port (c10d)"
    # one torchrun per node (c10d assigns the ranks; SLURM_NODEID only names the node in the log).
    # torchrun ignores USR1 (the workers install their own handler) and passes TERM on; srun
    # forwards the batch script's signal to every process of the step
    srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=0 \
      bash -c 'trap "" USR1; trap : TERM
        echo "[latentpipe-slurm] node $SLURMD_NODENAME (node rank $SLURM_NODEID of $1): torchrun, $2 process(es), rendezvous $3"
        "$0" -m torch.distributed.run --nnodes "$1" --nproc_per_node "$2" --rdzv_backend c10d --rdzv_endpoint "$3" \
          --rdzv_id "$4" --max_restarts 0 -m pipeline.cli "${@:5}"; rc=$?
        echo "[latentpipe-slurm] node $SLURMD_NODENAME: torchrun exited with code $rc"; exit $rc' "$PY" "$nnodes" "$procs" "$host:$port" "latentpipe-${SLURM_JOB_ID:-0}" \
        "$stage" "${args[@]}" &
  fi
  LP_CHILD=$!
  local rc=0
  wait "$LP_CHILD" || rc=$?
  while kill -0 "$LP_CHILD" 2>/dev/null; do rc=0; wait "$LP_CHILD" || rc=$?; done   # a trapped signal ends `wait` early
  trap - USR1 TERM

  if [ "$rc" -ne 0 ] && [ "$rc" -ne 75 ] && [ "$world" -gt 1 ]; then
    # torchrun exits 1 whatever its workers' codes were: ask the manifest whether the stage stopped cleanly
    local status
    status=$("$PY" -m pipeline.slurm manifest-status "$stage" "${args[@]}" 2>/dev/null || true)
    lp_log "launcher exit code $rc, manifest status '$status'"
    [ "$status" = interrupted ] && rc=75
  fi
  if [ "$rc" -eq 75 ]; then
    if [ "$LP_SIGNAL" = TERM ]; then
      # scancel, the time limit or SLURM's own preemption (which requeues by itself): requeueing
      # here would undo a user's scancel. The checkpoint is kept; rerunning the job resumes.
      lp_log "stage $stage stopped cleanly on SIGTERM; not requeued (cancelled, timed out or preempted by SLURM)"
    elif [ -n "${SLURM_JOB_ID:-}" ]; then
      lp_log "stage $stage stopped cleanly (${LP_SIGNAL:+SIG}${LP_SIGNAL:-time budget}); requeueing job $SLURM_JOB_ID"
      lp_requeue
    fi
    return 75
  fi
  lp_log "stage $stage exited with code $rc"
  return "$rc"
}

lp_forward() {
  if [ "$1" = USR1 ] && [ "$LP_CHECKPOINTS" != yes ]; then
    lp_log "received SIGUSR1: stage $LP_STAGE does not checkpoint, ignored"; return 0
  fi
  LP_SIGNAL=$1
  lp_log "received SIG$1, forwarding it to the stage (pid ${LP_CHILD:-none})"
  [ -n "$LP_CHILD" ] && kill -s "$1" "$LP_CHILD" 2>/dev/null
  return 0
}

lp_requeue() {
  local id=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
  id=${id:-$SLURM_JOB_ID}
  if [ "${LATENTPIPE_REQUEUE_START_NOW:-0}" = 1 ]; then
    # requeue puts the job on hold for ~120 s (BeginTime); lift it once it is pending again, but
    # start it a few seconds later: slurmd refuses a job credential created in the same second
    # as the old run's revocation ("Job credential revoked"). Detached: requeue ends this script.
    nohup setsid bash -c 'for _ in $(seq 100); do
        [ "$(squeue -h -j "$0" -o %T 2>/dev/null)" = PENDING ] && scontrol update JobId="$0" StartTime=now+3 && exit 0
        sleep 0.2; done' "$id" >/dev/null 2>&1 &
  fi
  scontrol requeue "$id" || lp_log "scontrol requeue $id failed"
}
