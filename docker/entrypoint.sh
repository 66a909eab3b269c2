#!/usr/bin/env bash
# The image's entrypoint: the first word picks the job; training jobs go through
# `accelerate launch`, the rest through the further-pt command.
#   pretrain|finetune ARGS...  -> accelerate launch [launcher flags] .../further_pt/JOB.py ARGS...
#   pretrain|finetune -m ARGS... (a sweep) or --help -> further-pt JOB ...: the sweep launches
#                              each of its runs itself
#   experiment|prepare|predict|recipes|config|plot-schedule|plot-run|select|doctor ARGS...
#                           -> further-pt JOB ARGS...
#   help|-h|--help          -> the list of jobs, exit 0
#
# Before any work, pretrain, finetune and experiment check that their output_dir (the last
# `output_dir=` argument; without one, the recipe's relative runs/NAME under the working
# directory, /runs in the image) can be written by this user: a one-line message and exit 2
# otherwise.
#
# Launcher flags: $ACCELERATE_ARGS (split into words), then whatever of these it does not set:
#   --num_processes N       N = GPUS x NUM_NODES; GPUS is the GPUs per node, and when it is
#                           unset or empty, the GPUs `nvidia-smi -L` lists (or the entries of
#                           CUDA_VISIBLE_DEVICES). Nothing is added when neither is known
#                           (no nvidia-smi): accelerate then counts the GPUs itself.
#   --multi_gpu             when N > 1, unless ACCELERATE_ARGS picks the distributed type itself
#                           (--config_file, --use_fsdp, --use_deepspeed, --cpu).
#   --num_machines, --machine_rank, --main_process_ip, --main_process_port
#                           when NUM_NODES > 1, from NUM_NODES, NODE_RANK, MASTER_ADDR and
#                           MASTER_PORT (default 29500); NODE_RANK and MASTER_ADDR are required.
# ACCELERATE_ARGS examples: "--mixed_precision bf16",
#   "--config_file /opt/further_pt/docker/accelerate-fsdp.yaml", "--cpu".
# Empty NCCL_*/GLOO_* variables are removed (compose passes an unset host variable as "").
set -euo pipefail
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

me="further-pt-entrypoint"

fail() {  # one line on stderr, exit 2
  echo "$me: $*" >&2
  exit 2
}

is_count() {  # a whole number >= 1
  [[ "$1" =~ ^[1-9][0-9]*$ ]]
}

# ------------------------------------------------------------------ output dir
can_write() {  # create and remove a probe file: works as root too (read-only mounts, /proc)
  local probe
  probe="$(mktemp "$1/.further-pt-write-probe.XXXXXX" 2>/dev/null)" || return 1
  rm -f -- "$probe"
}

nearest_existing() {
  local path="$1"
  while [ ! -e "$path" ]; do path="$(dirname -- "$path")"; done
  printf '%s\n' "$path"
}

check_output_dir() {  # $1: the output dir, absolute
  local out="$1" who folder fix
  who="uid $(id -u) (gid $(id -g))"
  fix="fix: on the host, sudo chown -R $(id -u):$(id -g) the folder mounted there (e.g. ./runs), or run the container as that folder's owner: docker run --user \"\$(id -u):\$(id -g)\" ..."
  folder="$(nearest_existing "$out")"
  if [ ! -d "$folder" ]; then
    fail "output_dir $out: $folder is a file, not a folder"
  fi
  if ! can_write "$folder"; then
    fail "output_dir $out: $folder is not writable by $who; $fix"
  fi
  # The run's lock file goes beside the output dir, or inside it where the parent is not
  # writable (output_dir=/runs): the output dir itself is all that must be writable.
}

output_dir_of() {  # the last output_dir= argument, made absolute; $PWD without one
  local arg dir=""
  for arg in "$@"; do
    case "$arg" in
      output_dir=*|+output_dir=*|++output_dir=*) dir="${arg#*output_dir=}" ;;
    esac
  done
  dir="${dir%\"}"; dir="${dir#\"}"; dir="${dir%\'}"; dir="${dir#\'}"
  case "$dir" in
    "") dir="$PWD" ;;
    "~"|"~/"*) dir="${HOME:-/}${dir#\~}" ;;
    /*) ;;
    *) dir="$PWD/$dir" ;;
  esac
  printf '%s\n' "$dir"
}

# ------------------------------------------------------------------ launcher flags
has_flag() {  # has_flag FLAG WORDS...: FLAG or FLAG=... among WORDS
  local flag="$1" word
  shift
  for word in "$@"; do
    if [ "$word" = "$flag" ] || [[ "$word" == "$flag="* ]]; then return 0; fi
  done
  return 1
}

count_gpus() {  # GPUs this container may use; empty when unknown
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    local IFS=,
    # shellcheck disable=SC2086
    set -- $CUDA_VISIBLE_DEVICES
    echo "$#"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    local listing
    if listing="$(nvidia-smi -L 2>/dev/null)"; then
      grep -c '^GPU ' <<<"$listing" || true
    fi
  fi
}

launch_args=()
launch_note=""
compose_launch_args() {  # fills launch_args from ACCELERATE_ARGS, GPUS and the NUM_NODES variables
  local user=() per_node source nodes total
  # ACCELERATE_ARGS is split into words on purpose.
  # shellcheck disable=SC2206
  user=(${ACCELERATE_ARGS:-})
  launch_args=("${user[@]}")

  nodes="${NUM_NODES:-1}"
  is_count "$nodes" || fail "NUM_NODES must be a whole number >= 1 (got '$nodes')"

  if has_flag --cpu "${user[@]}"; then
    per_node=""
  elif [ -n "${GPUS:-}" ]; then
    is_count "$GPUS" || fail "GPUS must be a whole number >= 1: the GPUs each node uses (got '$GPUS'); leave it unset to use every GPU the container sees"
    per_node="$GPUS"; source="GPUS"
  else
    per_node="$(count_gpus)"; source="nvidia-smi -L"
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then source="CUDA_VISIBLE_DEVICES"; fi
    if [ "$per_node" = "0" ]; then per_node=""; fi
  fi

  if [ -n "$per_node" ] && ! has_flag --num_processes "${user[@]}"; then
    total=$((per_node * nodes))
    if [ "$total" -gt 1 ] && ! has_flag --multi_gpu "${user[@]}" \
        && ! has_flag --config_file "${user[@]}" && ! has_flag --use_fsdp "${user[@]}" \
        && ! has_flag --use_deepspeed "${user[@]}"; then
      launch_args+=(--multi_gpu)
    fi
    launch_args+=(--num_processes "$total")
    launch_note="$per_node GPU(s) per node from $source"
  fi

  if [ "$nodes" -gt 1 ]; then
    [ -n "$per_node" ] || has_flag --num_processes "${user[@]}" \
      || fail "NUM_NODES=$nodes but no GPU was found on this node (nvidia-smi -L): set GPUS to the GPUs per node"
    local rank="${NODE_RANK:-}" addr="${MASTER_ADDR:-}" port="${MASTER_PORT:-29500}"
    [[ "$rank" =~ ^[0-9]+$ ]] && [ "$rank" -lt "$nodes" ] \
      || fail "NUM_NODES=$nodes needs NODE_RANK, this node's rank: 0 on the node at MASTER_ADDR, then 1..$((nodes - 1)) (got '$rank')"
    [ -n "$addr" ] || fail "NUM_NODES=$nodes needs MASTER_ADDR, the address of the node with NODE_RANK=0"
    is_count "$port" || fail "MASTER_PORT must be a port number (got '$port')"
    has_flag --num_machines "${user[@]}" || launch_args+=(--num_machines "$nodes")
    has_flag --machine_rank "${user[@]}" || launch_args+=(--machine_rank "$rank")
    has_flag --main_process_ip "${user[@]}" || launch_args+=(--main_process_ip "$addr")
    has_flag --main_process_port "${user[@]}" || launch_args+=(--main_process_port "$port")
    launch_note="${launch_note:+$launch_note, }node $rank of $nodes, rank 0 at $addr:$port"
  fi
}

drop_empty_nccl_vars() {
  local name
  for name in $(compgen -e); do
    case "$name" in
      NCCL_*|GLOO_*|TORCH_NCCL_*) if [ -z "${!name}" ]; then unset "$name"; fi ;;
    esac
  done
}

# ------------------------------------------------------------------ dispatch
job="${1:-}"
if [ $# -gt 0 ]; then shift; fi
wants_cli() {  # a sweep (-m / --multirun) or a help request: the further-pt command's own job
  local arg
  for arg in "$@"; do
    case "$arg" in -m|--multirun|-h|--help) return 0 ;; esac
  done
  return 1
}

jobs_usage="JOB [key=value ...] with JOB one of pretrain, finetune, experiment, prepare, predict, recipes, config, plot-schedule, plot-run, select, doctor; JOB --help says what each takes"

case "$job" in
  pretrain|finetune)
    if wants_cli "$@"; then  # a sweep writes into output_dir too: checked the same way
      for arg in "$@"; do
        case "$arg" in -m|--multirun) check_output_dir "$(output_dir_of "$@")" ;; esac
      done
      exec further-pt "$job" "$@"
    fi
    check_output_dir "$(output_dir_of "$@")"
    compose_launch_args
    drop_empty_nccl_vars
    package_dir="$(python3 -c 'import os, further_pt; print(os.path.dirname(further_pt.__file__))')"
    echo "$me: accelerate launch ${launch_args[*]:-(no launcher flags)}${launch_note:+ ($launch_note)}" >&2
    exec accelerate launch "${launch_args[@]}" "$package_dir/$job.py" "$@"
    ;;
  experiment)
    check_output_dir "$(output_dir_of "$@")"
    exec further-pt "$job" "$@"
    ;;
  prepare|predict|recipes|config|plot-schedule|plot-run|select|doctor)
    exec further-pt "$job" "$@"
    ;;
  help|-h|--help)
    echo "usage: $jobs_usage"
    exit 0
    ;;
  *)
    echo "usage: $jobs_usage (got '${job}')" >&2
    exit 2
    ;;
esac
