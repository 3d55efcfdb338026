#!/usr/bin/env bash
# Serve the TensorBoard events (per-site training loss and validation metric) of a job's
# latest fetched run: scripts/tensorboard.sh JOB [PORT]
source "$(dirname "$0")/common.sh"
job=${1:-} port=${2:-6006}
check_var PORT "$port" number
name=$(job_name "$job")   # as scripts/fetch_model.sh names models/<name>/
events=$MODELS_DIR/$name/tensorboard
[[ -d $events ]] || die "no TensorBoard events in $events: run 'make fetch-model JOB=$name' after a job finished"
echo "TensorBoard for $name on http://localhost:$port (Ctrl-C stops)"
exec tensorboard --logdir "$events" --port "$port"
