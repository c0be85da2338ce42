#!/usr/bin/env bash
# Give every secret docker-compose.yml requires a random value in .env beside it (or in FILE), which docker
# compose reads for its ${...}. Values already in the file are kept, so it is safe to run again and a value
# set by hand wins. The file is made readable by its owner only.
#   scripts/deploy-env.sh [FILE]
set -euo pipefail
file="${1:-$(dirname "$0")/../.env}"
# The ${NAME:?...} variables of docker-compose.yml (tests/test_deploy.py checks this list against it).
secrets=(POSTGRES_PASSWORD MINIO_ROOT_PASSWORD MINIO_MLFLOW_PASSWORD MLFLOW_ADMIN_PASSWORD MLFLOW_TRAINER_PASSWORD
         MLFLOW_SERVING_PASSWORD MLFLOW_FLASK_SECRET_KEY FINETUNE_API_KEY)

umask 077
touch "$file"
chmod 600 "$file"
added=()
for name in "${secrets[@]}"; do
  grep -q "^${name}=." "$file" && continue
  # 32 letters and digits: long enough for MLflow (12) and MinIO (8), and safe in URIs and shells.
  value=$(head -c 600 /dev/urandom | LC_ALL=C tr -dc 'A-Za-z0-9' | head -c 32)
  [ "${#value}" -eq 32 ] || { echo "could not draw a random value for $name" >&2; exit 1; }
  printf '%s=%s\n' "$name" "$value" >>"$file"
  added+=("$name")
done
if [ "${#added[@]}" -gt 0 ]; then
  echo "$file: added ${added[*]}"
else
  echo "$file: every secret already set"
fi
