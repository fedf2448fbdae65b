# The two commands of the README: `make dev` and `make test`.
GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)

.PHONY: dev test build lint fuzz bench bench-tx

dev: ## the demo: throwaway Postgres + local issuer + proxy, prints psql lines
	./scripts/deps.sh dev
	$(GO) run ./cmd/rlsproxy dev

test: ## every test, against a real PostgreSQL, with the race detector; then the proxy's tests again in transaction-pooling mode
	./scripts/deps.sh test
	$(GO) test -race -count=1 ./...
	# The review attack tests choose their pool mode themselves, so they ran in both above.
	RLSPROXY_TEST_POOL_MODE=transaction $(GO) test -race -count=1 -skip '^TestReview1[3-6]' ./proxy/

build: ## the binary, built as the Dockerfile builds it (cgo: the guard uses PostgreSQL's parser)
	CGO_ENABLED=1 $(GO) build -trimpath -tags netgo,osusergo -ldflags "$(LDFLAGS)" -o bin/rlsproxy ./cmd/rlsproxy

lint:
	test -z "$$(gofmt -l .)"
	$(GO) vet ./...
	staticcheck ./...

fuzz: ## a short run of every fuzz target (a count of runs, not a duration: Go 1.26's fuzzer can fail spuriously at a -fuzztime deadline, golang/go#75804)
	$(GO) test -run '^$$' -fuzz '^FuzzReader$$' -fuzztime 500000x ./internal/wire
	$(GO) test -run '^$$' -fuzz '^FuzzParseStartup$$' -fuzztime 50000x ./proxy
	$(GO) test -run '^$$' -fuzz '^FuzzRelay$$' -fuzztime 50000x ./proxy
	$(GO) test -run '^$$' -fuzz '^FuzzRelayGuarded$$' -fuzztime 50000x ./proxy
	$(GO) test -run '^$$' -fuzz '^FuzzLedger$$' -fuzztime 100000x ./proxy
	$(GO) test -run '^$$' -fuzz '^FuzzVerify$$' -fuzztime 100000x ./auth
	$(GO) test -run '^$$' -fuzz '^FuzzGuard$$' -fuzztime 50000x ./session

bench: ## pgbench: direct vs PgBouncer vs rlsproxy; rewrites BENCHMARKS.md and bench/chart.svg (~18 min)
	./scripts/deps.sh test
	command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || apt-get install -y -qq pgbouncer
	$(GO) run ./bench -markdown BENCHMARKS.md -chart bench/chart.svg -goroutine-relay

bench-tx: ## transaction pooling: pgbench -S with 1,000 clients over 20 connections, many users, connect before/after; rewrites BENCHMARKS.md's "Transaction pooling" section (~15 min)
	./scripts/deps.sh test
	command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || apt-get install -y -qq pgbouncer
	$(GO) run ./bench -workloads tx-1000,many-users,connect-before -markdown BENCHMARKS.md
