"""Every committed configuration is valid and carries the documented production values."""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "custom"))

from hcls_common import build_network_from_spec as build_network  # noqa: E402
from ops.flare_admin import network_spec  # noqa: E402

JOBS = {
    # job: (network class, optimizer, loss, key metric, rounds, GPU GiB per site, parameters in millions)
    "cxr_classification": ("DenseNet121", "Adam", "BCEWithLogitsLoss", "val_auc", 50, 16, 6.97),
    "ct_segmentation": ("SegResNet", "AdamW", "DiceCELoss", "val_mean_dice", 100, 32, 18.8),
    "lung_nodule_detection": ("NoduleRetinaNet", "SGD", "focal", "val_froc", 80, 32, 20.9),
}
SITES = ["hospital_a", "hospital_b"]


def load(path: Path):
    return json.loads(path.read_text())


def component(config: dict, comp_id: str) -> dict:
    return next(c for c in config["components"] if c["id"] == comp_id)


def test_every_json_file_parses():
    files = [p for d in ("job_configs", "site_configs") for p in (REPO / d).rglob("*.json")]
    assert len(files) >= 12
    for path in files:
        assert isinstance(load(path), dict), path


def test_job_folders_are_complete():
    assert sorted(p.name for p in (REPO / "job_configs").iterdir()) == sorted(JOBS)
    for job in JOBS:
        for name in ("meta.json", "config_fed_server.json", "config_fed_client.json"):
            assert (REPO / "job_configs" / job / name).is_file()


@pytest.mark.parametrize("job", JOBS)
def test_meta(job):
    meta = load(REPO / "job_configs" / job / "meta.json")
    gpu_gib = JOBS[job][5]
    assert meta["name"] == job
    assert meta["min_clients"] == 2
    assert meta["deploy_map"] == {"app": ["@ALL"]}
    assert meta["resource_spec"] == {s: {"num_of_gpus": 1, "mem_per_gpu_in_GiB": gpu_gib} for s in SITES}


@pytest.mark.parametrize("job", JOBS)
def test_server_config(job):
    net_cls, _, _, key_metric, rounds, _, _ = JOBS[job]
    server = load(REPO / "job_configs" / job / "config_fed_server.json")
    assert server["format_version"] == 2
    assert server["num_rounds"] == rounds
    assert server["key_metric"] == key_metric
    fedavg, cse = server["workflows"]
    assert fedavg["path"].endswith("ScatterAndGather")
    assert fedavg["args"]["min_clients"] == 2 and fedavg["args"]["num_rounds"] == "{num_rounds}"
    assert cse["path"].endswith("CrossSiteModelEval")
    assert component(server, "aggregator")["path"].endswith("InTimeAccumulateWeightedAggregator")
    assert component(server, "persistor")["path"].endswith("PTFileModelPersistor")
    assert component(server, "model_selector")["args"]["key_metric"] == "{key_metric}"
    assert component(server, "tensorboard")["path"].endswith("TBAnalyticsReceiver")
    assert network_spec(str(REPO / "job_configs" / job))["path"].endswith(net_cls)


@pytest.mark.parametrize("job", JOBS)
def test_client_config(job):
    _, optimizer, loss, _, _, _, _ = JOBS[job]
    client = load(REPO / "job_configs" / job / "config_fed_client.json")
    executor = client["executors"][0]
    assert set(executor["tasks"]) == {"train", "validate", "submit_model"}
    args = executor["executor"]["args"]
    assert args["train_with_evaluation"] is True
    assert (REPO / "custom" / client["app_script"]).name.endswith(".py")
    trainer = client["trainer"]
    assert trainer["optimizer"]["name"] == optimizer
    trainer_loss = trainer.get("loss", {}).get("name") or trainer.get("classification_loss")
    assert trainer_loss == loss


@pytest.mark.parametrize("job", JOBS)
def test_every_class_path_imports(job):
    for name in ("config_fed_server.json", "config_fed_client.json"):
        config = load(REPO / "job_configs" / job / name)
        items = config.get("workflows", []) + config["components"] + [e["executor"] for e in config.get("executors", [])]
        for item in items:
            module, _, cls = item["path"].rpartition(".")
            assert hasattr(importlib.import_module(module), cls), item["path"]


@pytest.mark.parametrize("job", JOBS)
def test_network_is_the_documented_one(job):
    net = build_network(network_spec(str(REPO / "job_configs" / job)))
    params_m = sum(p.numel() for p in net.parameters()) / 1e6
    assert type(net).__name__ == JOBS[job][0]
    assert params_m == pytest.approx(JOBS[job][6], abs=0.05)


def test_ct_network_matches_the_imaging_agent_contract():
    spec = network_spec(str(REPO / "job_configs" / "ct_segmentation"))
    assert spec["args"] == {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 14, "init_filters": 32,
        "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1],
    }  # fmt: skip


def test_cxr_network_has_18_labels():
    spec = network_spec(str(REPO / "job_configs" / "cxr_classification"))
    client = load(REPO / "job_configs" / "cxr_classification" / "config_fed_client.json")
    assert spec["args"]["out_channels"] == len(client["trainer"]["labels"]) == 18


def test_nodule_anchors_match_the_network():
    spec = network_spec(str(REPO / "job_configs" / "lung_nodule_detection"))
    trainer = load(REPO / "job_configs" / "lung_nodule_detection" / "config_fed_client.json")["trainer"]
    assert spec["args"]["num_anchors"] == len(trainer["anchors"]["base_anchor_shapes"])


@pytest.mark.parametrize("profile", sorted((REPO / "job_configs").glob("*/profiles/*.json")), ids=str)
def test_profiles_keep_the_architecture(profile):
    overlay = load(profile)
    assert set(overlay) <= {"meta", "server", "client"}
    if "components" in overlay.get("server", {}):  # a variant (he.json) may swap components, never the network
        base = load(profile.parents[1] / "config_fed_server.json")
        model = component(overlay["server"], "persistor")["args"]["model"]
        if profile.name == "dp.json":  # the DP variant swaps only batch norm and in-place activations (Opacus)
            model = {**model, "args": {k: v for k, v in model["args"].items() if k not in ("norm", "act")}}
        assert model == component(base, "persistor")["args"]["model"]
    assert "network" not in overlay.get("client", {}).get("trainer", {})


@pytest.mark.parametrize("job", JOBS)
def test_sparse_updates_are_wired_and_off_by_default(job):
    client = load(REPO / "job_configs" / job / "config_fed_client.json")
    server = load(REPO / "job_configs" / job / "config_fed_server.json")
    assert client["sparse_update"] == {"enabled": False, "top_k_percent": 10}
    assert client["task_result_filters"] == [
        {"tasks": ["train"], "filters": [{"path": "sparse_update.SparseUpdateEncoder", "args": {}}]}
    ]
    assert server["task_result_filters"] == [
        {"tasks": ["train"], "filters": [{"path": "sparse_update.SparseUpdateDecoder", "args": {}}]}
    ]


def test_he_profile_uses_nvflare_he_components():
    he = load(REPO / "job_configs" / "cxr_classification" / "profiles" / "he.json")
    chains = he["client"]["task_data_filters"] + he["client"]["task_result_filters"]
    paths = [c["path"] for c in he["server"]["components"]] + [f["path"] for c in chains for f in c["filters"]]
    for name in ("HEModelSerializeFilter", "HEModelShareableGenerator", "HEInTimeAccumulateWeightedAggregator",
                 "HEModelDecryptor", "HEModelEncryptor"):  # fmt: skip
        assert any(p.startswith("nvflare.app_opt.he.") and p.endswith(name) for p in paths), name
    assert component(he["server"], "persistor")["args"]["filter_id"] == "serialize_filter"
    assert he["server"]["task_result_filters"] == [] and he["client"]["sparse_update"]["enabled"] is False


def test_no_shipped_config_weakens_mutual_tls():
    shipped = [p for p in REPO.rglob("*") if p.suffix in (".json", ".yml", ".yaml", ".j2")
               and not {".venv", "workspace", "models", ".git"} & set(p.relative_to(REPO).parts)]  # fmt: skip
    assert len(shipped) > 20
    for path in shipped:
        for mode in re.findall(r"connection_security\W+(\w+)", path.read_text()):
            assert mode == "mtls", f"{path}: connection_security {mode}"
    project = yaml.safe_load((REPO / "provision" / "project.yml").read_text())
    assert all("connection_security" not in p for p in project["participants"])  # nvflare's default: mtls


def test_project_yml():
    project = yaml.safe_load((REPO / "provision" / "project.yml").read_text())
    by_type = {}
    for p in project["participants"]:
        by_type.setdefault(p["type"], []).append(p)
    (server,) = by_type["server"]
    assert server["fed_learn_port"] == 8003 and server["admin_port"] == 8103
    assert sorted(c["name"] for c in by_type["client"]) == SITES
    assert {a["role"] for a in by_type["admin"]} == {"project_admin", "org_admin", "lead"}
    for admin in by_type["admin"]:
        user, _, domain = admin["name"].partition("@")
        assert user and "." in domain, admin["name"]
    static = next(b for b in project["builders"] if b["path"].endswith("StaticFileBuilder"))
    assert static["args"]["scheme"] == "grpc"
    assert any(b["path"].endswith("CertBuilder") for b in project["builders"])


def test_site_configs():
    assert (REPO / "site_configs" / "server" / "local_config.json").is_file()
    for site in SITES:
        config = load(REPO / "site_configs" / f"site_{site}" / "local_config.json")
        assert set(config["datasets"]) == set(JOBS)
        privacy = config["privacy"]
        assert privacy["scope"] and privacy["min_dataset_size"] > 0
        assert isinstance(privacy["blocked_data_fields"], list)
        assert set(privacy["differential_privacy"]) == {"enabled", "mechanism", "epsilon", "delta", "max_grad_norm"}


def test_ansible_playbooks_pass_syntax_check():
    for playbook in ("deploy.yml", "control.yml"):
        result = subprocess.run(
            [str(REPO / ".venv" / "bin" / "ansible-playbook"), "--syntax-check", playbook, "-e", "flare_kit_root=/x"],
            cwd=REPO / "ansible", capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
