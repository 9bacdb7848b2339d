#!/usr/bin/env bash
# Builds the images in Cloud Build, migrates the database with a Cloud Run
# job, deploys the three services by image digest and creates or updates the
# Cloud Scheduler jobs that call the relay and sendemail triggers every
# minute. `make deploy` runs it; the README's "Deploy to Cloud Run" section
# sets up the project it deploys into. deploy_test.go runs it against a
# stand-in gcloud.
#
# Manifests are rendered by `outboxctl render`, which quotes every value
# (MAIL_FROM may hold &, |, #, quotes and colons); it is built from this tree
# unless OUTBOXCTL names a binary.
set -euo pipefail

: "${GCP_PROJECT:?set GCP_PROJECT (see README: Deploy to Cloud Run)}"
GCP_REGION=${GCP_REGION:-europe-west1}
SQL_INSTANCE=${SQL_INSTANCE:-outbox}
# max_connections of the Cloud SQL instance (the README creates it with 100).
SQL_MAX_CONNECTIONS=${SQL_MAX_CONNECTIONS:-100}
NETWORK=${NETWORK:-default}
SUBNET=${SUBNET:-default}
MAIL_FROM=${MAIL_FROM:-Outbox <welcome@example.com>}
# true when outbox-redis-url names Memorystore for Redis Cluster.
REDIS_CLUSTER=${REDIS_CLUSTER:-false}
# Streams per aggregate type (README, Partitioned streams); the same for
# relay and sendemail. Changing it on a live system: README, Changing
# STREAM_PARTITIONS.
STREAM_PARTITIONS=${STREAM_PARTITIONS:-1}

cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if [[ -n ${OUTBOXCTL:-} ]]; then
  outboxctl=("$OUTBOXCTL")
else
  go build -o "$out/outboxctl" ./deploy/outboxctl
  outboxctl=("$out/outboxctl")
fi
if [[ -z ${TAG:-} ]]; then
  # The tag only names the build; what runs is chosen by digest below, so a
  # redeploy of uncommitted changes still rolls out exactly what was built.
  TAG=$(git rev-parse --short HEAD)
  [[ -z $(git status --porcelain) ]] || TAG="$TAG-dirty-$(date -u +%Y%m%d%H%M%S)"
fi

# gc runs gcloud in the project. On failure it says which call failed and,
# for a permission error, which roles the README lists, then stops.
gc() {
  local status=0
  { gcloud --project "$GCP_PROJECT" "$@" 2>&1 1>&3 | tee "$out/stderr" >&2; } 3>&1 || status=$?
  ((status == 0)) && return 0
  echo "deploy: failed: gcloud $*" >&2
  if grep -q 'PERMISSION_DENIED\|does not have permission\|403' "$out/stderr"; then
    echo "deploy: permission denied. Grant the roles in README \"Deploy to Cloud Run\" (your account, and Cloud Build's service account for builds)." >&2
  fi
  exit 1
}

render() { # render FILE IMAGE
  "${outboxctl[@]}" render -set "PROJECT=$GCP_PROJECT" -set "REGION=$GCP_REGION" \
    -set "SQL_INSTANCE=$SQL_INSTANCE" -set "NETWORK=$NETWORK" -set "SUBNET=$SUBNET" \
    -set "REDIS_CLUSTER=$REDIS_CLUSTER" -set "STREAM_PARTITIONS=$STREAM_PARTITIONS" -set "IMAGE=$2" -text "MAIL_FROM=$MAIL_FROM" "$1"
}

echo "== connection budget"
"${outboxctl[@]}" budget -max-connections "$SQL_MAX_CONNECTIONS" deploy/cloudrun/*.yaml

# Render once with a dummy image before building: a bad value stops the
# deploy before anything is built or changed.
for manifest in deploy/cloudrun/*.yaml; do
  render "$manifest" "example/image@sha256:0" >/dev/null
done

echo "== build images ($TAG)"
gc builds submit --config deploy/cloudbuild.yaml --substitutions="_REGION=$GCP_REGION,_TAG=$TAG" .

repo="$GCP_REGION-docker.pkg.dev/$GCP_PROJECT/outbox"
# image FN prints FN's image by digest (files, not an associative array: the
# bash 3.2 of macOS has none).
image() { cat "$out/image.$1"; }
for fn in createuser relay sendemail; do
  digest=$(gc artifacts docker images describe "$repo/$fn:$TAG" --format 'value(image_summary.digest)')
  if [[ ! $digest =~ ^sha256:[0-9a-f]{64}$ ]]; then
    echo "deploy: no digest for $repo/$fn:$TAG (got '$digest')" >&2
    exit 1
  fi
  echo "$repo/$fn@$digest" >"$out/image.$fn"
  echo "   $fn: $(image "$fn")"
done

echo "== migrate"
render deploy/cloudrun/migrate.yaml "$(image relay)" >"$out/migrate.yaml"
gc run jobs replace "$out/migrate.yaml" --region "$GCP_REGION"
gc run jobs execute outbox-migrate --region "$GCP_REGION" --wait

for fn in createuser relay sendemail; do
  echo "== deploy $fn"
  render "deploy/cloudrun/$fn.yaml" "$(image "$fn")" >"$out/$fn.yaml"
  gc run services replace "$out/$fn.yaml" --region "$GCP_REGION"
done
gc run services add-iam-policy-binding createuser --region "$GCP_REGION" \
  --member=allUsers --role=roles/run.invoker >/dev/null

scheduler="outbox-scheduler@$GCP_PROJECT.iam.gserviceaccount.com"
for fn in relay sendemail; do
  echo "== schedule $fn"
  gc run services add-iam-policy-binding "$fn" --region "$GCP_REGION" \
    --member="serviceAccount:$scheduler" --role=roles/run.invoker >/dev/null
  url=$(gc run services describe "$fn" --region "$GCP_REGION" --format 'value(status.url)')
  args=(--location "$GCP_REGION" --schedule "* * * * *" --http-method POST --uri "$url/"
        --oidc-service-account-email "$scheduler" --oidc-token-audience "$url" --attempt-deadline 90s)
  # Update when the job exists, create it when it does not, and stop on any
  # other answer (a permission error must not turn into "already exists").
  status=0
  gcloud --project "$GCP_PROJECT" scheduler jobs describe "outbox-$fn" --location "$GCP_REGION" \
    --format 'value(name)' >/dev/null 2>"$out/describe" || status=$?
  if ((status == 0)); then
    gc scheduler jobs update http "outbox-$fn" "${args[@]}"
  elif grep -q 'NOT_FOUND' "$out/describe"; then
    gc scheduler jobs create http "outbox-$fn" "${args[@]}"
  else
    cat "$out/describe" >&2
    echo "deploy: cannot read Cloud Scheduler job outbox-$fn (see above); needs roles/cloudscheduler.admin" >&2
    exit 1
  fi
done

# Not inside the echo: gc's exit would only leave the command substitution.
url=$(gc run services describe createuser --region "$GCP_REGION" --format 'value(status.url)') || exit 1
echo "== done: createuser at $url"
