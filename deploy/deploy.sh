#!/usr/bin/env bash
# Builds the images in Cloud Build, migrates the database with a Cloud Run
# job, deploys the three services and (re)creates the Cloud Scheduler jobs
# that call the relay and sendemail triggers every minute. `make deploy` runs
# it; the README's "Deploy" section sets up the project it deploys into.
set -euo pipefail

: "${GCP_PROJECT:?set GCP_PROJECT (see README: Deploy)}"
GCP_REGION=${GCP_REGION:-europe-west1}
SQL_INSTANCE=${SQL_INSTANCE:-outbox}
NETWORK=${NETWORK:-default}
SUBNET=${SUBNET:-default}
MAIL_FROM=${MAIL_FROM:-Outbox <welcome@example.com>}
TAG=${TAG:-$(git rev-parse --short HEAD)}

cd "$(dirname "$0")/.."
gc() { gcloud --project "$GCP_PROJECT" "$@"; }

render() {
  sed -e "s|\${PROJECT}|$GCP_PROJECT|g" -e "s|\${REGION}|$GCP_REGION|g" \
      -e "s|\${SQL_INSTANCE}|$SQL_INSTANCE|g" -e "s|\${NETWORK}|$NETWORK|g" \
      -e "s|\${SUBNET}|$SUBNET|g" -e "s|\${MAIL_FROM}|$MAIL_FROM|g" -e "s|\${TAG}|$TAG|g" "$1"
}

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== build images ($TAG)"
gc builds submit --config deploy/cloudbuild.yaml --substitutions="_REGION=$GCP_REGION,_TAG=$TAG" .

echo "== migrate"
render deploy/cloudrun/migrate.yaml > "$out/migrate.yaml"
gc run jobs replace "$out/migrate.yaml" --region "$GCP_REGION"
gc run jobs execute outbox-migrate --region "$GCP_REGION" --wait

for service in createuser relay sendemail; do
  echo "== deploy $service"
  render "deploy/cloudrun/$service.yaml" > "$out/$service.yaml"
  gc run services replace "$out/$service.yaml" --region "$GCP_REGION"
done
gc run services add-iam-policy-binding createuser --region "$GCP_REGION" \
  --member=allUsers --role=roles/run.invoker >/dev/null

scheduler="outbox-scheduler@$GCP_PROJECT.iam.gserviceaccount.com"
for service in relay sendemail; do
  echo "== schedule $service"
  gc run services add-iam-policy-binding "$service" --region "$GCP_REGION" \
    --member="serviceAccount:$scheduler" --role=roles/run.invoker >/dev/null
  url=$(gc run services describe "$service" --region "$GCP_REGION" --format 'value(status.url)')
  args=(--location "$GCP_REGION" --schedule "* * * * *" --http-method POST --uri "$url/"
        --oidc-service-account-email "$scheduler" --oidc-token-audience "$url" --attempt-deadline 90s)
  gc scheduler jobs update http "outbox-$service" "${args[@]}" 2>/dev/null ||
    gc scheduler jobs create http "outbox-$service" "${args[@]}"
done

echo "== done: createuser at $(gc run services describe createuser --region "$GCP_REGION" --format 'value(status.url)')"
