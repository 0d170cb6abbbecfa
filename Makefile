# Targets: run, build, deps, test, lint, clean. See the README for the quick start.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

# The exact test command, quoted by the README and .ci/run. The tests start
# their own redis-server, so none needs to be running.
TEST_CMD := go test -race -count=1 -timeout 20m ./...

# Folders whose npm packages the tests use.
NPM_DIRS := e2e/sdk e2e/forward ui

GOBIN_DIR := $(shell go env GOPATH 2>/dev/null)/bin
STATICCHECK := $(GOBIN_DIR)/staticcheck

.PHONY: run build deps test lint clean ui fuzz soak bench bench-go

# The binary replaces the recipe's shell, so the SIGTERM that make passes on
# to its children reaches byokproxy itself, where "go run" would not pass it
# on. make does not pass on SIGINT: Ctrl-C in a terminal signals the whole
# process group, byokproxy included.
run:
	go build -o bin/byokproxy ./cmd/byokproxy
	exec bin/byokproxy serve --dev

build:
	CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o bin/byokproxy ./cmd/byokproxy

# Installs what the tests need and this machine lacks. Go, Node.js and npm
# must already be installed. redis-server and chromium (unless CHROMIUM names
# a Chromium binary) are installed with apt-get on Debian when running as root. A policy-rc.d that forbids service
# starts keeps the package from starting a redis-server, since the tests start
# their own.
deps:
	@command -v go >/dev/null || { echo "make deps: go not found; install Go 1.26.8 or later from https://go.dev/dl/" >&2; exit 1; }
	@command -v node >/dev/null || { echo "make deps: node not found; install Node.js (it includes npm)" >&2; exit 1; }
	@command -v npm >/dev/null || { echo "make deps: npm not found; install npm (it comes with Node.js)" >&2; exit 1; }
	@missing=""; \
	for pkg in redis-server chromium; do \
		if [ "$$pkg" = chromium ] && [ -n "$${CHROMIUM:-}" ] && [ -x "$${CHROMIUM:-}" ]; then continue; fi; \
		command -v "$$pkg" >/dev/null || missing="$$missing $$pkg"; \
	done; \
	missing="$${missing# }"; \
	if [ -n "$$missing" ]; then \
		if [ ! -f /etc/debian_version ] || [ "$$(id -u)" -ne 0 ]; then \
			debian="$$missing"; hint=""; \
			case " $$missing " in *" chromium "*) debian="$$debian fonts-liberation"; hint=", or set CHROMIUM to a Chromium binary";; esac; \
			echo "make deps: $$missing not found; install it with your package manager (Debian: apt-get install $$debian)$$hint" >&2; \
			exit 1; \
		fi; \
		echo "make deps: installing $$missing with apt-get"; \
		policy=/usr/sbin/policy-rc.d; \
		if [ ! -e "$$policy" ]; then \
			trap 'rm -f "$$policy"' EXIT; \
			printf '#!/bin/sh\nexit 101\n' > "$$policy"; chmod 755 "$$policy"; \
		fi; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update; \
		pkgs="$$missing"; \
		case " $$missing " in *" chromium "*) pkgs="$$pkgs fonts-liberation";; esac; \
		apt-get install -y --no-install-recommends $$pkgs; \
	fi
	@for dir in $(NPM_DIRS); do \
		[ -f "$$dir/package-lock.json" ] || continue; \
		if [ ! -d "$$dir/node_modules" ] || [ "$$dir/package-lock.json" -nt "$$dir/node_modules" ]; then \
			echo "make deps: npm ci in $$dir"; \
			(cd "$$dir" && npm ci && touch node_modules); \
		fi; \
	done

# The decryption tests run a second time on circl's portable X25519 code,
# which CPUs without BMI2 and ADX use.
test: deps
	$(TEST_CMD)
	go test -count=1 -tags purego -run 'CCTV|OpenSmall|FastIdentity|X25519|LowOrder' ./keystore
	.ci/fuzz.sh

# Runs every fuzz target for FUZZTIME (default 10s) after its seed corpus.
fuzz:
	.ci/fuzz.sh

# Side-by-side load benchmarks of byokproxy, a bare reverse proxy and a
# direct connection (bench/run.sh, about 8 minutes, loopback only). The
# results page is docs/benchmarks.md.
bench:
	bench/run.sh

# Go benchmarks of each step of the request path, with allocation counts.
bench-go:
	go test -run '^$$' -bench . -benchmem ./mailbox ./keystore ./audit ./usage ./proxy

# Bounded load run of the built binary; rewrites docs/soak.md with its figures.
soak:
	go run ./soak -duration 3m -report docs/soak.md

lint:
	@unformatted="$$(find . -name '*.go' -not -path '*/node_modules/*' -not -path './.git/*' -print0 | xargs -0 -r gofmt -l)"; \
	if [ -n "$$unformatted" ]; then \
		echo "gofmt would change these files:" >&2; echo "$$unformatted" >&2; exit 1; \
	fi
	go vet ./...
	@if [ ! -x "$(STATICCHECK)" ]; then \
		echo "installing staticcheck into $(GOBIN_DIR)"; \
		go install honnef.co/go/tools/cmd/staticcheck@latest; \
	fi
	$(STATICCHECK) ./...

# Rebuilds the settings page from ui/ into admin/uiassets, which is committed
# so that "go build" needs no Node.js. Run it after changing anything in ui/.
ui:
	@if [ ! -d ui/node_modules ] || [ ui/package-lock.json -nt ui/node_modules ]; then \
		(cd ui && npm ci && touch node_modules); \
	fi
	cd ui && npm run build

clean:
	rm -rf bin/ e2e/artifacts/ coverage.out coverage.html
