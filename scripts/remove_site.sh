#!/usr/bin/env bash
# Remove a hospital site: scripts/remove_site.sh SITE   (make remove-site SITE=)
#  1. the server stops admitting SITE from now on (NVFlare's disable_client through the admin kit: its session is
#     dropped, its registrations are refused; the server keeps the list across restarts, disabled_clients.json);
#  2. its deployment is stopped for good (flarectl.sh retire: stopped, its systemd unit disabled or its container
#     removed; the workspace stays on its host);
#  3. its entry leaves provision/project.yml (and $INVENTORY when it is a YAML file): jobs built from now on do not
#     count it. site_configs/site_SITE/ is kept (the hospital's settings, for a return).
# Nothing else is touched. The server, an unknown site and the last site are refused before anything changes; so is
# a server that does not answer (the site could not be refused then).
source "$(dirname "$0")/common.sh"
site=${1:-}
[[ -n $site ]] || die "usage: make remove-site SITE=<site>"
check_var SITE "$site" participant
stage=$(mktemp -d -t hcls-remove-site.XXXXXX)
trap 'rm -rf "$stage"' EXIT
cp -p "$PROJECT_YML" "$stage/project.yml"
python -m ops.project_file remove-site "$stage/project.yml" "$site" || exit 1
yaml_inventory=false
if [[ $INVENTORY == *.yml || $INVENTORY == *.yaml ]]; then
  yaml_inventory=true
  cp -p "$INVENTORY" "$stage/inventory.yml"
  python -m ops.project_file remove-host "$stage/inventory.yml" "$site" || exit 1
fi
python -m ops.flare_admin disable-site --kit "$(admin_kit)" --site "$site" \
  || die "the server did not disable $site: nothing changed (is the server up? make status)"
"$REPO/scripts/control.sh" retire "$site" \
  || echo "warning: $site's host did not confirm the stop; the server refuses it anyway (stop it there by hand)" >&2
cp "$stage/project.yml" "$PROJECT_YML"
$yaml_inventory && cp "$stage/inventory.yml" "$INVENTORY"
echo "$site removed: refused by the server, stopped, gone from $PROJECT_YML${yaml_inventory:+ and $INVENTORY};" \
  "site_configs/site_$site/ kept"
