# kinesis-deagg: every task a user or CI runs. `make help` lists them.
#
# Tools from PyPI and npm are installed, pinned, into .venv and node_modules (both git-ignored)
# by the targets that need them, so the only prerequisites are Rust, Python 3 and Node.

VENV        := .venv
PY          := $(VENV)/bin/python
BIN         := target/release/kinesis-deagg
EVENT       ?= events/aggregated.json
# The window of the sample window events.
WINDOW      := --window-start 2025-11-24T16:00:00Z --window-end 2025-11-24T16:05:00Z --state events/src/window-state.json
TRANSFORM   ?= log
FUZZ_SECONDS ?= 600
# 0 leaves the aarch64 lint and tests (clippy-arm64, test-arm64) out of `make test` (when rustup,
# or apt for qemu and the cross gcc, cannot reach its source).
ARM64       ?= 1

# cargo-lambda and sam from the venv come first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# sam wants a region even to validate, and no telemetry.
export AWS_DEFAULT_REGION ?= us-east-1
export SAM_CLI_TELEMETRY := 0

.PHONY: clippy-arm64
clippy-arm64: arm64-tools ## Clippy, warnings denied, for aarch64 (the template's default architecture), whose code paths differ.
	@# Only the deaggregation differs by architecture (md5_many's kernels): the sinks, the same
	@# code on every target, are left out, and with them the AWS SDK's cross build.
	cargo clippy --target aarch64-unknown-linux-gnu --no-default-features --lib --bins -- -D warnings

ARM64_TARGET   := aarch64-unknown-linux-gnu
ARM64_PACKAGES := qemu-user-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross
ARM64_RUNNER   := qemu-aarch64-static -L /usr/aarch64-linux-gnu
ARM64_RELEASE  := target/$(ARM64_TARGET)/release
# Cross-link with Debian's gcc, run test binaries under qemu-user.
ARM64_ENV      := CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
                  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$(ARM64_RUNNER)"
# The integration tests run under qemu, without the Kinesis sink (portable code whose SDK
# takes minutes to cross-build); cross_compat (the official aggregators' bytes, the same on
# every target) is left out. The bootstrap cargo-lambda builds, sink included, is run too.
ARM64_TESTS    := partial_failures kpl_properties real_kpl_output bad_input allocations memory \
                  runtime_api cli sample_events metrics logs typed_transform concurrent_progress sink \
                  windows

.PHONY: arm64-tools
arm64-tools: ## Install what test-arm64 needs, if missing: the rustup target, qemu-user and the cross gcc (apt).
	@rustup target list --installed | grep -q $(ARM64_TARGET) || rustup target add $(ARM64_TARGET) || \
	  { echo "could not add the rustup target $(ARM64_TARGET): is rustup's server reachable? The rest of make test runs without it: make test ARM64=0"; exit 1; }
	@dpkg -s $(ARM64_PACKAGES) > /dev/null 2>&1 || { \
	  command -v apt-get > /dev/null || { echo "test-arm64 needs the Debian packages $(ARM64_PACKAGES) and this machine has no apt-get: install their equivalents, or run the rest of make test without it: make test ARM64=0"; exit 1; }; \
	  sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  echo "installing $(ARM64_PACKAGES) (apt)"; \
	  { $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $(ARM64_PACKAGES) > /dev/null; } || \
	  { echo "could not install the Debian packages $(ARM64_PACKAGES) with apt-get: is the Debian mirror reachable (and root or sudo available)? The rest of make test runs without them: make test ARM64=0"; exit 1; }; }

.PHONY: test-arm64
test-arm64: arm64-tools lambda-tools ## The Rust tests for aarch64 under qemu, and cargo-lambda's arm64 bootstrap through the Runtime API.
	$(ARM64_ENV) KINESIS_DEAGG_BIN=$(CURDIR)/$(ARM64_RELEASE)/kinesis-deagg KINESIS_DEAGG_RUNNER="$(ARM64_RUNNER)" \
	  cargo test --release --target $(ARM64_TARGET) --no-default-features --lib $(addprefix --test ,$(ARM64_TESTS)) --example orders
	cargo lambda build --release --arm64
	$(ARM64_ENV) KINESIS_DEAGG_BIN=$(CURDIR)/target/lambda/kinesis-deagg/bootstrap KINESIS_DEAGG_RUNNER="$(ARM64_RUNNER)" \
	  cargo test --release --target $(ARM64_TARGET) --no-default-features --test runtime_api each_sample_event

.PHONY: fuzz-arm64
fuzz-arm64: arm64-tools ## The md5_many fuzz target (its NEON kernel) built for aarch64 and run under qemu, FUZZ_SECONDS (outside CI).
	@dpkg -s g++-aarch64-linux-gnu > /dev/null 2>&1 || apt-get install -y -qq g++-aarch64-linux-gnu > /dev/null
	@rustup target list --installed --toolchain nightly | grep -q $(ARM64_TARGET) || rustup target add $(ARM64_TARGET) --toolchain nightly
	@# No sanitizer: qemu-user cannot host ASan's shadow memory.
	cd fuzz && CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
	  CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++ CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
	  cargo +nightly fuzz build -O -s none --target $(ARM64_TARGET) md5_many
	mkdir -p fuzz/corpus/md5_many
	$(ARM64_RUNNER) fuzz/target/$(ARM64_TARGET)/release/md5_many -max_total_time=$(FUZZ_SECONDS) \
	  fuzz/corpus/md5_many fuzz/seeds/md5_many

.PHONY: walkthrough-check
walkthrough-check: deps ## Follow docs/your-own-function.md from an empty directory (make test runs it).
	bash tools/walkthrough-check.sh

.PHONY: help build lambda-build test lint invoke watch invoke-watch watch-check deploy \
        events events-max bench bench-kpl fuzz clean deps lambda-tools pr-check e2e

help: ## List the targets.
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

build: ## Build the release binary (native).
	cargo build --release

lambda-build: lambda-tools ## Build the Lambda bootstrap for arm64 with cargo-lambda (adds a rustup target on first use).
	cargo lambda build --release --arm64

test: deps lambda-tools ## Everything CI runs: fmt, clippy, every test (cross-compatibility and cargo-lambda included), template lints.
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	@# The library without the sinks (and the AWS SDK) keeps building.
	cargo clippy --all-targets --no-default-features -- -D warnings
	$(if $(filter 1,$(ARM64)),$(MAKE) --no-print-directory clippy-arm64)
	$(if $(filter 1,$(ARM64)),$(MAKE) --no-print-directory test-arm64)
	@# One release build for the memory test, the binary the tests run and e2e: building the
	@# example with it gives the binary the dev-dependencies' features (tokio's test-util) too.
	cargo test --release --test memory
	cargo build --release --bin kinesis-deagg --example e2e_faults
	KINESIS_DEAGG_BIN=$(CURDIR)/$(BIN) cargo test
	@# The fuzz targets are run by `make fuzz`, outside CI: CI keeps them compiling (in this
	@# target directory, which holds their dependencies already: 14 s instead of 44 s).
	cd fuzz && CARGO_TARGET_DIR=../target cargo check --quiet --bins
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
	bash tools/walkthrough-check.sh
	bash tools/watch-check.sh
	$(MAKE) --no-print-directory e2e
	$(MAKE) --no-print-directory lint-template

pr-check: test ## Same as test.

lint: deps ## fmt, clippy and the template lints, without the tests.
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	$(MAKE) --no-print-directory lint-template

.PHONY: lint-template
lint-template:
	$(VENV)/bin/cfn-lint template.yaml
	$(VENV)/bin/sam validate --lint --template template.yaml
	$(PY) tools/check_dashboard.py template.yaml
	@# The lint must still run the SAM transform (cfn-lint 1.54+ does not): a wrong
	@# StartingPosition inside the SAM event has to be caught.
	@sed 's/StartingPosition: !Ref StartingPosition/StartingPosition: NEWEST/' template.yaml > target/bad-template.yaml
	@if $(VENV)/bin/cfn-lint target/bad-template.yaml > /dev/null; then \
	  echo "cfn-lint missed a wrong StartingPosition: is it still pinned to 1.53.3?"; exit 1; fi

invoke: build ## Run the handler locally on EVENT (default events/aggregated.json) with TRANSFORM.
	$(BIN) invoke --transform $(TRANSFORM) $(EVENT)

watch: lambda-tools ## Serve the function with cargo lambda watch (port 9000).
	cargo lambda watch

invoke-watch: lambda-tools ## Send EVENT to the function served by `make watch`.
	cargo lambda invoke kinesis-deagg --data-file $(EVENT)

watch-check: lambda-tools ## Start cargo lambda watch, invoke every sample event, check each response.
	bash tools/watch-check.sh

deploy: lambda-tools deps ## sam build (with cargo-lambda), then sam deploy --guided.
	$(VENV)/bin/sam build --beta-features
	$(VENV)/bin/sam deploy --guided

e2e: deps ## End to end: kinesalite, a model of Lambda's event source mapping (plain, then with tumbling windows), faults, kills; and through the Kinesis sink (6,000 user records).
	cargo build --release --quiet --bin kinesis-deagg --example e2e_faults
	$(PY) tests/e2e/e2e.py
	$(PY) tests/e2e/e2e_sink.py 6000

.PHONY: e2e-sink
e2e-sink: deps ## End to end through the Kinesis sink with 100,000 user records, faults and kills (outside CI, minutes).
	cargo build --release --quiet --bin kinesis-deagg
	$(PY) tests/e2e/e2e_sink.py 100000

events: ## Rebuild the sample events in events/ from events/src/ (deterministic).
	cargo build --release --quiet
	$(BIN) aggregate --plain events/src/plain.ndjson > events/plain.json
	$(BIN) aggregate --per-aggregate 4 events/src/aggregated.ndjson > events/aggregated.json
	$(BIN) aggregate --per-aggregate 3 events/src/mixed.ndjson > events/mixed.json
	$(BIN) aggregate events/src/corrupt-aggregate.ndjson > events/corrupt-aggregate.json
	$(BIN) aggregate events/src/invalid-base64.ndjson > events/invalid-base64.json
	$(BIN) aggregate events/src/json-failure.ndjson > events/json-failure.json
	$(BIN) aggregate --per-aggregate 4 $(WINDOW) events/src/window.ndjson > events/window.json
	$(BIN) aggregate --final $(WINDOW) events/src/window-final.ndjson > events/window-final.json

events-max: ## Generate events/generated/max.json: a 6 MB event (just under 6 MiB, the Lambda payload limit) of 1 MiB aggregates (not committed).
	cargo build --release --quiet
	mkdir -p events/generated
	python3 tools/user_records.py --bytes 4250000 --size 200 | $(BIN) aggregate > events/generated/max.json
	@ls -l events/generated/max.json

bench: deps ## The handler vs the official deaggregators and the MD5+base64 bound (one core), then 2 cores and the binary through a local Runtime API (start-up, peak RSS) and the monthly cost.
	$(PY) tools/bench/compare.py

bench-kpl: ## Criterion benchmarks of deaggregation and the handler (benches/deaggregate.rs).
	cargo bench --bench deaggregate

CARGO_FUZZ_VERSION := 0.13.1
CARGO_MUTANTS_VERSION := 27.1.0
# What `make mutants` mutates, and extra
# cargo-mutants options, e.g. MUTANTS_ARGS="--file src/metrics.rs" or "--in-diff my.diff".
MUTANTS_FILES ?= src/kpl/ src/event/ src/batch.rs src/transform.rs src/metrics.rs src/sink/ src/window.rs src/window/
MUTANTS_ARGS ?=
# The tests each mutant is tried against: the unit tests and every integration test but
# `memory` (its limits hold for release builds only); cross_compat needs `make deps`. The
# doctests are left out (slow to build; what they show, the unit tests check). E.g.
# MUTANTS_TESTS="--lib --test=kpl_properties" for a quicker run on one module.
MUTANTS_TESTS ?= --lib $(patsubst tests/%.rs,--test=%,$(filter-out tests/memory.rs,$(wildcard tests/*.rs)))

.PHONY: mutants
mutants: deps ## Mutation testing (cargo-mutants, pinned, installed if missing) of MUTANTS_FILES; results in mutants.out/. Long: not in CI.
	@cargo mutants --version 2>/dev/null | grep -q '$(CARGO_MUTANTS_VERSION)' || \
	  cargo install cargo-mutants --version $(CARGO_MUTANTS_VERSION) --locked
	@# The tests must run the mutated binary, not a release build named by KINESIS_DEAGG_BIN.
	@# The tests go to every cargo call (-C), so that each mutant builds only them (not the
	@# examples and the other tests), and without debug info.
	env -u KINESIS_DEAGG_BIN CARGO_PROFILE_DEV_DEBUG=0 cargo mutants -j 1 --timeout-multiplier 3 \
	  $(foreach f,$(MUTANTS_FILES),--file '$(f)$(if $(filter %/,$(f)),**)') $(MUTANTS_ARGS) \
	  $(foreach t,$(MUTANTS_TESTS),-C $(t))

fuzz: ## Fuzz the deaggregator, the event parser and md5_many, FUZZ_SECONDS each (cargo +nightly fuzz).
	@cargo fuzz --version 2>/dev/null | grep -q '$(CARGO_FUZZ_VERSION)' || \
	  cargo install cargo-fuzz --version $(CARGO_FUZZ_VERSION) --locked
	for t in deaggregate event md5_many; do \
	  mkdir -p fuzz/corpus/$$t && \
	  (cd fuzz && cargo +nightly fuzz run -O $$t corpus/$$t seeds/$$t -- -max_total_time=$(FUZZ_SECONDS)) || exit 1; \
	done

deps: $(VENV)/.test-stamp node_modules/.stamp ## Install the test tools (pinned) into .venv and node_modules.

lambda-tools: $(VENV)/.lambda-stamp

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.test-stamp: tools/requirements-test.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r tools/requirements-test.txt
	touch $@

$(VENV)/.lambda-stamp: tools/requirements-lambda.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r tools/requirements-lambda.txt
	touch $@

node_modules/.stamp: package.json package-lock.json
	npm ci --no-audit --no-fund --silent
	touch $@

clean: ## Remove build output and the installed tools.
	cargo clean
	rm -rf $(VENV) node_modules fuzz/target .aws-sam events/generated
