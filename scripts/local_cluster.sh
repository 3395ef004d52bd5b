#!/usr/bin/env bash
# A real multi-node Ray cluster on this machine, one network namespace per node (run as root):
#   scripts/local_cluster.sh up [--workers 2] [--net 0] [--env KEY=VALUE ...] [--redis]
#   scripts/local_cluster.sh status      # the nodes, and the exports a client needs
#   scripts/local_cluster.sh down        # removes exactly what `up` created (idempotent)
# The head (0 CPUs) is at 10.231.<net>.1, workers at .2, .3, ...; its job server at
# http://10.231.<net>.1:8265, with Ray token auth on (the token is in .samtone/local-cluster/auth_token,
# mode 0600). The implementation is samtone_ray/cluster/local.py, shared with the test fixture.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${SAMTONE_PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
cd "$repo"
exec "$python" -m samtone_ray.cluster.local "$@"
