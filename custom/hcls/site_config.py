"""This site's own configuration: where its data lives and its privacy policy, never the job's.

Deployment renders it into the site's NVFlare ``local/`` folder (``site_config.json``) and names it in the
``HCLS_SITE_CONFIG`` environment variable. Data is read only from the directories it names. Its ``privacy``
policy (minimum dataset size, blocked fields, differential privacy) applies to every job; the site also
enforces it on everything that leaves (``site_privacy``, deployed outside any job).
"""

import os
from pathlib import Path

from hcls.json_files import read_json

SITE_CONFIG_ENV = "HCLS_SITE_CONFIG"


class SiteConfig:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.data = read_json(self.path)

    @classmethod
    def from_env(cls) -> "SiteConfig":
        value = os.environ.get(SITE_CONFIG_ENV)
        if not value:
            raise ValueError(f"environment variable {SITE_CONFIG_ENV} is not set; it must name the site config JSON")
        return cls(Path(value))

    def dataset_dir(self, job_name: str) -> Path:
        """This site's data directory for ``job_name``: ``data_root / datasets[job_name]``."""
        data_root = self.data.get("data_root")
        dataset = self.data.get("datasets", {}).get(job_name)
        if not data_root:
            raise ValueError(f"{self.path}: field 'data_root' is missing or empty")
        if not dataset:
            raise ValueError(f"{self.path}: field 'datasets.{job_name}' is missing or empty")
        data_dir = Path(data_root) / dataset  # an absolute 'dataset' replaces data_root
        if not data_dir.is_dir():
            raise ValueError(f"{self.path}: dataset directory {data_dir} (datasets.{job_name}) does not exist")
        return data_dir

    @property
    def privacy(self) -> dict:
        privacy = self.data.get("privacy")
        if not isinstance(privacy, dict):
            raise ValueError(f"{self.path}: field 'privacy' is missing (the site's privacy policy)")
        return privacy

    @property
    def blocked_fields(self) -> list[str]:
        return list(self.privacy.get("blocked_data_fields", []))

    @property
    def dp_policy(self) -> dict | None:
        """``privacy.differential_privacy`` (epsilon, delta, max_grad_norm) when the site requires DP, else None."""
        dp = self.privacy.get("differential_privacy") or {}
        return dp if dp.get("enabled") else None

    def check_dataset_size(self, job_name: str, n_train: int) -> None:
        """ValueError if ``n_train`` is below ``privacy.min_dataset_size``: the site does not train on fewer."""
        minimum = self.privacy.get("min_dataset_size", 1)
        if n_train < minimum:
            raise ValueError(
                f"{self.path}: privacy.min_dataset_size is {minimum} but dataset {self.dataset_dir(job_name)} "
                f"(datasets.{job_name}) gives {n_train} training samples: this site does not train on fewer"
            )
