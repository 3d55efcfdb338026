"""Provisioning builders for what NVFlare's StaticFileBuilder has no argument for.

Listed in provision/project.yml after StaticFileBuilder and before SignatureBuilder, so what it
writes into a kit is signed with the rest of it.
"""

import json
import os

from nvflare.lighter.constants import ProvFileName
from nvflare.lighter.spec import Builder


class ClientCommunicationBuilder(Builder):
    """Sets the client section's ``communication_timeout`` in every site's ``startup/fed_client.json``.

    It bounds each request a site makes to the server (ask for a task, send a result). NVFlare's
    default is 300 s: a task request lost when a site's link drops is only given up, and asked
    again, after that long, so a site whose link came back stays out of the run for up to five
    minutes. Sending a result, which can take longer (HE ciphertexts of a whole model over a
    hospital's uplink), has its own bound in the job: ``submit_task_result_timeout`` in
    job_configs/base/config_fed_client.json.
    """

    def __init__(self, communication_timeout: float):
        if not isinstance(communication_timeout, (int, float)) or communication_timeout <= 0:
            raise ValueError(f"ClientCommunicationBuilder: communication_timeout must be seconds > 0, "
                             f"not {communication_timeout!r}")
        self.communication_timeout = float(communication_timeout)

    def build(self, project, ctx):
        for client in project.get_clients():
            path = f"{ctx.get_kit_dir(client)}/{ProvFileName.FED_CLIENT_JSON}"
            with open(path) as f:
                config = json.load(f)
            config["client"]["communication_timeout"] = self.communication_timeout
            with open(path, "w") as f:
                json.dump(config, f, indent=2)


AUTHZ_RIGHTS = ("submit_job", "clone_job", "manage_job", "download_job", "view", "operate", "shell_commands", "byoc",
                "server-predeployed-flwr")  # fmt: skip
AUTHZ_VALUES = ("any", "none", "n:submitter", "o:submitter", "o:site", "n:site")


class AuthorizationBuilder(Builder):
    """Writes the project's admin authorization policy (``permissions``: role -> right -> who) as
    ``local/authorization.json`` of the server and every site, and removes NVFlare's ``authorization.json.default``
    from their kits: the roles are the ones project.yml states, never an unmodified default. The server applies it
    to admin commands (who may submit, manage, operate); each site to the jobs deployed to it (``byoc``: who may
    bring custom code). Every admin's role in project.yml must be in it, and every role must state every right."""

    def __init__(self, permissions: dict):
        if not isinstance(permissions, dict) or not permissions:
            raise ValueError("AuthorizationBuilder: permissions must map roles to their rights")
        for role, rights in permissions.items():
            if rights == "any":
                continue
            if not isinstance(rights, dict) or sorted(rights) != sorted(AUTHZ_RIGHTS):
                raise ValueError(f"AuthorizationBuilder: role '{role}' must be 'any' or state each of the rights "
                                 f"{', '.join(AUTHZ_RIGHTS)}, got {rights!r}")  # fmt: skip
            bad = {right: who for right, who in rights.items() if who not in AUTHZ_VALUES}
            if bad:
                raise ValueError(f"AuthorizationBuilder: role '{role}': {bad} (allowed: {', '.join(AUTHZ_VALUES)})")
        self.permissions = permissions

    def build(self, project, ctx):
        missing = sorted({a.get_prop("role") for a in project.get_admins()} - set(self.permissions))
        if missing:
            raise ValueError(f"AuthorizationBuilder: the roles {missing} of project.yml's admins have no permissions")
        policy = json.dumps({"format_version": "1.0", "permissions": self.permissions}, indent=2) + "\n"
        for participant in [project.get_server(), *project.get_clients()]:
            local = ctx.get_local_dir(participant)
            with open(f"{local}/authorization.json", "w") as f:
                f.write(policy)
            default = f"{local}/{ProvFileName.AUTHORIZATION_JSON_DEFAULT}"
            if os.path.exists(default):
                os.remove(default)
