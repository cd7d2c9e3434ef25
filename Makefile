# haven.dr developer entry points. Recipes stay short; logic lives in tools/.
# `make test` is what CI runs (.ci/run).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

VENV := .venv
# Tools find each other (ansible-lint -> ansible, ansible-test -> python) in the venv.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Written by `make setup`; rebuilt when any of its inputs changes.
STAMP := $(VENV)/.setup-stamp
# Linted with havend's ruff config; $(wildcard) skips dirs that do not exist yet.
RUFF_PATHS := $(wildcard service tests/service tests/e2e bench tools)
# nbd_ingest.py first, then every other bench/*.py with a main guard (floor.py
# is not one: the replication and CDP benchmarks run its two ends).
BENCHES := bench/nbd_ingest.py $(filter-out bench/nbd_ingest.py bench/floor.py,\
	$(shell grep -l '^if __name__ == .__main__.:' bench/*.py 2>/dev/null))

.PHONY: test setup ruff structure service-tests units molecule sanity lint changelog bench build build-check \
	constraints openapi demo demo-clean demo-api e2e clean distclean

## test: everything CI checks, in order, stopping at the first failure
test: setup
	$(MAKE) --no-print-directory ruff
	$(MAKE) --no-print-directory structure
	$(MAKE) --no-print-directory service-tests
	$(MAKE) --no-print-directory units
	$(MAKE) --no-print-directory molecule
	$(MAKE) --no-print-directory e2e
	$(MAKE) --no-print-directory sanity
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory changelog
	$(MAKE) --no-print-directory build-check

## setup: apt packages, .venv, pinned dev tools, havend (editable)
setup: $(STAMP)
$(STAMP): requirements-dev.txt constraints.txt service/pyproject.toml tools/setup.sh
	tools/setup.sh
	touch $@

## ruff: lint and format check of havend, its tests and benchmarks
ruff: setup
	$(VENV)/bin/ruff check --config service/pyproject.toml $(RUFF_PATHS)
	$(VENV)/bin/ruff format --check --config service/pyproject.toml $(RUFF_PATHS)

## structure: no import cycle between havend's packages (docs/architecture.md, section 2)
structure: setup
	$(VENV)/bin/python tools/import_graph.py

## service-tests: havend's pytest suite (no tests collected = failure)
service-tests: setup
	$(VENV)/bin/pytest tests/service

## units: collection unit tests (ansible-test units), when there are any
units: setup
	@if [ -n "$$(find tests/unit -name 'test_*.py' -print -quit)" ]; then \
		tools/ansible-test.sh units; \
	else echo "units: no collection unit tests yet (no tests/unit/**/test_*.py), skipping"; fi

## molecule: every scenario of extensions/molecule (the roles against a local havend pair; root)
# molecule finds extensions/molecule/**/molecule.yml from the collection root (galaxy.yml);
# the scenarios find haven.dr through a link to this checkout. SCENARIO=drill runs one.
MOLECULE_COLLECTIONS := $(CURDIR)/.ansible/molecule-collections
molecule: setup
	mkdir -p $(MOLECULE_COLLECTIONS)/ansible_collections/haven
	ln -sfn $(CURDIR) $(MOLECULE_COLLECTIONS)/ansible_collections/haven/dr
	$(VENV)/bin/molecule test $(if $(SCENARIO),--scenario-name $(SCENARIO),--all)

## e2e: make demo end to end (tests/e2e: the shop through the playbooks on VMs; root)
e2e: setup
	$(VENV)/bin/pytest tests/e2e

## sanity: ansible-test sanity on a copy of the collection (offline)
sanity: setup
	tools/ansible-test.sh sanity

## lint: ansible-lint --profile production, once there is a role or playbook
lint: setup
	@if [ -n "$$(find roles -mindepth 1 -maxdepth 1 -type d -print -quit; \
			find playbooks -name '*.yml' -print -quit)" ]; then \
		ANSIBLE_COLLECTIONS_PATH=$(CURDIR)/.ansible/collections $(VENV)/bin/ansible-lint --profile production; \
	else echo "lint: no roles or playbooks yet, skipping ansible-lint"; fi

## changelog: antsibull-changelog checks of fragments and changelog.yaml
changelog: setup
	$(VENV)/bin/antsibull-changelog lint
	$(VENV)/bin/antsibull-changelog lint-changelog-yaml changelogs/changelog.yaml

## bench: run the benchmarks (results under bench/results/)
bench: setup
	for b in $(BENCHES); do echo "== $$b"; $(VENV)/bin/python "$$b"; done

## build: the collection tarball, .build/haven-dr-<version>.tar.gz
build: setup
	$(VENV)/bin/ansible-galaxy collection build --force --output-path .build

## build-check: the tarball builds and installs with ansible-galaxy
build-check: build
	rm -rf .build/installed
	ANSIBLE_COLLECTIONS_PATH=$(CURDIR)/.build/installed $(VENV)/bin/ansible-galaxy collection install --offline -p .build/installed \
		.build/haven-dr-$$(sed -n 's/^version: *//p' galaxy.yml).tar.gz
	test -f .build/installed/ansible_collections/haven/dr/MANIFEST.json
	test -f .build/installed/ansible_collections/haven/dr/service/pyproject.toml

## demo: the DR story of a 3-tier application of VMs through the collection's playbooks (root)
demo: setup
	$(VENV)/bin/python tools/demo.py

## demo-clean: whatever an interrupted demo left (VMs, networks, nodes, namespaces)
demo-clean: setup
	$(VENV)/bin/python tools/demo.py --clean

## demo-api: havend alone through its REST API, two sites, no VM
demo-api: setup
	$(VENV)/bin/python tools/api_demo.py

## openapi: rewrite docs/api/openapi.json from the code (a test fails when it is stale)
openapi: setup
	$(VENV)/bin/havend api-schema >docs/api/openapi.json

## constraints: re-resolve requirements-dev.txt and rewrite constraints.txt
constraints:
	tools/constraints.sh

## clean: build and test artefacts (keeps .venv)
clean:
	rm -rf .build tests/output .pytest_cache .ruff_cache .hypothesis service/build
	rm -rf "$${XDG_CACHE_HOME:-$$HOME/.cache}/haven-dr"
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

## distclean: clean, and remove .venv too
distclean: clean
	rm -rf $(VENV)
