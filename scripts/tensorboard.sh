#!/usr/bin/env bash
# Serve the TensorBoard events (per-site training loss and validation metric) of a job's
# latest fetched run: scripts/tensorboard.sh JOB [PORT]
# It listens on 127.0.0.1 only (TensorBoard has no authentication); TENSORBOARD_BIND=<address> changes that
# (0.0.0.0: every interface). From another machine: ssh -L 6006:127.0.0.1:6006 <this host>.
source "$(dirname "$0")/common.sh"
job=${1:-} port=${2:-6006}
check_var PORT "$port" number
bind=${TENSORBOARD_BIND:-127.0.0.1}
[[ $bind =~ ^[0-9A-Fa-f.:]+$ || $bind == localhost ]] || die "TENSORBOARD_BIND='$(shown "$bind")' is not an IP address (default 127.0.0.1)"
name=$(job_name "$job")   # as scripts/fetch_model.sh names models/<name>/
events=$MODELS_DIR/$name/tensorboard
[[ -d $events ]] || die "no TensorBoard events in $events: run 'make fetch-model JOB=$name' after a job finished"
echo "TensorBoard for $name on http://$bind:$port (Ctrl-C stops)"
exec tensorboard --logdir "$events" --host "$bind" --port "$port"
