#!/usr/bin/env bash
# The image's entrypoint: the first word picks the job; training jobs go through
# `accelerate launch` (one process per GPU when ACCELERATE_ARGS says so), the rest
# through the further-pt command.
#   pretrain|finetune ARGS...   -> accelerate launch $ACCELERATE_ARGS .../further_pt/JOB.py ARGS...
#   experiment|predict|recipes|config|plot-schedule|plot-run ARGS... -> further-pt JOB ARGS...
# ACCELERATE_ARGS example: "--multi_gpu --num_processes 8 --mixed_precision bf16"
set -euo pipefail
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

job="${1:-}"
if [ $# -gt 0 ]; then shift; fi
case "$job" in
  pretrain|finetune)
    package_dir="$(python -c 'import os, further_pt; print(os.path.dirname(further_pt.__file__))')"
    # ACCELERATE_ARGS is split into words on purpose.
    # shellcheck disable=SC2086
    exec accelerate launch ${ACCELERATE_ARGS:-} "$package_dir/$job.py" "$@"
    ;;
  experiment|predict|recipes|config|plot-schedule|plot-run)
    exec further-pt "$job" "$@"
    ;;
  *)
    echo "usage: JOB [key=value ...] with JOB one of pretrain, finetune, experiment, predict," \
         "recipes, config, plot-schedule, plot-run (got '${job}')" >&2
    exit 2
    ;;
esac
