#!/usr/bin/env bash
# Submit a samtone job to a running Ray cluster (see cluster.yaml):
#   RAY_ADDRESS=http://<head>:8265 jobs/submit.sh tune jobs/tune_debian.yaml [--set key=value ...]
# MLFLOW_TRACKING_URI should point at a tracking server every node can reach.
set -euo pipefail
cmd=${1:?usage: jobs/submit.sh train|tune CONFIG [--set key=value ...]}
config=${2:?usage: jobs/submit.sh train|tune CONFIG [--set key=value ...]}
shift 2
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster's job server, e.g. http://127.0.0.1:8265 through ray dashboard port-forwarding}"
env_json="{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"${MLFLOW_TRACKING_URI:-}\", \"HF_HUB_OFFLINE\": \"1\"}}"
exec ray job submit --working-dir . --runtime-env-json "$env_json" -- samtone "$cmd" --config "$config" "$@"
