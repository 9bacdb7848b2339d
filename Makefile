# The two commands a new user needs are `make run` and `make test`;
# `make help` lists the rest.

SHELL := /usr/bin/env bash
.DEFAULT_GOAL := help

GO          ?= go
BIN         := $(CURDIR)/bin
STATICCHECK := $(BIN)/staticcheck
# Pinned so that a new release cannot fail a build that passed yesterday.
STATICCHECK_VERSION := v0.8.2
GOVULNCHECK := $(BIN)/govulncheck
# Pinned like staticcheck. Not part of make test: it needs vuln.go.dev, which
# the development machines and CI cannot reach.
GOVULNCHECK_VERSION := v1.9.0
# Tests that assert on latency; make test runs them after, not beside, the rest.
LATENCY_TESTS := TestNoLostWakeups


.PHONY: help
help: ## List the targets.
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

.PHONY: services
services: ## Make sure PostgreSQL and Redis answer (starts local ones that are installed but down).
	@$(GO) run ./local/services

.PHONY: migrate
migrate: services ## Apply pending migrations to DATABASE_URL.
	@$(GO) run ./deploy/outboxctl migrate

.PHONY: run
run: migrate ## Run the whole pipeline locally on :8080 (PORT to change).
	$(GO) run ./local/serve

.PHONY: test
test: services vet lint ## Vet, lint and run every test (race detector on) against real PostgreSQL and Redis.
	$(GO) test -race -count=1 -timeout 15m -skip '^$(LATENCY_TESTS)$$' ./...
	@# Tests that bound latency run alone: other packages' tests would share their two cores.
	$(GO) test -race -count=1 -timeout 5m -run '^$(LATENCY_TESTS)$$' -v ./functions/relay

.PHONY: bench
bench: services ## Measure the pipeline against same-run baselines (about 4 minutes); writes bench-results.json.
	$(GO) build -o $(BIN)/bench ./local/bench
	$(BIN)/bench -out bench-results.json

.PHONY: chaos
chaos: ## Break the pipeline on purpose (kill -9, SIGTERM, PostgreSQL crash, Redis loss, SMTP faults, stalls) and check every user gets one email (about 8 minutes; private PostgreSQL 15 and redis-server). CHAOS_FLAGS='-scenarios redis -seed 42' to choose.
	$(GO) run ./local/chaos -out chaos-results.json $(CHAOS_FLAGS)

.PHONY: vet
vet: ## go vet.
	$(GO) vet ./...

.PHONY: lint
lint: $(STATICCHECK) ## staticcheck at a pinned version.
	$(STATICCHECK) ./...

$(STATICCHECK):
	GOBIN=$(BIN) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

.PHONY: vulncheck
vulncheck: $(GOVULNCHECK) ## Known vulnerabilities in the code's call graph (govulncheck, pinned; needs vuln.go.dev).
	$(GOVULNCHECK) ./...

$(GOVULNCHECK):
	GOBIN=$(BIN) $(GO) install golang.org/x/vuln/cmd/govulncheck@$(GOVULNCHECK_VERSION)

.PHONY: build
build: ## Build static binaries of every function and tool into bin/.
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags='-s -w' -o $(BIN)/ ./functions/... ./deploy/outboxctl ./local/...

.PHONY: deploy
deploy: ## Build in Cloud Build and deploy to Cloud Run: GCP_PROJECT=... [GCP_REGION= SQL_INSTANCE= NETWORK= SUBNET= MAIL_FROM= REDIS_CLUSTER= STREAM_PARTITIONS=].
	deploy/deploy.sh

.PHONY: docs
docs: ## Regenerate the configuration tables in README.md from the config structs.
	$(GO) run ./deploy/outboxctl envdoc README.md

.PHONY: clean
clean: ## Remove build output and local mail.
	rm -rf $(BIN) local/mailbox
