#!/usr/bin/env bash
# Executable inventory of the single-node container stack (make compose-prepare): the participants of
# provision/project.yml, exactly as the local inventory lists them; group_vars/ next to this file
# makes each of them a compose service on this machine.
exec "$(dirname "${BASH_SOURCE[0]}")/../local/hosts.sh" "$@"
