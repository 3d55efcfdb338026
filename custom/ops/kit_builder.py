"""A provisioning builder for what NVFlare's StaticFileBuilder has no argument for.

Listed in provision/project.yml after StaticFileBuilder and before SignatureBuilder, so what it
writes into a kit is signed with the rest of it.
"""

import json

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
