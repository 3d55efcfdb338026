# Front door of the repository: `make` lists the targets. Logic lives in scripts/ and ansible/.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

SITE ?=
JOB ?=
JOB_ID ?=
PROFILE ?=
WAIT ?=
DEST ?=
KEEP ?=
INVENTORY ?= ansible/inventories/local/hosts.yml
export INVENTORY := $(abspath $(INVENTORY))

VENV := .venv/.installed

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  \033[36m%-13s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: SITE=<participant> JOB=<job or job folder> JOB_ID= PROFILE=demo WAIT=1 DEST=<dir> KEEP=1 INVENTORY=<file>"

$(VENV): requirements.txt
	scripts/setup.sh

.PHONY: setup
setup: $(VENV) ## Install Debian tools and the pinned project venv (.venv)

.PHONY: provision
provision: $(VENV) ## Provision kits and mTLS certificates from provision/project.yml (keeps the root CA)
	scripts/provision.sh

.PHONY: data
data: $(VENV) ## Generate demo data for every site into workspace/data (JOB= for one job)
	scripts/generate_data.sh $(JOB)

.PHONY: deploy
deploy: $(VENV) ## Push kits and site configs with Ansible and start participants (SITE=, default all)
	scripts/deploy.sh $(SITE)

.PHONY: submit
submit: $(VENV) ## Build and submit a job through the admin kit (JOB=, PROFILE=demo, WAIT=1)
	scripts/submit.sh "$(JOB)" "$(PROFILE)" "$(WAIT)"

.PHONY: fetch-model
fetch-model: $(VENV) ## Download the best global model to models/<JOB>/ (JOB=, JOB_ID=, DEST=)
	scripts/fetch_model.sh "$(JOB)" "$(JOB_ID)" "$(DEST)"

.PHONY: tensorboard
tensorboard: $(VENV) ## Serve TensorBoard for the latest fetched run of JOB on port 6006
	scripts/tensorboard.sh "$(JOB)"

.PHONY: status
status: $(VENV) ## Show which participants run, and the server's jobs
	scripts/status.sh

.PHONY: down
down: $(VENV) ## Stop every participant (SITE= for one); deployments and models stay
	scripts/control.sh stop $(SITE)

.PHONY: demo
demo: $(VENV) ## One-command local federation: provision, data, deploy, train all jobs (JOB= for one), fetch (KEEP=1 keeps it running)
	scripts/demo.sh "$(KEEP)" $(JOB)

.PHONY: test
test: $(VENV) ## Run the test suite (unit, config, end-to-end federation)
	.venv/bin/python -m pytest -q tests
