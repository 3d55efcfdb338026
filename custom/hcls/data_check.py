"""The data check every trainer offers a site: ``python3 custom/<job>.py --check --config CONFIG`` (with
``HCLS_SITE_CONFIG`` set) prints the trainer's ``check_data(job, site)`` summary as JSON and exits 1 when it
holds errors. Nothing is trained, NVFlare is not imported and the server is not contacted; ``make check-data``
runs it on a site's host (ansible/check_data.yml). A summary names files from the dataset folder on, never a
host path above it nor a patient identifier: the trainers' ``check_data`` see to the data's messages,
``site_message`` to those about the site config itself.
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from hcls.job_config import JobConfig
from hcls.site_config import SiteConfig


def site_message(error: Exception, site: SiteConfig) -> str:
    """An error about the site's configuration, with the site config named by its file name and paths from the
    data root on."""
    message = str(error).replace(str(site.path), site.path.name)
    root = Path(site.data.get("data_root") or "/")
    for prefix in {f"{root}/", f"{root.resolve()}/"}:
        message = message.replace(prefix, "")
    return message


def format_summary(summary: dict) -> str:
    """A summary as JSON, one line per split, label or organ and error."""
    lines = []
    for key, value in summary.items():
        if isinstance(value, dict) and value or isinstance(value, list) and value and isinstance(value[0], dict):
            items = value.items() if isinstance(value, dict) else [(None, item) for item in value]
            inner = [(f"{json.dumps(k)}: " if k is not None else "") + json.dumps(v) for k, v in items]
            brackets = "{}" if isinstance(value, dict) else "[]"
            lines.append(f" {json.dumps(key)}: {brackets[0]}\n  " + ",\n  ".join(inner) + f"\n {brackets[1]}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}"


def main(job_name: str, check_data: Callable[[JobConfig, SiteConfig], dict], argv: list[str]) -> int:
    """``--check --config CONFIG``: print ``check_data``'s summary; 0 when it is ok, 1 when it holds errors."""
    parser = argparse.ArgumentParser(description=f"{job_name}: check this site's data (HCLS_SITE_CONFIG), train nothing")
    parser.add_argument("--check", action="store_true", required=True)
    parser.add_argument("--config", type=Path, required=True, help="the job's client config (with a 'trainer' object)")
    args = parser.parse_args(argv)
    summary = check_data(JobConfig.from_client_config(args.config), SiteConfig.from_env())
    print(format_summary(summary))
    return 0 if summary["ok"] else 1
