"""The job as NVFlare deployed it: one object that trainers, model fetch, bundles, GPU sizing and tests read.

A job's app folder (``app/config/`` of a built job, ``app_<site>/config/`` where NVFlare deployed it, or
``app_server/config`` in a downloaded job) holds ``config_fed_server.json`` and ``config_fed_client.json``.
Each fact has one place there:

* the network: the server persistor's ``model`` (``{"path", "args"}``), which the server builds the initial
  global model from, and which trainers, fetch and bundles build the same way;
* the key metric: the server config's top-level ``key_metric`` (its model selector's ``{key_metric}``);
* the number of rounds: the server config's top-level ``num_rounds``;
* the trainer settings: the client config's top-level ``trainer`` object.
"""

import hashlib
import importlib
from pathlib import Path

from hcls.json_files import read_json

SERVER_CONFIG, CLIENT_CONFIG = "config_fed_server.json", "config_fed_client.json"


def persistor_args(server: dict) -> dict:
    """The ``args`` of a server config's ``persistor`` component (``{}`` without one): the network (``model``) and
    the pre-trained initial weights (``source_ckpt_file_full_name``)."""
    components = server.get("components", [])
    return next((c.get("args", {}) for c in components if isinstance(c, dict) and c.get("id") == "persistor"), {})


class JobConfig:
    def __init__(self, config_dir: Path):
        self.config_dir = Path(config_dir)
        self.app_dir = self.config_dir.parent
        self.server_path = self.config_dir / SERVER_CONFIG
        self.client_path = self.config_dir / CLIENT_CONFIG
        self.server = read_json(self.server_path)
        self.client = read_json(self.client_path)

    @classmethod
    def from_client_config(cls, client_config: Path) -> "JobConfig":
        """The job whose client config a trainer was started with (``--config config/config_fed_client.json``)."""
        return cls(Path(client_config).parent)

    @classmethod
    def from_job_folder(cls, job_dir: Path) -> "JobConfig":
        """The job in a job folder as built or downloaded: its one app's ``config/`` folder."""
        configs = sorted(p.parent for p in Path(job_dir).glob("*/config/" + SERVER_CONFIG))
        if not configs:
            raise ValueError(f"{job_dir}: no app folder with config/{SERVER_CONFIG} (not an NVFlare job folder)")
        if len(configs) > 1:
            raise ValueError(f"{job_dir}: several apps ({', '.join(p.parent.name for p in configs)}); expected one")
        return cls(configs[0])

    @property
    def network(self) -> dict:
        """The network the job trains, ``{"path", "args"}``: the server persistor's ``model``."""
        model = persistor_args(self.server).get("model")
        if isinstance(model, dict) and "path" in model:
            return {"path": model["path"], "args": model.get("args", {})}
        raise ValueError(f"{self.server_path}: no 'persistor' component with args.model {{path, args}}")

    def build_network(self):
        """A fresh instance of ``network`` (its class imported from its dotted path)."""
        spec = self.network
        module_name, _, class_name = spec["path"].rpartition(".")
        return getattr(importlib.import_module(module_name), class_name)(**spec["args"])

    @property
    def key_metric(self) -> str:
        """The metric the server keeps the best global model by; trainers report it under this name."""
        name = self.server.get("key_metric")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.server_path}: field 'key_metric' is missing")
        return name

    @property
    def num_rounds(self) -> int:
        rounds = self.server.get("num_rounds")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"{self.server_path}: field 'num_rounds' must be an integer >= 1, got {rounds!r}")
        return rounds

    def digest(self) -> str:
        """sha256 of the app: its code (custom/) and configuration (config/), as every participant runs it."""
        return folder_digest(self.app_dir)

    def trainer(self, required: tuple[str, ...] = ()) -> dict:
        """The client config's ``trainer`` settings; ValueError naming the file if one of ``required`` is absent."""
        trainer = self.client.get("trainer")
        if not isinstance(trainer, dict):
            raise ValueError(f"{self.client_path}: missing the top-level 'trainer' object")
        missing = [key for key in required if key not in trainer]
        if missing:
            raise ValueError(f"{self.client_path}: 'trainer' lacks the field(s) {', '.join(missing)}")
        return trainer


# NVFlare's signature files, written into every folder of a job submitted signed: not part of the job's code.
SIGNING_FILES = frozenset({".__nvfl_sig.json", ".__nvfl_submitter.crt"})


def folder_digest(folder: Path) -> str:
    """sha256 over every file of a job's app folder: per file its path relative to the folder (posix), a zero byte,
    and the sha256 of its content, in path order; ``__pycache__`` and NVFlare's signature files left out. The
    digest a site approves (site_privacy.approval.app_digest, the same recipe: site code imports nothing of a job's)."""
    folder = Path(folder)
    files = sorted(
        (p.relative_to(folder).as_posix(), p)
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.name not in SIGNING_FILES
    )
    digest = hashlib.sha256()
    for rel, path in files:
        digest.update(rel.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
