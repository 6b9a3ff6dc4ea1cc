#!/usr/bin/env bash
# infra/moto-server.sh [PORT]          (default 5555; Ctrl-C stops it)
#
# A local S3-compatible server for development and the integration tests: moto's server
# (pip install 'skytune[dev]' brings it). Point skytune at it with:
#   export AWS_ENDPOINT_URL=http://127.0.0.1:5555 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
#   aws --endpoint-url "$AWS_ENDPOINT_URL" s3 mb s3://skytune-dev   (or boto3 create_bucket)
#   skytune train jobs/recipes/demo.yaml --set output.store=s3://skytune-dev/runs
# State lives in memory and is gone when the server stops. `skytune launch` refuses a
# localhost endpoint for cloud runs: a rented VM cannot reach this machine.
set -euo pipefail
PORT="${1:-5555}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
MOTO="${HERE}/.venv/bin/moto_server"
[ -x "$MOTO" ] || MOTO="$(command -v moto_server || true)"
if [ -z "$MOTO" ]; then
  echo "moto_server not found: pip install 'moto[server]>=5' (or make install-dev)" >&2
  exit 2
fi
# 127.0.0.1 only: the server has no authentication (any key pair is accepted).
exec "$MOTO" -H 127.0.0.1 -p "$PORT"
