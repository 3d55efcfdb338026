"""Every job, built with every profile, is a complete NVFlare job with the documented production values;
the layered configuration merges as documented (custom/ops/job_builder.py); each fact has one source."""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "custom"))

from hcls.job_config import JobConfig  # noqa: E402
from ops import job_builder  # noqa: E402

JOBS = {
    # job: (network class, optimizer, loss, key metric, rounds, GPU GiB per site, parameters in millions)
    "cxr_classification": ("DenseNet121", "Adam", "BCEWithLogitsLoss", "val_auc", 50, 16, 6.97),
    "ct_segmentation": ("SegResNet", "AdamW", "DiceCELoss", "val_mean_dice", 100, 32, 18.8),
    "lung_nodule_detection": ("NoduleRetinaNet", "SGD", "focal", "val_froc", 80, 32, 20.9),
}
PROJECT = yaml.safe_load((REPO / "provision" / "project.yml").read_text())
SITES = [p["name"] for p in PROJECT["participants"] if p["type"] == "client"]
PROFILES = sorted((p.parents[1].name, p.stem) for p in (REPO / "job_configs").glob("*/profiles/*.json"))


def load(path: Path):
    return json.loads(path.read_text())


def component(config: dict, comp_id: str) -> dict:
    return next(c for c in config["components"] if c["id"] == comp_id)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build a job folder once per (job, profile); returns its path."""
    root, cache = tmp_path_factory.mktemp("jobs"), {}

    def build(job: str, profile: str = "") -> Path:
        if (job, profile) not in cache:
            config = job_builder.resolve(job, profile)
            persistor = component(config["server"], "persistor")["args"]
            if "source_ckpt_file_full_name" in persistor:  # pre-trained weights (generated, not in git): on the server
                persistor["source_ckpt_file_full_name"] = str(root / persistor["source_ckpt_file_full_name"])
            cache[job, profile] = job_builder.write_job(config, root / f"{job}-{profile}")
        return cache[job, profile]

    return build


def test_every_json_file_parses():
    files = [p for d in ("job_configs", "site_configs") for p in (REPO / d).rglob("*.json")]
    assert len(files) >= 12
    for path in files:
        assert isinstance(load(path), dict), path


def test_the_jobs_are_the_job_configs_with_a_job_json():
    assert sorted(p.parent.name for p in (REPO / "job_configs").glob("*/job.json")) == sorted(JOBS)


@pytest.mark.parametrize("job,profile", [(job, "") for job in JOBS] + PROFILES, ids=str)
def test_every_job_and_profile_builds_a_complete_nvflare_job(built, job, profile):
    folder = built(job, profile)
    meta = load(folder / "meta.json")
    assert meta["name"] == job and meta["deploy_map"] == {"app": ["@ALL"]} and meta["scope"]
    config = JobConfig.from_job_folder(folder)
    assert config.config_dir == folder / "app" / "config"
    assert config.server["format_version"] == config.client["format_version"] == 2
    custom = folder / "app" / "custom"
    assert (custom / config.client["app_script"]).is_file()
    assert (custom / "hcls" / "client_loop.py").is_file()
    assert not {"site_privacy", "datagen", "ops"} & {p.name for p in custom.iterdir()}  # site code never travels
    for item in config.server.get("workflows", []) + config.server["components"] + config.client["components"]:
        module, _, cls = item["path"].rpartition(".")
        sys.path.insert(0, str(custom))
        try:
            assert hasattr(importlib.import_module(module), cls), item["path"]
        finally:
            sys.path.remove(str(custom))
    text = json.dumps([config.server, config.client])
    assert '"remove": true' not in text


@pytest.mark.parametrize("job", JOBS)
def test_production_meta_follows_the_sites_of_project_yml(built, job):
    meta = load(built(job) / "meta.json")
    gpu_gib = JOBS[job][5]
    assert meta["min_clients"] == len(SITES)
    assert meta["resource_spec"] == {s: {"num_of_gpus": 1, "mem_per_gpu_in_GiB": gpu_gib} for s in SITES}
    assert load(built(job, "demo") / "meta.json")["resource_spec"] == {}


@pytest.mark.parametrize("job", JOBS)
def test_production_server_config(built, job):
    net_cls, _, _, key_metric, rounds, _, _ = JOBS[job]
    config = JobConfig.from_job_folder(built(job))
    server = config.server
    assert config.num_rounds == rounds and config.key_metric == key_metric
    assert server["min_clients"] == len(SITES)
    fedavg, cse = server["workflows"]
    assert fedavg["path"] == "hcls.fedavg.FedAvg"  # ScatterAndGather, bounded rounds, continues after a restart
    assert fedavg["args"]["min_clients"] == "{min_clients}" and fedavg["args"]["num_rounds"] == "{num_rounds}"
    assert fedavg["args"]["train_timeout"] == "{train_timeout}" and server["train_timeout"] > 0
    assert cse["path"].endswith("CrossSiteModelEval")
    assert component(server, "aggregator")["path"].endswith("InTimeAccumulateWeightedAggregator")
    assert component(server, "persistor")["path"] == "hcls.fedavg.RoundPersistor"
    assert component(server, "model_selector")["args"]["key_metric"] == "{key_metric}"
    assert component(server, "tensorboard")["path"].endswith("TBAnalyticsReceiver")
    assert config.network["path"].endswith(net_cls)


@pytest.mark.parametrize("job", JOBS)
def test_production_client_config(built, job):
    _, optimizer, loss, _, _, _, _ = JOBS[job]
    config = JobConfig.from_job_folder(built(job))
    executor = config.client["executors"][0]
    assert set(executor["tasks"]) == {"train", "validate", "submit_model"}
    assert executor["executor"]["args"]["train_with_evaluation"] is True
    # one trainer process per job, started again after it was lost: a killed or hung trainer costs its site one round
    assert executor["executor"]["path"] == "hcls.trainer_executor.RelaunchingClientAPIExecutor"
    assert executor["executor"]["args"]["launch_once"] is True
    assert executor["executor"]["args"]["heartbeat_timeout"] == "{trainer_heartbeat_timeout}"
    assert executor["executor"]["args"]["task_wait_timeout"] == "{trainer_heartbeat_timeout}"  # stopped mid-handover
    assert config.client["trainer_heartbeat_timeout"] > 0
    assert config.client["submit_task_result_timeout"] >= 300  # a whole model's result over a hospital's uplink
    assert config.client["app_script"] == f"{job}.py"
    trainer = config.trainer()
    assert trainer["optimizer"]["name"] == optimizer
    assert (trainer.get("loss", {}).get("name") or trainer.get("classification_loss")) == loss


@pytest.mark.parametrize("job", JOBS)
def test_network_is_the_documented_one(built, job):
    sys.path.insert(0, str(REPO / "custom"))
    net = JobConfig.from_job_folder(built(job)).build_network()
    assert type(net).__name__ == JOBS[job][0]
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(JOBS[job][6], abs=0.05)


def test_ct_network_matches_the_imaging_agent_contract(built):
    assert JobConfig.from_job_folder(built("ct_segmentation")).network["args"] == {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 14, "init_filters": 32,
        "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1],
    }  # fmt: skip


def test_cxr_network_has_18_labels(built):
    config = JobConfig.from_job_folder(built("cxr_classification"))
    assert config.network["args"]["out_channels"] == len(config.trainer()["labels"]) == 18


def test_nodule_anchors_match_the_network(built):
    config = JobConfig.from_job_folder(built("lung_nodule_detection"))
    assert config.network["args"]["num_anchors"] == len(config.trainer()["anchors"]["base_anchor_shapes"])


@pytest.mark.parametrize("job,profile", PROFILES, ids=str)
def test_profiles_keep_the_architecture(built, job, profile):
    network = JobConfig.from_job_folder(built(job, profile)).network
    production = JobConfig.from_job_folder(built(job)).network
    if (job, profile) in (("cxr_classification", "dp"), ("lung_nodule_detection", "dp")):  # swap batch norm
        assert network["args"].pop("norm") == ["group", {"num_groups": 32}]  # (Opacus); dp_pretrained freezes it
    # and no in-place activation (Opacus); SegResNet has GroupNorm already; the nodule trainer sets its ReLUs not in
    # place under DP itself (MONAI's ResNet takes no activation for its blocks)
    if profile.startswith("dp") and job != "lung_nodule_detection":
        assert network["args"].pop("act") in (["relu", {"inplace": False}], ["RELU", {"inplace": False}])
    assert network == production


def test_demo_profile_changes_only_what_it_names(built):
    demo = JobConfig.from_job_folder(built("cxr_classification", "demo"))
    production = JobConfig.from_job_folder(built("cxr_classification"))
    assert demo.num_rounds == 5 and demo.trainer()["optimizer"] == {"name": "Adam", "args": {"lr": 0.001}}
    changed = {k for k in production.trainer() if demo.trainer()[k] != production.trainer()[k]}
    assert changed == {"image_size", "optimizer", "batch_size", "num_workers"}
    assert demo.server["components"] == production.server["components"]


@pytest.mark.parametrize("job", JOBS)
def test_sparse_updates_are_wired_and_off_by_default(built, job):
    config = JobConfig.from_job_folder(built(job))
    assert config.client["sparse_update"] == {"enabled": False, "top_k_percent": 10}
    for side, filter_class in ((config.client, "SparseUpdateEncoder"), (config.server, "SparseUpdateDecoder")):
        (chain,) = side["task_result_filters"]
        assert chain["tasks"] == ["train"] and chain["filters"] == [{"path": f"sparse_update.{filter_class}", "args": {}}]


def test_he_profile_uses_nvflare_he_components(built):
    he = JobConfig.from_job_folder(built("cxr_classification", "he"))
    chains = he.client["task_data_filters"] + he.client["task_result_filters"]
    paths = [c["path"] for c in he.server["components"]] + [f["path"] for c in chains for f in c["filters"]]
    for name in ("HEModelSerializeFilter", "HEModelShareableGenerator", "HEInTimeAccumulateWeightedAggregator",
                 "HEModelDecryptor", "HEModelEncryptor"):  # fmt: skip
        assert any(p.startswith("nvflare.app_opt.he.") and p.endswith(name) for p in paths), name
    assert component(he.server, "persistor")["args"]["filter_id"] == "serialize_filter"
    assert component(he.server, "aggregator")["args"] == {"expected_data_kind": "WEIGHT_DIFF", "weigh_by_local_iter": False}
    assert he.server["task_result_filters"] == [] and he.client["sparse_update"]["enabled"] is False
    assert not any("sparse_update" in f["path"] for c in chains for f in c["filters"])
    assert [w["id"] for w in he.server["workflows"]] == ["fedavg"]  # TenSEAL cannot cross-validate ciphertexts
    assert {"model_locator", "cross_site_results"}.isdisjoint(c["id"] for c in he.server["components"])


# ---------------------------------------------------------------- how layers merge


def test_merge_by_id_null_and_remove():
    base = {"components": [{"id": "a", "path": "x.A", "args": {"k": 1, "j": 2}}, {"id": "b", "path": "x.B"}],
            "keep": {"x": 1, "y": 2}, "list": [1, 2]}  # fmt: skip
    overlay = {"components": [{"id": "a", "args": {"k": 3}}, {"id": "b", "remove": True}, {"id": "c", "path": "x.C"}],
               "keep": {"y": None}, "list": [3]}  # fmt: skip
    assert job_builder.merge(base, overlay, "layer") == {
        "components": [{"id": "a", "path": "x.A", "args": {"k": 3, "j": 2}}, {"id": "c", "path": "x.C"}],
        "keep": {"x": 1}, "list": [3],
    }  # fmt: skip
    with pytest.raises(job_builder.BuildError, match=r"layer.components\[id=z\]: cannot remove it, no such id"):
        job_builder.merge(base, {"components": [{"id": "z", "remove": True}]}, "layer")


def test_bad_layers_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"server": {"num_rounds": 3,}}')
    with pytest.raises(job_builder.BuildError, match=rf"{re.escape(str(bad))}: invalid JSON"):
        job_builder.resolve("cxr_classification", str(bad))
    bad.write_text('{"servers": {}}')
    with pytest.raises(job_builder.BuildError, match=rf"{re.escape(str(bad))}: expected an object with keys among"):
        job_builder.resolve("cxr_classification", str(bad))
    bad.write_text('{"server": {"workflows": [{"id": "fedavgg", "remove": true}]}}')
    with pytest.raises(job_builder.BuildError, match=r"server.workflows\[id=fedavgg\]: cannot remove it"):
        job_builder.resolve("cxr_classification", str(bad))
    with pytest.raises(job_builder.BuildError, match="no profile 'nope' for cxr_classification .* profiles: demo, dp, dp_pretrained, he"):
        job_builder.resolve("cxr_classification", "nope")
    with pytest.raises(job_builder.BuildError, match="unknown JOB 'cxr'"):
        job_builder.resolve("cxr")


def test_pre_trained_weights_named_by_a_profile_must_exist_inside_custom(tmp_path):
    for name, message in (("pretrained/no-such-weights.pt", "no file custom/pretrained/no-such-weights.pt"),
                          ("../state/weights.pt", "a relative name may not contain '..'")):  # fmt: skip
        profile = tmp_path / "profile.json"
        profile.write_text(json.dumps({"server": {"components": [
            {"id": "persistor", "args": {"source_ckpt_file_full_name": name}}]}}))  # fmt: skip
        config = job_builder.resolve("cxr_classification", str(profile))
        with pytest.raises(job_builder.BuildError, match=re.escape(
                f"server component persistor: args.source_ckpt_file_full_name {name!r}: {message}")):  # fmt: skip
            job_builder.write_job(config, tmp_path / "job")
        assert not (tmp_path / "job").exists()


def repo_with_weights(tmp_path, monkeypatch, job: str, weights) -> dict:
    """A repository whose custom/ holds the job's package and ``weights`` as pretrained/<job>.pt (torch.save'd, or
    bytes as they are); job_builder reads it. The job's dp_pretrained configuration."""
    repo = tmp_path / "repo"
    (repo / "custom" / "pretrained").mkdir(parents=True)
    (repo / "custom" / "hcls").symlink_to(REPO / "custom" / "hcls")
    path = repo / "custom" / "pretrained" / f"{job}.pt"
    path.write_bytes(weights) if isinstance(weights, bytes) else torch.save(weights, path)
    config = job_builder.resolve(job, "dp_pretrained")
    monkeypatch.setattr(job_builder, "REPO", repo)
    return config


def test_pre_trained_weights_named_relatively_travel_inside_the_job(tmp_path, monkeypatch):
    config = job_builder.resolve("cxr_classification", "dp_pretrained")
    weights = JobConfig.from_job_folder(built_now(config, tmp_path / "unchecked")).build_network().state_dict()
    config = repo_with_weights(tmp_path, monkeypatch, "cxr_classification", weights)
    job = job_builder.write_job(config, tmp_path / "job")
    shipped = torch.load(job / "app" / "custom" / "pretrained" / "cxr_classification.pt", weights_only=True)
    assert shipped.keys() == weights.keys() and all(torch.equal(shipped[k], weights[k]) for k in weights)
    persistor = component(json.loads((job / "app" / "config" / "config_fed_server.json").read_text()), "persistor")
    assert persistor["args"]["source_ckpt_file_full_name"] == "pretrained/cxr_classification.pt"  # NVFlare: in custom/


def built_now(config: dict, out: Path) -> Path:
    """``config`` written as a job folder with its pre-trained weights named by an absolute path (not checked)."""
    config = json.loads(json.dumps(config))
    job_builder.persistor_args(config["server"])["source_ckpt_file_full_name"] = str(out / "weights.pt")
    return job_builder.write_job(config, out)


def test_pre_trained_weights_that_do_not_fit_the_network_are_named_before_the_job_is_built(tmp_path, monkeypatch):
    """Weights of another network, a checkpoint that is not a state_dict, a file torch cannot read: each is an error
    naming the field and the file when the job is built (NVFlare's persistor would fail only at the job's start)."""
    ct = JobConfig.from_job_folder(built_now(job_builder.resolve("ct_segmentation"), tmp_path / "ct"))
    fourteen = job_builder.resolve("cxr_classification")  # NIH ChestX-ray14's outputs, not the job's 18
    job_builder.persistor_args(fourteen["server"])["model"]["args"]["out_channels"] = 14
    fourteen = JobConfig.from_job_folder(built_now(fourteen, tmp_path / "fourteen"))
    field = "server component persistor: args.source_ckpt_file_full_name 'pretrained/cxr_classification.pt'"
    for weights, problem in ((ct.build_network().state_dict(), r"does not fit the job's network monai.networks."
                              r"nets.DenseNet121: \d+ of its keys missing, first features.conv0.weight; \d+ keys it "
                              r"does not have, first convInit.conv.weight$"),
                             (fourteen.build_network().state_dict(), r"does not fit .*: 2 of another shape, first "
                              r"class_layers.out.weight \(14, 1024\), the network's \(18, 1024\)$"),
                             ({"epoch": 3, "model": {}}, "does not fit .*; 2 keys it does not have, first epoch$"),
                             ([1, 2], "holds a list, not a state_dict"),
                             (b"not a checkpoint", "is not a state_dict saved with torch.save")):  # fmt: skip
        config = repo_with_weights(tmp_path / str(len(problem)), monkeypatch, "cxr_classification", weights)
        with pytest.raises(job_builder.BuildError, match=re.escape(field) + ": .*cxr_classification.pt " + problem):
            job_builder.write_job(config, tmp_path / "job")
        assert not (tmp_path / "job").exists()


def test_fewer_sites_is_a_job_option_and_bad_fault_settings_are_named(tmp_path):
    fewer = tmp_path / "fewer.json"
    fewer.write_text('{"server": {"min_clients": 1, "train_timeout": 90}}')
    config = job_builder.resolve("cxr_classification", str(fewer))
    assert config["server"]["min_clients"] == config["meta"]["min_clients"] == 1
    assert config["server"]["train_timeout"] == 90
    for layer, message in (
        ({"server": {"min_clients": len(SITES) + 1}}, f"server.min_clients must be an integer from 1 to the {len(SITES)} "),
        ({"server": {"min_clients": 0}}, "server.min_clients must be an integer from 1"),
        ({"server": {"train_timeout": 0}}, "server.train_timeout must be a whole number of seconds > 0, got 0"),
        ({"client": {"trainer_heartbeat_timeout": "60"}}, "client.trainer_heartbeat_timeout must be a whole number"),
    ):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(layer))
        with pytest.raises(job_builder.BuildError, match=rf"{re.escape(str(bad))}: {re.escape(message)}"):
            job_builder.resolve("cxr_classification", str(bad))


def test_build_job_script_prints_the_folder(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HCLS_WORKSPACE": str(tmp_path)}
    out = subprocess.run([REPO / "scripts" / "build_job.sh", "ct_segmentation", "demo"], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    assert out == str(tmp_path / "jobs" / "ct_segmentation")
    assert JobConfig.from_job_folder(Path(out)).num_rounds == 5
    bad = subprocess.run([REPO / "scripts" / "build_job.sh", "ct_segmentation", "nope"], env=env, capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode == 1 and "error: no profile 'nope' for ct_segmentation" in bad.stderr


# ---------------------------------------------------------------- one source for each fact


def tracked_sources() -> list[Path]:
    """Committed and new files that configure or run the federation (not tests, not prose)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    return [REPO / f for f in listed if not f.startswith("tests/") and not f.endswith(".md") and (REPO / f).is_file()]


def files_containing(pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return sorted(str(p.relative_to(REPO)) for p in tracked_sources() if regex.search(p.read_text(errors="replace")))


@pytest.mark.parametrize("job", JOBS)
def test_key_metric_network_and_rounds_have_one_source(job):
    _, _, _, key_metric, rounds, _, _ = JOBS[job]
    source = [f"job_configs/{job}/job.json"]
    # The sites' default allow-list of metric names (site_privacy.structure.DEFAULT_ALLOWED_METRICS) is a second
    # place on purpose: a site must allow a renamed key metric before results under that name may leave it.
    assert files_containing(rf'"{key_metric}"') == sorted([*source, "custom/site_privacy/structure.py"])
    assert files_containing(rf'"num_rounds":\s*{rounds}\b') == source
    network = job_builder.resolve(job)["server"]["components"][0]["args"]["model"]
    assert files_containing(re.escape(f'"{network["path"]}"')) == source
    for arg, value in network["args"].items():  # the value of every network argument, as JSON (lists on one line)
        holders = files_containing(rf'"{arg}":\s*' + re.escape(json.dumps(value)))
        assert source[0] in holders and all(f.startswith("job_configs/") for f in holders), (arg, holders)


def test_ports_and_site_names_have_one_source():
    server = next(p for p in PROJECT["participants"] if p["type"] == "server")
    for port in (server["fed_learn_port"], server["admin_port"]):
        assert files_containing(rf"\b{port}\b") == ["provision/project.yml"], port
    for site in SITES:
        # project.yml lists the sites; the production inventory is an example that operators edit host by host
        assert set(files_containing(rf"\b{site}\b")) <= {"provision/project.yml",
                                                         "ansible/inventories/production/hosts.yml"}, site  # fmt: skip


def test_constraints_pin_every_requirement_at_its_chosen_version():
    """constraints.txt (make lock) pins the whole venv; what requirements*.txt choose it pins at the same version."""
    def pins(path: Path) -> dict:
        lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
        return {re.sub(r"\[.*\]", "", name).lower().replace("_", "-"): version
                for name, _, version in (line.partition("==") for line in lines if line)}  # fmt: skip
    locked = pins(REPO / "constraints.txt")
    assert all(locked.values()), "constraints.txt: every line is name==version"
    for requirements in ("requirements.txt", "requirements-coordinator.txt"):
        for name, version in pins(REPO / requirements).items():
            assert name in locked, f"{requirements}: {name} is not in constraints.txt (make lock)"
            assert version in ("", locked[name]), f"{requirements}: {name}=={version}, constraints.txt: {locked[name]}"


# ---------------------------------------------------------------- federation and sites


def test_no_shipped_config_weakens_mutual_tls():
    shipped = [p for p in REPO.rglob("*") if p.suffix in (".json", ".yml", ".yaml", ".j2")
               and not {".venv", "workspace", "models", ".git"} & set(p.relative_to(REPO).parts)]  # fmt: skip
    assert len(shipped) > 20
    for path in shipped:
        for mode in re.findall(r"connection_security\W+(\w+)", path.read_text()):
            assert mode == "mtls", f"{path}: connection_security {mode}"
    assert all("connection_security" not in p for p in PROJECT["participants"])  # nvflare's default: mtls


def test_project_yml():
    by_type = {}
    for p in PROJECT["participants"]:
        by_type.setdefault(p["type"], []).append(p)
    (server,) = by_type["server"]
    assert server["fed_learn_port"] == 8003 and server["admin_port"] == 8103
    assert len(SITES) >= 2
    assert {a["role"] for a in by_type["admin"]} == {"project_admin", "org_admin", "lead"}
    for admin in by_type["admin"]:
        user, _, domain = admin["name"].partition("@")
        assert user and "." in domain, admin["name"]
    static = next(b for b in PROJECT["builders"] if b["path"].endswith("StaticFileBuilder"))
    assert static["args"]["scheme"] == "grpc"
    assert any(b["path"].endswith("CertBuilder") for b in PROJECT["builders"])
    # a task request lost in a cut link is asked again after communication_timeout (NVFlare's default: 300 s);
    # written into the kits after StaticFileBuilder and before SignatureBuilder signs them
    paths = [b["path"].rsplit(".", 1)[-1] for b in PROJECT["builders"]]
    comm = paths.index("ClientCommunicationBuilder")
    assert paths.index("StaticFileBuilder") < comm < paths.index("SignatureBuilder")
    assert 0 < PROJECT["builders"][comm]["args"]["communication_timeout"] <= 60


def test_every_site_of_project_yml_has_a_site_config():
    assert (REPO / "site_configs" / "server" / "local_config.json").is_file()
    assert sorted(p.name for p in (REPO / "site_configs").glob("site_*")) == sorted(f"site_{s}" for s in SITES)
    for site in SITES:
        config = load(REPO / "site_configs" / f"site_{site}" / "local_config.json")
        assert set(config["datasets"]) == set(JOBS)
        privacy = config["privacy"]
        assert privacy["scope"] and privacy["min_dataset_size"] > 0
        assert isinstance(privacy["blocked_data_fields"], list)
        assert set(privacy["differential_privacy"]) == {"enabled", "mechanism", "epsilon", "delta", "max_grad_norm"}


def test_ansible_playbooks_pass_syntax_check():
    for playbook in ("deploy.yml", "control.yml", "doctor.yml"):
        result = subprocess.run(
            [str(REPO / ".venv" / "bin" / "ansible-playbook"), "--syntax-check", playbook, "-e", "flare_kit_root=/x"],
            cwd=REPO / "ansible", capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
