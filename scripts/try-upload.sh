#!/usr/bin/env bash
# Try the upload plugin with no cloud account: a local S3 stand-in (moto's S3 server on loopback), pre-signed PUT
# URLs to paste into a request, and the settings that trust it (UPLOAD_ALLOWED_HOSTS=127.0.0.1:9000). Ctrl-C stops it.
# Arguments go to bench/loopback_s3.py: --urls N, --port PORT (the image-server's, 8001 by default), --s3-port PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || scripts/setup.sh
if ! .venv/bin/python -c 'import boto3, moto.server' 2>/dev/null; then
  echo "try-upload: installing moto's S3 server into .venv (the s3 extra; once)"
  .venv/bin/python -m pip install --quiet -e '.[s3]'
fi
exec .venv/bin/python bench/loopback_s3.py "$@"
