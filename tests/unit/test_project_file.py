"""ops.project_file on the repository's own provision/project.yml and production inventory (copies): a site is added
and removed with every other line kept, and bad input leaves the file as it was, with an error naming the field."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROJECT = REPO / "provision" / "project.yml"
INVENTORY = REPO / "ansible" / "inventories" / "production" / "hosts.yml"


def project_file(*args):
    return subprocess.run([sys.executable, "-m", "ops.project_file", *map(str, args)], cwd=REPO / "custom",
                          capture_output=True, text=True)  # fmt: skip


@pytest.fixture
def project(tmp_path):
    return Path(shutil.copy(PROJECT, tmp_path / "project.yml"))


def test_a_site_is_added_after_the_last_site_and_removed_again_with_every_other_line_kept(project):
    assert project_file("add-site", project, "hospital_c", "hospital_a").returncode == 0
    participants = yaml.safe_load(project.read_text())["participants"]
    names = [p["name"] for p in participants]
    assert names.index("hospital_c") == names.index("hospital_b") + 1
    assert participants[names.index("hospital_c")] == {"name": "hospital_c", "type": "client", "org": "hospital_a"}
    lines = project.read_text().splitlines()
    at = lines.index("  - name: hospital_c")
    assert lines[at:at + 3] == ["  - name: hospital_c", "    type: client", "    org: hospital_a"]
    assert lines[:at] + lines[at + 3:] == PROJECT.read_text().splitlines()  # every other line, comments included
    assert project_file("remove-site", project, "hospital_c").returncode == 0
    assert project.read_text() == PROJECT.read_text()  # comments and all


@pytest.mark.parametrize("args, error", [
    (["add-site", "hospital_b", "hospital_b"], "participants already has 'hospital_b' (a client)"),
    (["add-site", "hospital_c", "nowhere"], "ORG='nowhere' is not an org of"),
    (["add-site", "hospital c", "hospital_a"], "SITE='hospital c' is not an NVFlare client name"),
    (["remove-site", "flare-server"], "'flare-server' is a server, not a site"),
    (["remove-site", "hospital_x"], "participants has no 'hospital_x' (clients: hospital_a, hospital_b)"),
])  # fmt: skip
def test_bad_input_changes_nothing_and_names_the_field(project, args, error):
    result = project_file(args[0], project, *args[1:])
    assert result.returncode == 2 and error in result.stderr, result.stderr
    assert project.read_text() == PROJECT.read_text()


def test_the_last_site_is_not_removed(project):
    assert project_file("remove-site", project, "hospital_b").returncode == 0
    result = project_file("remove-site", project, "hospital_a")
    assert result.returncode == 2 and "'hospital_a' is the last site: a federation needs one" in result.stderr


def test_an_inventory_host_is_added_and_removed(tmp_path):
    inventory = Path(shutil.copy(INVENTORY, tmp_path / "hosts.yml"))
    assert project_file("add-host", inventory, "hospital_c", "flare-c.hospital-c.example").returncode == 0
    hosts = yaml.safe_load(inventory.read_text())["all"]["children"]["flare_clients"]["hosts"]
    assert hosts["hospital_c"] == {"ansible_host": "flare-c.hospital-c.example"} and "hospital_a" in hosts
    again = project_file("add-host", inventory, "hospital_c", "10.0.0.3")
    assert again.returncode == 2 and "flare_clients already has the host 'hospital_c'" in again.stderr
    assert project_file("remove-host", inventory, "hospital_c").returncode == 0
    assert inventory.read_text() == INVENTORY.read_text()
