"""Add or remove a client site in ``provision/project.yml`` and in a YAML inventory, keeping every other line (the
files' comments are their documentation): ``make add-site`` and ``make remove-site`` (scripts/add_site.sh,
scripts/remove_site.sh) call

    python -m ops.project_file add-site PROJECT_YML SITE ORG        (custom/ on PYTHONPATH)
    python -m ops.project_file remove-site PROJECT_YML SITE
    python -m ops.project_file add-host INVENTORY_YML SITE ADDRESS
    python -m ops.project_file remove-host INVENTORY_YML SITE

Each checks its input against the file as it is (the site exists or not, the org is the project's, the server and
the last site cannot be removed), writes the new text next to the file and renames it over the file only once the
new text parses to exactly the intended change; on any error it exits 2 with a message naming the file and the
field, and the file is untouched.
"""

import os
import re
import sys
import tempfile
from pathlib import Path

import yaml

# NVFlare's own patterns (nvflare.apis.utils.format_check): a client name, an org.
SITE_NAME = re.compile(r"[A-Za-z0-9_-]+")
ORG_NAME = re.compile(r"[A-Za-z0-9_]+")
# An inventory host address: a host name or an IPv4/IPv6 address, optionally :port for a name or IPv4.
ADDRESS = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._:-]{0,252})")


class ProjectError(Exception):
    """Bad input or a file that is not as expected: the message names the file and the field."""


def _load(path: Path, text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ProjectError(f"{path}: not valid YAML: {err}") from None


def _participants(path: Path, text: str) -> list:
    data = _load(path, text)
    participants = data.get("participants") if isinstance(data, dict) else None
    if not isinstance(participants, list) or not all(isinstance(p, dict) and "name" in p for p in participants):
        raise ProjectError(f"{path}: 'participants' must be a list of entries with a 'name'")
    return participants


def _item_spans(lines: list, key: str) -> tuple[int, list]:
    """(indent of the list's items, [(first, end) line spans of each item]) of the top-level list ``key:``."""
    start = next((i for i, line in enumerate(lines) if re.match(rf"{key}:\s*(#.*)?$", line)), None)
    if start is None:
        raise ProjectError(f"'{key}:' is not a top-level block list")
    spans, indent = [], None
    i = start + 1
    while i < len(lines):
        line = lines[i]
        if line.strip() and not line.startswith((" ", "-", "#")):
            break  # the next top-level key
        item = re.match(r"(\s*)- ", line)
        if item and (indent is None or len(item.group(1)) == indent):
            indent = len(item.group(1))
            spans.append([i, i + 1])
        elif spans and line.strip() and not line.lstrip().startswith("#"):
            spans[-1][1] = i + 1
        i += 1
    if not spans:
        raise ProjectError(f"'{key}:' has no block-style items")
    return indent, [tuple(s) for s in spans]


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent, text=True)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_site(path: Path, text: str, site: str, org: str) -> str:
    """``text`` (project.yml) with client ``site`` of ``org`` after the last client."""
    participants = _participants(path, text)
    if not SITE_NAME.fullmatch(site):
        raise ProjectError(f"SITE='{site}' is not an NVFlare client name (letters, digits, _ and -)")
    if any(p["name"] == site for p in participants):
        raise ProjectError(f"{path}: participants already has '{site}' (a {_type(participants, site)})")
    orgs = sorted({str(p.get("org")) for p in participants if p.get("org")})
    if not ORG_NAME.fullmatch(org) or org not in orgs:
        raise ProjectError(f"ORG='{org}' is not an org of {path} (participants' org: {', '.join(orgs)})")
    lines = text.splitlines(keepends=True)
    indent, spans = _item_spans(lines, "participants")
    if len(spans) != len(participants):
        raise ProjectError(f"{path}: 'participants' is not one block-style item per participant (unusual layout)")
    clients = [i for i, p in enumerate(participants) if p.get("type") == "client"]
    last = clients[-1] if clients else len(participants) - 1
    pad = " " * indent
    entry = {"name": site, "type": "client", "org": org}
    new = "".join(lines[: spans[last][1]] + [f"{pad}- name: {site}\n", f"{pad}  type: client\n", f"{pad}  org: {org}\n"]
                  + lines[spans[last][1]:])  # fmt: skip
    expected = participants[: last + 1] + [entry] + participants[last + 1:]
    if _participants(path, new) != expected:
        raise ProjectError(f"{path}: could not add '{site}' without changing other entries (unusual layout)")
    return new


def remove_site(path: Path, text: str, site: str) -> str:
    """``text`` (project.yml) without client ``site``."""
    participants = _participants(path, text)
    names = [p["name"] for p in participants]
    if site not in names:
        raise ProjectError(f"{path}: participants has no '{site}' (clients: {', '.join(_clients(participants))})")
    if _type(participants, site) != "client":
        raise ProjectError(f"{path}: '{site}' is a {_type(participants, site)}, not a site: only sites are removed")
    if _clients(participants) == [site]:
        raise ProjectError(f"{path}: '{site}' is the last site: a federation needs one")
    lines = text.splitlines(keepends=True)
    _, spans = _item_spans(lines, "participants")
    if len(spans) != len(participants):
        raise ProjectError(f"{path}: 'participants' is not one block-style item per participant (unusual layout)")
    first, end = spans[names.index(site)]
    new = "".join(lines[:first] + lines[end:])
    if _participants(path, new) != [p for p in participants if p["name"] != site]:
        raise ProjectError(f"{path}: could not remove '{site}' without changing other entries (unusual layout)")
    return new


def _type(participants: list, name: str) -> str:
    return next(str(p.get("type", "participant")) for p in participants if p["name"] == name)


def _clients(participants: list) -> list:
    return [p["name"] for p in participants if p.get("type") == "client"]


def _clients_block(path: Path, text: str) -> tuple[list, int, int, int]:
    """(lines, index of 'hosts:' under flare_clients, its indent, end of that hosts block) of a YAML inventory."""
    lines = text.splitlines(keepends=True)
    group = next((i for i, line in enumerate(lines) if re.match(r"\s*flare_clients:\s*(#.*)?$", line)), None)
    if group is None:
        raise ProjectError(f"{path}: no 'flare_clients:' group (the inventory's sites)")
    group_indent = len(lines[group]) - len(lines[group].lstrip())
    hosts = next((i for i in range(group + 1, len(lines)) if re.match(r"\s*hosts:\s*(#.*)?$", lines[i])), None)
    if hosts is None:
        raise ProjectError(f"{path}: 'flare_clients:' has no 'hosts:'")
    indent = len(lines[hosts]) - len(lines[hosts].lstrip())
    end = hosts + 1
    for i in range(hosts + 1, len(lines)):
        stripped = lines[i].strip()
        if stripped and not stripped.startswith("#") and len(lines[i]) - len(lines[i].lstrip()) <= max(indent, group_indent):
            break
        if stripped and not stripped.startswith("#"):
            end = i + 1
    return lines, hosts, indent, end


def _inventory_sites(path: Path, text: str) -> dict:
    data = _load(path, text)
    try:
        hosts = data["all"]["children"]["flare_clients"]["hosts"]
    except (KeyError, TypeError):
        raise ProjectError(f"{path}: no all.children.flare_clients.hosts (the inventory's sites)") from None
    return dict(hosts or {})


def add_host(path: Path, text: str, site: str, address: str) -> str:
    """``text`` (a YAML inventory) with ``site`` under flare_clients, reached at ``address``."""
    hosts = _inventory_sites(path, text)
    if site in hosts:
        raise ProjectError(f"{path}: flare_clients already has the host '{site}'")
    if not ADDRESS.fullmatch(address):
        raise ProjectError(f"HOST='{address}' is not a host name or address")
    lines, _, indent, end = _clients_block(path, text)
    pad = " " * (indent + 2)
    new = "".join(lines[:end] + [f"{pad}{site}:\n", f"{pad}  ansible_host: {address}\n"] + lines[end:])
    if _inventory_sites(path, new) != {**hosts, site: {"ansible_host": address}}:
        raise ProjectError(f"{path}: could not add the host '{site}' without changing others (unusual layout)")
    return new


def remove_host(path: Path, text: str, site: str) -> str:
    """``text`` (a YAML inventory) without the host ``site`` (and its variables)."""
    hosts = _inventory_sites(path, text)
    if site not in hosts:
        return text
    lines, start, indent, end = _clients_block(path, text)
    first = next(i for i in range(start + 1, end) if re.match(rf"\s{{{indent + 2}}}{re.escape(site)}:", lines[i]))
    last = first + 1
    while last < end and (not lines[last].strip() or len(lines[last]) - len(lines[last].lstrip()) > indent + 2):
        last += 1
    new = "".join(lines[:first] + lines[last:])
    if _inventory_sites(path, new) != {k: v for k, v in hosts.items() if k != site}:
        raise ProjectError(f"{path}: could not remove the host '{site}' without changing others (unusual layout)")
    return new


ACTIONS = {"add-site": add_site, "remove-site": remove_site, "add-host": add_host, "remove-host": remove_host}


def main(argv: list) -> int:
    if len(argv) < 3 or argv[0] not in ACTIONS:
        print(__doc__, file=sys.stderr)
        return 2
    action, path = ACTIONS[argv[0]], Path(argv[1])
    try:
        text = path.read_text()
        new = action(path, text, *argv[2:])
    except (OSError, ProjectError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if new != text:
        _write(path, new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
