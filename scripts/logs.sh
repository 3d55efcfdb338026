#!/usr/bin/env bash
# The last lines of a participant's log.txt on its host: scripts/logs.sh SITE [LINES]
source "$(dirname "$0")/common.sh"
[[ -n ${1:-} ]] || die "SITE is not set (participants: $(participants | tr '\n' ' '))"
check_var SITE "$1" participant
check_var LINES "${2:-50}" number
"$REPO/scripts/control.sh" logs "$1" "${2:-50}"
