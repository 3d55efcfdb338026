"""Build a complete NVFlare 2.9 job folder from layered configuration:

    python -m ops.job_builder JOB [--profile NAME_OR_FILE] --out DIR      (custom/ on PYTHONPATH)

Layers, each ``{"meta": {...}, "server": {...}, "client": {...}, "site_resources": {...}}``, merged in order:

1. ``job_configs/base/`` (``meta.json``, ``config_fed_server.json``, ``config_fed_client.json``): what every job has;
2. ``job_configs/<JOB>/job.json``: the job's network, key metric, rounds, trainer settings and resources;
3. a profile, ``job_configs/<JOB>/profiles/<NAME>.json`` or a file: e.g. fewer rounds for the demo.

Merging: objects merge key by key, recursively; ``null`` deletes a key; a list whose items all carry an
``"id"`` (components, workflows, filter chains) merges item by item on ``id`` (a new id is appended,
``{"id": X, "remove": true}`` removes X); any other value replaces the one below it.

From ``provision/project.yml`` (the one list of sites): ``meta.resource_spec`` gives every client site the
job's ``site_resources`` (none when null), and ``min_clients`` (meta and the FedAvg workflow, through the
server config's ``{min_clients}``) defaults to the number of client sites: every site must take part in every
round. A layer may lower ``"server": {"min_clients": N}`` so that the job goes on with fewer sites; a round
waits at most ``server.train_timeout`` seconds for them (see ``check_fault_tolerance``). The job's code is
``custom/*.py`` and the ``custom/hcls`` package; the site's own code (``custom/site_privacy``), the server's
(``custom/job_recovery``), the data generators and this tooling never travel with a job. Pre-trained initial
weights named by the persistor's ``source_ckpt_file_full_name`` as a relative path travel with the job from
``custom/<that path>`` (NVFlare reads a relative name in the job's ``custom/`` folder; an absolute one on the server),
checked against the job's network first (``make pretrain`` writes them: ``ops/pretrain.py``).
"""

import argparse
import importlib
import json
import re
import shutil
import sys
from pathlib import Path

import yaml

from hcls.job_config import persistor_args

REPO = Path(__file__).resolve().parents[2]
JOB_CONFIGS = REPO / "job_configs"
LAYER_KEYS = {"meta", "server", "client", "site_resources"}
REMOVE = "remove"
JOB_PACKAGES = ("hcls",)  # packages of custom/ shipped with every job, besides custom/*.py
# Names that become paths (job_configs/<JOB>/, profiles/<PROFILE>.json, models/<meta name>/): no separators, no '..'.
JOB_NAME = re.compile(r"[a-z0-9_]+")
PROFILE_NAME = re.compile(r"[A-Za-z0-9_-]+")
META_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class BuildError(ValueError):
    pass


def _is_id_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "id" in v for v in value)


def merge(base, overlay, where: str):
    """``overlay`` over ``base`` (see the module docstring); ``where`` names the field in errors."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for key, value in overlay.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = merge(merged[key], value, f"{where}.{key}")
            else:
                merged[key] = merge(None, value, f"{where}.{key}")
        return merged
    if _is_id_list(overlay) and (_is_id_list(base) or base in (None, [])):
        merged = list(base or [])
        for item in overlay:
            ids = [m["id"] for m in merged]
            at = f"{where}[id={item['id']}]"
            if item.get(REMOVE) is True:
                if item["id"] not in ids:
                    raise BuildError(f"{at}: cannot remove it, no such id below (ids: {', '.join(ids) or 'none'})")
                merged.pop(ids.index(item["id"]))
            elif item["id"] in ids:
                merged[ids.index(item["id"])] = merge(merged[ids.index(item["id"])], item, at)
            else:
                merged.append(merge(None, item, at))
        return merged
    if isinstance(overlay, dict):  # a new object: drop its nulls
        return {k: merge(None, v, f"{where}.{k}") for k, v in overlay.items() if v is not None}
    return overlay


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BuildError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise BuildError(f"{path}: invalid JSON: {err}") from None


def read_layer(path: Path) -> dict:
    layer = read_json(path)
    if not isinstance(layer, dict) or not set(layer) <= LAYER_KEYS:
        raise BuildError(f"{path}: expected an object with keys among {', '.join(sorted(LAYER_KEYS))}")
    if "resource_spec" in layer.get("meta", {}):
        raise BuildError(f"{path}: meta.resource_spec comes from site_resources (the same for every site of project.yml)")
    return layer


def base_layer() -> dict:
    base = JOB_CONFIGS / "base"
    files = {"meta": "meta.json", "server": "config_fed_server.json", "client": "config_fed_client.json"}
    return {key: read_json(base / name) for key, name in files.items()}


def profile_path(job: str, profile: str) -> Path:
    path = Path(profile)
    if path.suffix == ".json" and path.is_file():
        return path
    if not PROFILE_NAME.fullmatch(profile):
        raise BuildError(f"PROFILE '{profile}' is not a profile name (letters, digits, _ -) nor an existing .json file")
    named = JOB_CONFIGS / job / "profiles" / f"{profile}.json"
    if not named.is_file():
        known = sorted(p.stem for p in (JOB_CONFIGS / job / "profiles").glob("*.json"))
        raise BuildError(f"no profile '{profile}' for {job} ({named} not found; profiles: {', '.join(known)})")
    return named


def client_sites(project_yml: Path) -> list[str]:
    try:
        project = yaml.safe_load(project_yml.read_text())
        return [p["name"] for p in project["participants"] if p.get("type") == "client"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise BuildError(f"{project_yml}: cannot read the client sites: {err}") from None


def resolve(job: str, profile: str = "", project_yml: Path = REPO / "provision" / "project.yml") -> dict:
    """The merged ``{"meta", "server", "client"}`` of JOB with PROFILE, as the job folder will hold them."""
    if not JOB_NAME.fullmatch(job) or not (JOB_CONFIGS / job / "job.json").is_file():
        jobs = sorted(p.parent.name for p in JOB_CONFIGS.glob("*/job.json"))
        raise BuildError(f"unknown JOB '{job}' (jobs: {', '.join(jobs)})")
    config = base_layer()
    layers = [JOB_CONFIGS / job / "job.json"] + ([profile_path(job, profile)] if profile else [])
    read = {}
    for path in layers:
        read[path] = read_layer(path)
        config = merge(config, read[path], str(path))
    sites = client_sites(project_yml)
    resources = config.pop("site_resources", None)
    meta, server = config["meta"], config["server"]
    name = meta.get("name", job)
    if not isinstance(name, str) or not META_NAME.fullmatch(name):
        raise BuildError(f"meta.name {name!r} of {job} is not a job name: letters, digits, _ - (starting with a letter "
                         "or digit); it names the job on the server and its folder models/<name>/")
    meta["resource_spec"] = {site: resources for site in sites} if resources else {}
    server.setdefault("min_clients", len(sites))
    meta.setdefault("min_clients", server["min_clients"])
    check_fault_tolerance(config, sites, read)
    leftover = [f"{where}" for where in _remove_markers(config, "")]
    if leftover:
        raise BuildError(f"{', '.join(leftover)}: 'remove' of an id that no layer below defines")
    return config


def _set_in(section: str, key: str, layers: dict) -> str:
    """The file that set ``section.key`` last (the layer files, then the base), for error messages."""
    for path in reversed(list(layers)):
        if key in layers[path].get(section, {}):
            return f"{path}: {section}.{key}"
    base = {"server": "config_fed_server.json", "client": "config_fed_client.json"}[section]
    return f"{JOB_CONFIGS / 'base' / base}: {key}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_fault_tolerance(config: dict, sites: list, layers: dict) -> None:
    """How many sites a round needs and how long it waits for them: clear errors naming the file and field.

    ``server.min_clients`` (default: every client site of project.yml) sites must send a result for a round to
    count; ``server.train_timeout`` seconds bound a round (a site that has not answered by then is left out);
    ``client.trainer_heartbeat_timeout`` seconds of silence from a site's trainer (hung, stopped; also while it is
    handed its task) end its task.
    """
    min_clients = config["server"]["min_clients"]
    if not _is_int(min_clients) or not 1 <= min_clients <= len(sites):
        raise BuildError(
            f"{_set_in('server', 'min_clients', layers)} must be an integer from 1 to the {len(sites)} client "
            f"sites of project.yml, got {min_clients!r}"
        )
    for section, key in (("server", "train_timeout"), ("client", "trainer_heartbeat_timeout")):
        value = config[section].get(key)
        if not _is_int(value) or value <= 0:
            raise BuildError(f"{_set_in(section, key, layers)} must be a whole number of seconds > 0, got {value!r}")


def _remove_markers(value, where):
    if isinstance(value, dict):
        if value.get(REMOVE) is True and "id" in value:
            yield f"{where}[id={value['id']}]"
        for key, item in value.items():
            yield from _remove_markers(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _remove_markers(item, f"{where}[{i}]")


def write_job(config: dict, out: Path) -> Path:
    """A complete NVFlare job folder: meta.json, app/config/*.json, app/custom/ (the job's code and pre-trained
    weights it names)."""
    checkpoint = source_checkpoint(config)
    if out.exists():
        shutil.rmtree(out)
    (out / "app" / "config").mkdir(parents=True)
    custom = out / "app" / "custom"
    custom.mkdir()
    (out / "meta.json").write_text(json.dumps(config["meta"], indent=2) + "\n")
    for key, name in (("server", "config_fed_server.json"), ("client", "config_fed_client.json")):
        (out / "app" / "config" / name).write_text(json.dumps(config[key], indent=2) + "\n")
    for script in sorted((REPO / "custom").glob("*.py")):
        shutil.copy(script, custom / script.name)
    for package in JOB_PACKAGES:
        shutil.copytree(REPO / "custom" / package, custom / package, ignore=shutil.ignore_patterns("__pycache__"))
    if checkpoint is not None and not Path(checkpoint).is_absolute():
        (custom / checkpoint).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "custom" / checkpoint, custom / checkpoint)
    return out


def source_checkpoint(config: dict) -> str | None:
    """The persistor's ``source_ckpt_file_full_name`` (pre-trained initial weights), checked: a relative name must
    stay inside custom/ and exist there. BuildError naming the field otherwise."""
    name = persistor_args(config["server"]).get("source_ckpt_file_full_name")
    if name is None or Path(name).is_absolute():
        return name
    where = "server component persistor: args.source_ckpt_file_full_name"
    if ".." in Path(name).parts:
        raise BuildError(f"{where} {name!r}: a relative name may not contain '..'")
    if not (REPO / "custom" / name).is_file():
        raise BuildError(f"{where} {name!r}: no file custom/{name} (the pre-trained weights: a state_dict of the "
                         "job's network, saved with torch.save; make pretrain writes it)")  # fmt: skip
    check_checkpoint(persistor_args(config["server"]).get("model", {}), REPO / "custom" / name, f"{where} {name!r}")
    return name


def check_checkpoint(network: dict, path: Path, where: str) -> None:
    """BuildError naming ``where`` unless ``path`` is a ``state_dict`` with exactly the keys and shapes of
    ``network`` (``{"path", "args"}``): NVFlare's persistor would otherwise fail only when the job starts."""
    import torch  # here: building a job without pre-trained weights needs no torch

    module, _, name = network.get("path", "").rpartition(".")
    expected = getattr(importlib.import_module(module), name)(**network.get("args", {})).state_dict()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several kinds for a file that is not its own
        raise BuildError(f"{where}: {path} is not a state_dict saved with torch.save ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err  # fmt: skip
    if not isinstance(state, dict):
        raise BuildError(f"{where}: {path} holds a {type(state).__name__}, not a state_dict")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)}, the network's {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)]  # fmt: skip
    problems = [f"{len(keys)} {what}, first {keys[0]}" for keys, what in (
        (missing, "of its keys missing"), (unexpected, "keys it does not have"), (shapes, "of another shape")) if keys]
    if problems:
        raise BuildError(f"{where}: {path} does not fit the job's network {network.get('path')}: "
                         f"{'; '.join(problems)}")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("--profile", default="", help="a profile name of the job, or a profile .json file")
    parser.add_argument("--out", type=Path, required=True, help="the job folder to write (replaced)")
    args = parser.parse_args(argv)
    try:
        write_job(resolve(args.job, args.profile), args.out)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
