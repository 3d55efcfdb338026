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
HE ?=
FORCE ?=
TIMEOUT ?=
export FORCE TIMEOUT
INVENTORY ?= ansible/inventories/local/hosts.sh
export INVENTORY := $(abspath $(INVENTORY))

VENV := .venv/.installed

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: SITE=<participant> JOB=<job or job folder> JOB_ID= PROFILE=demo WAIT=1 TIMEOUT=<s> DEST=<dir> KEEP=1 HE=1 FORCE=1 SERVER_HOST=<server name> INVENTORY=<file>"

$(VENV): requirements.txt
	scripts/setup.sh

.PHONY: setup
setup: $(VENV) ## Install Debian tools and the pinned project venv (.venv)

.PHONY: provision
provision: $(VENV) ## Provision kits and mTLS certificates from provision/project.yml (keeps the root CA; HE=1 adds CKKS contexts)
	scripts/provision.sh $(if $(HE),--he)

.PHONY: data
data: $(VENV) ## Generate demo data for every site into workspace/data (JOB= for one job)
	scripts/generate_data.sh $(JOB)

.PHONY: deploy
deploy: $(VENV) ## Push kits and site configs with Ansible and (re)start participants between jobs (SITE=, default all; FORCE=1 restarts during a job)
	scripts/deploy.sh $(SITE)

.PHONY: check-data
check-data: $(VENV) ## Run each job's data check on a site's host, no training, no server (SITE=, JOB= default all, PROFILE=)
	scripts/check_data.sh "$(or $(SITE),$(error SITE is not set: make check-data SITE=<site>))" "$(JOB)" "$(PROFILE)"

.PHONY: submit
submit: $(VENV) ## Build and submit a job through the admin kit (JOB=, PROFILE=demo, WAIT=1, TIMEOUT=)
	scripts/submit.sh "$(JOB)" "$(PROFILE)" "$(WAIT)"

.PHONY: wait
wait: $(VENV) ## Follow a submitted job until it ends, reconnecting if the server goes away (JOB_ID=, TIMEOUT=)
	scripts/wait.sh "$(or $(JOB_ID),$(error JOB_ID is not set: make wait JOB_ID=<id>))"

.PHONY: abort
abort: $(VENV) ## Abort a running job on the server and every site (JOB_ID=)
	scripts/abort.sh "$(or $(JOB_ID),$(error JOB_ID is not set: make abort JOB_ID=<id>))"

.PHONY: fetch-model
fetch-model: $(VENV) ## Download the best global model to models/<JOB>/ (JOB=, JOB_ID=, DEST=)
	scripts/fetch_model.sh "$(JOB)" "$(JOB_ID)" "$(DEST)"

.PHONY: image
image: $(VENV) ## Build the participant image from NVIDIA's PyTorch image (BASE_IMAGE=) and requirements.txt
	scripts/build_image.sh production

.PHONY: image-airgapped
image-airgapped: $(VENV) ## Build the participant image with no registry: debootstrap base + local wheelhouse
	scripts/build_image.sh airgapped

.PHONY: compose-prepare
compose-prepare: $(VENV) ## Single-node container stack: every participant as a compose service (Ansible), admin console, TensorBoard
	scripts/compose_prepare.sh

.PHONY: compose-down
compose-down: $(VENV) ## Stop the single-node container stack; workspaces and data stay
	scripts/compose_prepare.sh down

.PHONY: tensorboard
tensorboard: $(VENV) ## Serve TensorBoard for the latest fetched run of JOB on port 6006
	scripts/tensorboard.sh "$(JOB)"

.PHONY: logs
logs: $(VENV) ## Show the last lines of a participant's log.txt on its host (SITE=)
	scripts/logs.sh "$(SITE)"

.PHONY: stop
stop: $(VENV) ## Stop one participant (SITE=); the others keep running
	scripts/control.sh stop "$(or $(SITE),$(error SITE is not set: make stop SITE=<participant>))"

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
