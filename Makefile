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
INSTALL ?=
TIMEOUT ?=
SERVER_HOST ?=
ORG ?=
HOST ?=
ONLY ?=
QUICK ?=
INVENTORY ?= ansible/inventories/local/hosts.sh
# The variables' values are data. Each keeps the text it was given ($(value): a '$(...)' in it is not expanded by
# make), reaches the recipes only through the environment (recipes pass "$$SITE", which the shell expands as one
# word, never $(SITE), which make would paste into the command line), and is checked by check-vars
# (scripts/common.sh check_make_vars: a strict pattern per variable) before any target does anything.
USER_VARS := SITE JOB JOB_ID PROFILE WAIT DEST DATA EPOCHS KEEP HE FORCE INSTALL TIMEOUT SERVER_HOST ORG HOST ONLY QUICK INVENTORY
$(foreach v,$(USER_VARS),$(eval override $(v) := $$(value $(v))))
export $(USER_VARS)

VENV := .venv/.installed

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: SITE=<participant> JOB=<job or job folder> JOB_ID= PROFILE=demo WAIT=1 TIMEOUT=<s> DEST=<dir> DATA=<dir> EPOCHS=<n> KEEP=1 HE=1 FORCE=1 INSTALL=1 SERVER_HOST=<server name> ORG=<org> HOST=<address> ONLY=<rows> QUICK=1 INVENTORY=<file>"

# check-vars comes first: a target whose variables are wrong stops before setup or anything else runs.
.PHONY: check-vars
check-vars:
	@source scripts/common.sh && check_make_vars

$(VENV): requirements.txt requirements-coordinator.txt constraints.txt | check-vars
	scripts/setup.sh

.PHONY: setup
setup: check-vars $(VENV) ## Install Debian tools and the pinned project venv (.venv)

.PHONY: lock
lock: check-vars ## Pin every package the requirements resolve to today in constraints.txt (then make setup, make test)
	scripts/lock.sh

.PHONY: provision
provision: check-vars $(VENV) ## Provision kits and mTLS certificates from provision/project.yml (keeps the root CA; HE=1 adds CKKS contexts)
	scripts/provision.sh

.PHONY: data
data: check-vars $(VENV) ## Generate demo data for every site into workspace/data (JOB= for one job)
	scripts/generate_data.sh "$$JOB"

.PHONY: trust-hosts
trust-hosts: check-vars $(VENV) ## Pin the SSH host keys of INVENTORY's hosts in workspace/known_hosts, printing fingerprints (SITE=; FORCE=1 replaces a changed key)
	scripts/trust_hosts.sh "$$SITE"

.PHONY: deploy
deploy: check-vars $(VENV) ## Push kits and site configs with Ansible and (re)start participants between jobs (SITE=, default all; FORCE=1 restarts during a job)
	scripts/deploy.sh "$$SITE"

.PHONY: add-site
add-site: check-vars $(VENV) ## Add a site: project.yml, site config, its kit from the same root CA, deploy it alone (SITE=, ORG=, HOST= for a YAML INVENTORY)
	$(if $(SITE),,$(error SITE is not set: make add-site SITE=<new site> ORG=<org> [HOST=<address>]))scripts/add_site.sh "$$SITE" "$$ORG" "$$HOST"

.PHONY: remove-site
remove-site: check-vars $(VENV) ## Remove a site: refused by the server from now on, stopped for good, gone from project.yml (SITE=)
	$(if $(SITE),,$(error SITE is not set: make remove-site SITE=<site>))scripts/remove_site.sh "$$SITE"

.PHONY: renew
renew: check-vars $(VENV) ## New certificates from the same root CA, deployed one participant at a time between jobs (SITE=<participant>|all, TIMEOUT=)
	$(if $(SITE),,$(error SITE is not set: make renew SITE=<participant>|all))scripts/renew.sh "$$SITE"

.PHONY: upgrade
upgrade: check-vars $(VENV) ## Roll requirements.txt's pins out: a new venv on each native host from wheels sent there, one participant at a time between jobs (SITE=, TIMEOUT=)
	scripts/upgrade.sh "$$SITE"

.PHONY: check-data
check-data: check-vars $(VENV) ## Run each job's data check on a site's host, no training, no server (SITE=, JOB= default all, PROFILE=)
	$(if $(SITE),,$(error SITE is not set: make check-data SITE=<site>))scripts/check_data.sh "$$SITE" "$$JOB" "$$PROFILE"

.PHONY: approve
approve: check-vars $(VENV) ## Build a job as submit does, print its digest and approve it in site_configs/site_<site>/approved_jobs.json (JOB=, PROFILE=, SITE= default all; INSTALL=1 also into the local deployed sites)
	$(if $(JOB),,$(error JOB is not set: make approve JOB=<job> [PROFILE=] [SITE=]))scripts/approve.sh "$$JOB" "$$PROFILE" "$$SITE"

.PHONY: submit
submit: check-vars $(VENV) ## Build and submit a job through the admin kit (JOB=, PROFILE=demo, WAIT=1, TIMEOUT=)
	scripts/submit.sh "$$JOB" "$$PROFILE" "$$WAIT"

.PHONY: wait
wait: check-vars $(VENV) ## Follow a submitted job until it ends, reconnecting if the server goes away (JOB_ID=, TIMEOUT=)
	$(if $(JOB_ID),,$(error JOB_ID is not set: make wait JOB_ID=<id>))scripts/wait.sh "$$JOB_ID"

.PHONY: abort
abort: check-vars $(VENV) ## Abort a running job on the server and every site (JOB_ID=)
	$(if $(JOB_ID),,$(error JOB_ID is not set: make abort JOB_ID=<id>))scripts/abort.sh "$$JOB_ID"

.PHONY: pretrain
pretrain: check-vars $(VENV) ## Pre-train JOB's network on a public data set as it ships (DATA=, EPOCHS=10) into custom/pretrained/<JOB>.pt (DEST=<dir>)
	scripts/pretrain.sh "$$JOB" "$$DATA" "$$EPOCHS" "$$DEST" "$$PROFILE"

.PHONY: fetch-model
fetch-model: check-vars $(VENV) ## Download the best global model to models/<JOB>/ (JOB=, JOB_ID=, DEST=)
	scripts/fetch_model.sh "$$JOB" "$$JOB_ID" "$$DEST"

.PHONY: image
image: check-vars $(VENV) ## Build the participant image from NVIDIA's PyTorch image (BASE_IMAGE=) and requirements.txt
	scripts/build_image.sh production

.PHONY: image-airgapped
image-airgapped: check-vars $(VENV) ## Build the participant image with no registry: debootstrap base + local wheelhouse
	scripts/build_image.sh airgapped

.PHONY: compose-prepare
compose-prepare: check-vars $(VENV) ## Single-node container stack: every participant as a compose service (Ansible), admin console, TensorBoard
	scripts/compose_prepare.sh

.PHONY: compose-down
compose-down: check-vars $(VENV) ## Stop the single-node container stack; workspaces and data stay
	scripts/compose_prepare.sh down

.PHONY: tensorboard
tensorboard: check-vars $(VENV) ## Serve TensorBoard for the latest fetched run of JOB on port 6006
	scripts/tensorboard.sh "$$JOB"

.PHONY: logs
logs: check-vars $(VENV) ## Show the last lines of a participant's log.txt on its host (SITE=)
	scripts/logs.sh "$$SITE"

.PHONY: stop
stop: check-vars $(VENV) ## Stop one participant (SITE=); the others keep running
	$(if $(SITE),,$(error SITE is not set: make stop SITE=<participant>))scripts/control.sh stop "$$SITE"

.PHONY: status
status: check-vars $(VENV) ## Show which participants run, and the server's jobs
	scripts/status.sh

.PHONY: certs
certs: check-vars $(VENV) ## List every certificate of the newest kits, root CA included, with days to expiry (fails on an expired one)
	scripts/certs.sh

.PHONY: doctor
doctor: check-vars $(VENV) ## Health report of every participant, read on its host through Ansible; workspace/doctor.json (SITE=, JOB= data checks, PROFILE=)
	scripts/doctor.sh "$$SITE" "$$JOB" "$$PROFILE"

.PHONY: down
down: check-vars $(VENV) ## Stop every participant (SITE= for one); deployments and models stay
	scripts/control.sh stop "$$SITE"

.PHONY: demo
demo: check-vars $(VENV) ## One-command local federation: provision, data, deploy, train all jobs (JOB= for one), fetch (KEEP=1 keeps it running)
	scripts/demo.sh "$$KEEP" "$$JOB"

.PHONY: bench
bench: check-vars $(VENV) ## Measure side by side and print the table, also in bench/results/ (ONLY=<row,...>, QUICK=1)
	scripts/bench.sh "$$ONLY" "$$QUICK"

.PHONY: test
test: check-vars $(VENV) ## Run the test suite (unit, config, end-to-end federation)
	.venv/bin/python -m pytest -q --durations=25 tests
