"""The site's structural egress filter (issue 13, item 3) on real objects: NVFlare DXO shareables through the
site's own filter class (``site_privacy.components.SitePolicyFilter``) at a site workspace with a real
``local/site_config.json`` and generated CheXpert manifests. Each hostile test tries one way of getting an
identifier or free data past the site; the legitimate results of the project's jobs must still pass."""

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import EventScope, FLContextKey, ReturnCode
from nvflare.apis.shareable import Shareable
from nvflare.widgets.fed_event import FedEventHeader

CUSTOM = Path(__file__).resolve().parents[2] / "custom"
sys.path.insert(0, str(CUSTOM))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sparse_update  # noqa: E402
from datagen import cxr as datagen  # noqa: E402
from site_privacy import components  # noqa: E402
from site_privacy.components import BLOCKED, OutgoingEventGuard, SitePolicyFilter  # noqa: E402
from site_privacy.policy import parse_policy  # noqa: E402
from test_site_privacy import GLOBAL_MODEL, POLICY, job_context, receive_global_model  # noqa: E402

DP_META = {"dp_epsilon": 5.5, "dp_delta": 1e-5, "dp_max_grad_norm": 1.0, "dp_noise_multiplier": 1.1,
           "dp_sample_rate": 0.25, "dp_steps": 12}  # as hcls.dp_sgd.Accounting writes it


def make_site(root: Path, extra_config: dict | None = None) -> Path:
    """A site workspace with CXR data (12 training studies, identifiers in its CSVs) and a CT dataset whose
    manifest has no identifiers (12 training cases)."""
    datagen.generate(root / "data" / "chexpert", n_train=12, n_val=4, seed=3, size=32)
    (root / "data" / "ct").mkdir(parents=True)
    (root / "data" / "ct" / "dataset.json").write_text(json.dumps({"training": [{"image": f"{i}"} for i in range(12)]}))
    (root / "local").mkdir()
    (root / "startup").mkdir()
    config = {"data_root": str(root / "data"), "datasets": {"cxr_classification": "chexpert", "ct_segmentation": "ct"}}
    (root / "local" / "site_config.json").write_text(json.dumps({**config, **(extra_config or {})}))
    return root


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return make_site(tmp_path_factory.mktemp("egress_site"))


@pytest.fixture(scope="module")
def patient(site) -> dict:
    with open(site / "data" / "chexpert" / "train.csv", newline="") as f:
        return next(csv.DictReader(f))


def send(site_root, shareable, policy=POLICY, global_model=None, **context):
    ctx = job_context(site_root, policy, **context)
    receive_global_model(ctx, global_model)
    return SitePolicyFilter().process(shareable, ctx)


def result(kind=DataKind.WEIGHT_DIFF, data=None, **meta) -> Shareable:
    if data is None:
        data = {"features.conv0.weight": np.full((2, 2), 0.01, dtype=np.float32)}
    return DXO(kind, data=data, meta=meta).to_shareable()


def train_result(metrics=None, params=None, **meta) -> Shareable:
    return result(data=params, initial_metrics=metrics or {"val_auc": 0.61}, NUM_STEPS_CURRENT_ROUND=4, **meta)


def assert_blocked(reply, *parts, never=()):
    code = reply.get_return_code()
    assert code.startswith(f"{BLOCKED} by hospital_a: "), code
    assert "DXO" not in reply  # nothing of the result leaves
    for part in parts:
        assert part in code, code
    for text in never:
        assert text.lower() not in code.lower(), code


# ------------------------------------------------------------ identifiers however they are written


def hostile(patient: dict, encoding: str) -> tuple[Shareable, str]:
    """A train result carrying one identifier of ``patient`` in one hostile encoding; the field it is."""
    pid, birth = patient["PatientID"], patient["PatientBirthDate"]
    last, first = patient["PatientName"].split("^")
    number = pid.split("-")[1].lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    y, m, d = birth[:4], birth[4:6], birth[6:]
    return {
        "lower_cased_id": (train_result({"val_auc": 0.6, f"val_auc_{pid.lower()}": 0.6}), "PatientID"),
        "id_without_prefix": (train_result({"val_auc": 0.6, f"val_auc_{number}": 0.6}), "PatientID"),
        "id_with_leading_zeros": (train_result({"val_auc": 0.6, f"val_auc_000{number}": 0.6}), "PatientID"),
        "char_code_list": (train_result(note=[ord(c) for c in pid]), "PatientID"),
        "char_code_array": (train_result(codes=np.array([ord(c) for c in pid.lower()], dtype=np.int64)), "PatientID"),
        "reordered_name": (train_result({"val_auc": 0.6, f"val_auc_{first}_{last}".lower(): 0.6}), "PatientName"),
        "name_concatenated": (train_result({f"{first.upper()}{last}": 0.6}), "PatientName"),
        "birth_date_as_number": (train_result({"val_auc": float(birth)}), "PatientBirthDate"),  # a valid metric
        "birth_date_iso": (train_result({"val_auc": 0.6, f"{y}-{m}-{d}": 0.1}), "PatientBirthDate"),
        "birth_date_european": (train_result({"val_auc": 0.6, f"{d}/{m}/{y}": 0.1}), "PatientBirthDate"),
        "birth_date_us_unpadded": (train_result({"val_auc": 0.6, f"{int(m)}/{int(d)}/{y}": 0.1}), "PatientBirthDate"),
    }[encoding]


@pytest.mark.parametrize(
    "encoding",
    ["lower_cased_id", "id_without_prefix", "id_with_leading_zeros", "char_code_list", "char_code_array",
     "reordered_name", "name_concatenated", "birth_date_as_number", "birth_date_iso", "birth_date_european",
     "birth_date_us_unpadded"],
)  # fmt: skip
def test_an_identifier_in_another_encoding_is_blocked(site, patient, encoding):
    shareable, field = hostile(patient, encoding)
    birth = patient["PatientBirthDate"]
    never = [patient["PatientID"], patient["PatientID"].split("-")[1], *patient["PatientName"].split("^"), birth]
    assert_blocked(send(site, shareable), f"a value of blocked field {field} (train.csv)", never=never)


def test_an_identifier_spelt_in_a_parameter_tensor_is_blocked(site, patient):
    """Character codes as the float values of a real parameter of the right shape and dtype."""
    pid = patient["PatientID"]
    model = {**GLOBAL_MODEL, "class_layers.out.bias": np.zeros(len(pid), np.float32)}
    params = {"class_layers.out.bias": np.array([ord(c) for c in pid], np.float32)}
    assert_blocked(send(site, train_result(params=params), global_model=model), "PatientID (train.csv)", never=[pid])


def test_a_job_calling_itself_by_another_jobs_name_is_checked_against_the_sites_data(site, patient):
    """The CXR job's code (approved as cxr_classification) claims to be ct_segmentation, whose dataset has no
    identifiers: the site checks it as the job it approved, and matches the identifiers of every dataset it holds."""
    shareable = train_result({"val_auc": 0.6, f"val_auc_{patient['PatientID']}": 0.6})
    reply = send(site, shareable, job="ct_segmentation", approved_as="cxr_classification")
    assert_blocked(reply, "a value of blocked field PatientID (train.csv)")


# ------------------------------------------------------------ structure: parameters


@pytest.mark.parametrize(
    "params, reason",
    [
        ({"features.conv0.weight": np.zeros((2, 2), np.float32), "extra.secret": np.zeros(2, np.float32)},
         "parameter #1 of the result is not in the global model's state_dict"),
        ({"features.conv0.weight": np.zeros((4, 1), np.float32)}, "has shape (4, 1), the global model's is (2, 2)"),
        ({"features.conv0.weight": np.array([["a", "b"], ["c", "d"]], dtype=object)},
         "has dtype object, not a number array (the global model's is float32)"),
        ({"features.conv0.weight": np.array([["ab", "b"], ["c", "d"]])}, "has dtype str"),
        ({"features.conv0.weight": np.zeros((2, 2), bool)}, "has dtype bool"),
        ({"features.conv0.weight": np.zeros((2, 2), np.complex64)}, "has dtype complex64"),
        ({"features.conv0.weight": [[0.0, 0.0], [0.0, 0.0]]}, "is not a numpy array"),
        ({"features.conv0.weight": b"\x00\x01"}, "is not a numpy array"),  # bytes only for HE ciphertext
        ({"features.norm0.num_batches_tracked": np.zeros(1, np.int64)}, "has shape (1,), the global model's is ()"),
        ({"features.norm0.num_batches_tracked": np.zeros((), np.float64), "features.norm0.running_mean": np.zeros(3)},
         "parameter features.norm0.running_mean has shape (3,), the global model's is (2,)"),
    ],
    ids=["extra_tensor", "changed_shape", "object_array", "string_array", "bool_array", "complex_array", "list",
         "bytes", "counter_shape", "second_tensor_shape"],
)  # fmt: skip
def test_parameters_outside_the_global_models_structure_are_blocked(site, params, reason):
    assert_blocked(send(site, train_result(params=params)), reason, never=["extra.secret"])


def test_integer_buffers_and_floats_are_interchangeable_shapes_are_not(site):
    """Issue found in the real federation: BatchNorm's num_batches_tracked is int64 in the trainer's state_dict
    but float once the server averaged it, and the Client API's diff of the two is float. Either way round
    passes (both are numbers); the kind of a tensor is not a channel the check needs to close."""
    float_counter_model = {**GLOBAL_MODEL, "features.norm0.num_batches_tracked": np.array(3.0, np.float32)}
    int_diff = train_result(params={"features.norm0.num_batches_tracked": np.array(1, np.int64),
                                    "features.conv0.weight": np.ones((2, 2), np.int32)})  # fmt: skip
    passes(send(site, int_diff, global_model=float_counter_model), int_diff)
    float_diff = train_result(params={"features.norm0.num_batches_tracked": np.array(1.0, np.float64)})
    passes(send(site, float_diff), float_diff)  # the recorded counter is int64
    unsigned = train_result(params={"class_layers.out.bias": np.ones(3, np.uint8)})
    passes(send(site, unsigned), unsigned)


def test_a_result_before_any_global_model_is_blocked(site):
    ctx = job_context(site, POLICY)
    assert_blocked(SitePolicyFilter().process(train_result(), ctx), "has not received this job's global model")


def test_the_first_global_model_is_kept_a_later_one_cannot_widen_it(site):
    ctx = job_context(site, POLICY)
    receive_global_model(ctx)
    receive_global_model(ctx, {**GLOBAL_MODEL, "extra.secret": np.zeros(2, np.float32)})
    params = {"extra.secret": np.zeros(2, np.float32)}
    assert_blocked(SitePolicyFilter().process(train_result(params=params), ctx), "not in the global model")


def test_the_structure_is_recorded_from_the_task_data_event_and_survives_a_new_job_process(site):
    """Without a task data filter in the scope: the scope's event guard sees each task's data before the job's
    filters (BEFORE_TASK_DATA_FILTER); the record is kept on disk for a job process started again."""
    ctx = job_context(site, POLICY)
    ctx.set_prop(FLContextKey.TASK_DATA, DXO(DataKind.WEIGHTS, data=dict(GLOBAL_MODEL)).to_shareable(), private=True)
    OutgoingEventGuard().handle_event(EventType.BEFORE_TASK_DATA_FILTER, ctx)
    components._structures.clear()  # a new job process
    assert SitePolicyFilter().process(train_result(), ctx).get_return_code() == ReturnCode.OK
    wrong = train_result(params={"features.conv0.weight": np.zeros(3, np.float32)})
    assert_blocked(SitePolicyFilter().process(wrong, ctx), "has shape (3,)")


def test_nothing_beside_kind_data_and_meta_leaves(site):
    shareable = train_result()
    shareable["DXO"]["note"] = 42.0
    assert_blocked(send(site, shareable), "entries other than kind, data and meta")
    shareable = train_result()
    shareable["smuggled"] = 1.0
    assert_blocked(send(site, shareable), "1 entries beside its DXO")


# ------------------------------------------------------------ structure: metrics and meta


@pytest.mark.parametrize(
    "metrics, reason",
    [
        ({"val_auc": "0.61 good"}, "metric val_auc of meta initial_metrics is not a number"),
        ({"val_auc": np.array([0.5, 0.6])}, "is not a number"),
        ({"val_auc": np.array(math.nan)}, "is not a number"),  # only scalars are dropped when not finite
        ({"val_auc": True}, "is not a number"),
        ({"val_auc": 0.6, "val_secret_channel": 0.1}, "metric #1 of meta initial_metrics has a name outside"),
        ({"val_auc": 0.6, "val_secret_channel": math.nan}, "metric #1 of meta initial_metrics has a name outside"),
    ],
    ids=["string", "array", "nan_array", "bool", "undeclared_name", "undeclared_nan"],
)
def test_metrics_must_be_finite_numbers_under_allowed_names(site, metrics, reason):
    assert_blocked(send(site, train_result(metrics)), reason, never=["secret_channel", "good"])
    in_metrics_data = reason.replace("meta initial_metrics", "the METRICS data")
    assert_blocked(send(site, result(DataKind.METRICS, data=metrics)), in_metrics_data)


@pytest.mark.parametrize(
    "meta, reason",
    [
        ({"note": 1.0}, "meta key #2 is not one the site allows"),
        ({"NUM_STEPS_CURRENT_ROUND": "four"}, "meta NUM_STEPS_CURRENT_ROUND is not a finite number"),
        ({"dp_epsilon": "1.5 (free text)"}, "meta dp_epsilon is not a finite number"),
        ({"dp_epsilon": math.nan}, "meta dp_epsilon is not a finite number"),
        ({"PROCESSED_ALGORITHM": "any text"}, "meta PROCESSED_ALGORITHM is not one of CKKS"),
        ({"validate_type": "x"}, "meta validate_type is not one of"),
    ],
    ids=["unknown_key", "string_steps", "string_dp", "nan_dp", "free_enum", "free_validate_type"],
)
def test_meta_only_allowed_keys_with_numeric_values(site, meta, reason):
    shareable = result(initial_metrics={"val_auc": 0.6}, **{"NUM_STEPS_CURRENT_ROUND": 4, **meta})
    assert_blocked(send(site, shareable), reason, never=["note", "free text", "any text"])


@pytest.mark.parametrize("bad", [math.nan, -math.inf, np.float32("nan"), np.float64("inf")], ids=repr)
def test_a_non_finite_metric_is_dropped_with_a_log_line_and_the_rest_is_sent(site, bad, caplog):
    """Tiny data can leave an AUC undefined: a NaN carries no patient data, so the metric is dropped from the
    result (and the site logs which one), not the whole result blocked; NVFlare's model selector skips a
    missing key metric as it skips a NaN."""
    ct = train_result({"val_mean_dice": 0.3, "val_dice_spleen": bad, "val_dice_liver": 0.2})
    with caplog.at_level("WARNING"):
        passes(send(site, ct, job="ct_segmentation"), ct)
    assert ct["DXO"]["meta"]["initial_metrics"] == {"val_mean_dice": 0.3, "val_dice_liver": 0.2}
    assert "privacy policy: dropped metric val_dice_spleen from the 'train' result of job" in caplog.text
    validate = result(DataKind.METRICS, data={"val_auc": bad})
    passes(send(site, validate, task="validate"), validate)
    assert validate["DXO"]["data"] == {}
    only_nan = train_result({"val_auc": bad})
    passes(send(site, only_nan), only_nan)
    assert only_nan["DXO"]["meta"]["initial_metrics"] == {}
    dp_nan = train_result(dp_epsilon=bad)  # DP accounting is not a metric: not a finite number, blocked
    assert_blocked(send(site, dp_nan), "meta dp_epsilon is not a finite number")


def test_the_site_sets_the_allowed_metric_names_not_the_job(site):
    policy = {**POLICY, "allowed_metrics": ["val_froc"]}
    assert send(site, train_result({"val_froc": 0.4}), policy).get_return_code() == ReturnCode.OK
    assert_blocked(send(site, train_result({"val_auc": 0.4}), policy), "outside the site's allowed_metrics (val_froc)")
    with pytest.raises(ValueError, match="allowed_metrics must be a list of metric names"):
        parse_policy({**POLICY, "allowed_metrics": "val_auc"}, "local/privacy.json")


# ------------------------------------------------------------ what the project's jobs send still passes


def passes(reply, shareable):
    assert reply.get_return_code() == ReturnCode.OK, reply.get_return_code()
    assert reply is shareable


def test_legitimate_train_results_pass(site):
    diff = {name: np.full_like(value, 1) for name, value in GLOBAL_MODEL.items()}  # every tensor, int counter too
    shareable = train_result({"val_auc": 0.61}, params=diff)
    passes(send(site, shareable), shareable)
    weights = result(DataKind.WEIGHTS, data=dict(GLOBAL_MODEL), initial_metrics={"val_auc": 0.5})
    passes(send(site, weights), weights)
    ct = train_result({"val_mean_dice": 0.3, "val_dice_spleen": 0.4, "val_dice_liver": 0.2})
    passes(send(site, ct, job="ct_segmentation"), ct)


def test_validate_and_submit_model_results_pass(site):
    metrics = result(DataKind.METRICS, data={"val_auc": np.float32(0.7)})
    passes(send(site, metrics, task="validate"), metrics)
    best = result(DataKind.WEIGHTS, data=dict(GLOBAL_MODEL))
    passes(send(site, best, task="submit_model"), best)
    best_dp = result(DataKind.WEIGHTS, data=dict(GLOBAL_MODEL), **DP_META)
    passes(send(site, best_dp, task="submit_model"), best_dp)


def test_a_dp_result_passes_with_its_accounting(site):
    dp_on = {**POLICY, "differential_privacy": {**POLICY["differential_privacy"], "enabled": True}}
    shareable = train_result(**DP_META)
    passes(send(site, shareable, dp_on), shareable)


def test_the_sparse_update_encoding_passes_and_a_forged_one_does_not(site):
    model = {"features.conv0.weight": np.zeros((20, 10), np.float32), "bias": np.zeros(3, np.float32)}
    sent, _ = sparse_update.sparsify(np.random.default_rng(0).normal(size=(20, 10)).astype(np.float32), 10)
    assert isinstance(sent, dict)
    meta = {sparse_update.META_KEY: 10.0}
    shareable = train_result(params={"features.conv0.weight": sent, "bias": np.ones(3, np.float32)}, **meta)
    passes(send(site, shareable, global_model=model), shareable)
    forged = {**sent, "shape": [200]}
    bad = train_result(params={"features.conv0.weight": forged}, **meta)
    assert_blocked(send(site, bad, global_model=model), "sparse shape (200,) is not the global model's (20, 10)")
    unsorted = {**sent, "indices": sent["indices"][::-1].copy()}
    bad = train_result(params={"features.conv0.weight": unsorted}, **meta)
    assert_blocked(send(site, bad, global_model=model), "sparse indices must be increasing positions")
    no_meta = train_result(params={"features.conv0.weight": sent})  # a dict where a tensor belongs
    assert_blocked(send(site, no_meta, global_model=model), "is not a numpy array")


def test_he_ciphertexts_pass_only_where_the_meta_says_encrypted(site):
    """HE (PROFILE=he): the server sends ciphertext, which the site records as names only; an encrypted result
    carries bytes for the tensors NVFlare's encryptor lists in PROCESSED_KEYS."""
    encrypted_model = {name: b"\x00ciphertext" for name in GLOBAL_MODEL}
    he = {"PROCESSED_ALGORITHM": "CKKS", "PROCESSED_KEYS": {"features.conv0.weight": True}}
    shareable = train_result(params={"features.conv0.weight": b"\x01\x02"}, **he)
    passes(send(site, shareable, global_model=encrypted_model), shareable)
    plain = train_result(params={"features.conv0.weight": np.ones((5, 5), np.float32)})
    passes(send(site, plain, global_model=encrypted_model), plain)  # shapes unknown, dtype still checked
    not_listed = train_result(params={"class_layers.out.bias": b"\x01"}, **he)
    assert_blocked(send(site, not_listed, global_model=encrypted_model), "is not a numpy array")


# ------------------------------------------------------------ events streamed to the server


def test_an_event_with_a_lower_cased_patient_id_is_stopped(site, patient):
    ctx = job_context(site, POLICY)
    event = Shareable()
    event["DXO"] = {"kind": "ANALYTIC", "data": {"track_key": f"val_auc_{patient['PatientID'].lower()}"}, "meta": {}}
    ctx.set_prop(FLContextKey.EVENT_DATA, event, private=True, sticky=False)
    ctx.set_prop(FLContextKey.EVENT_SCOPE, EventScope.FEDERATION, private=True, sticky=False)
    OutgoingEventGuard().handle_event("fed.analytix_log_stats", ctx)
    assert event.get_header(FedEventHeader.DIRECTION) == "blocked"


def test_results_as_nvflares_client_api_builds_them_pass(site):
    """The trainer's FLModel -> shareable conversion (NVFlare's FLModelUtils), as client_loop sends them."""
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    diff = {name: np.ones_like(value) for name, value in GLOBAL_MODEL.items()}
    sent = [
        ("train", FLModel(params_type=ParamsType.DIFF, params=diff, metrics={"val_auc": 0.6}, current_round=1,
                          meta={"NUM_STEPS_CURRENT_ROUND": 3, **DP_META})),
        ("validate", FLModel(metrics={"val_auc": 0.55})),
        ("submit_model", FLModel(params=dict(GLOBAL_MODEL), meta={})),
    ]  # fmt: skip
    for task, model in sent:
        shareable = FLModelUtils.to_shareable(model)
        passes(send(site, shareable, task=task), shareable)
    forged = FLModelUtils.to_shareable(FLModel(metrics={"val_auc": 0.5}, meta={"comment": "free text"}))
    assert_blocked(send(site, forged, task="validate"), "meta key #0 is not one the site allows", never=["free text"])


def test_headers_the_trainer_writes_are_checked(site, patient):
    """The trainer process builds the whole shareable: round headers must be numbers, and no header value may
    carry an identifier; NVFlare's own headers (task, uuids, the server's context) pass."""
    shareable = train_result()
    shareable.set_header("current_round", 3)
    shareable.set_header("__task_id__", "3f2b8c1e-1942-0703-8220-095aaaaaaaaa")
    shareable.set_header("__workflow__", "scatter_and_gather")
    passes(send(site, shareable), shareable)
    forged = train_result()
    forged.set_header("current_round", "3 and some text")
    assert_blocked(send(site, forged), "header current_round is not a round number", never=["some text"])
    leaking = train_result()
    leaking.set_header("__note__", patient["PatientID"].lower())
    assert_blocked(send(site, leaking), "a value of blocked field PatientID (train.csv) at /headers/#", never=["note"])


# ------------------------------------------------------------ the deployed scope, through NVFlare's own filter chain


def rendered_privacy_json(site_name: str = "hospital_a") -> str:
    """``local/privacy.json`` as deployment writes it: the role's template rendered by Ansible's own templar with
    the site's config and the local inventory's demo override."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar, trust_as_template

    repo = CUSTOM.parent
    template = repo / "ansible" / "roles" / "flare_participant" / "templates" / "privacy.json.j2"
    site = json.loads((repo / "site_configs" / f"site_{site_name}" / "local_config.json").read_text())
    variables = {"__site": site, "flare_participant_privacy": {"min_dataset_size": 2}}
    return Templar(loader=DataLoader(), variables=variables).template(trust_as_template(template.read_text()))


def test_the_deployed_scope_records_the_model_and_checks_results_through_nvflares_filter_chain(tmp_path, patient):
    """The rendered privacy.json, loaded by NVFlare's own privacy configer, installs SitePolicyFilter as the scope's
    task data filter (in) and task result filter (out); NVFlare's apply_filters (what its ClientRunner calls)
    then records the server's model on the way in and lets a legitimate result out, blocking hostile ones."""
    from nvflare.apis.fl_constant import FilterKey
    from nvflare.apis.utils.task_utils import apply_filters
    from nvflare.private.fed.app.fl_conf import create_privacy_manager
    from nvflare.private.privacy_manager import Scope

    root = make_site(tmp_path / "site")
    (root / "local" / "privacy.json").write_text(rendered_privacy_json())
    properties = json.loads((root / "local" / "privacy.json").read_text())["scopes"][0]["properties"]
    ctx = job_context(root, properties)
    scope = create_privacy_manager(ctx.get_engine().get_workspace(), names_only=False).get_scope("hospital_policy")
    assert [type(f).__name__ for f in scope.task_data_filters[FilterKey.IN]] == ["SitePolicyFilter"]
    assert [type(f).__name__ for f in scope.task_result_filters[FilterKey.OUT]] == ["SitePolicyFilter"]
    ctx.set_prop(FLContextKey.SCOPE_OBJECT, scope, private=True, sticky=False)

    def through_chain(shareable, filters, direction):
        return apply_filters(filters, shareable, ctx, {}, "train", direction)

    task_data = DXO(DataKind.WEIGHTS, data={**GLOBAL_MODEL, "features.norm0.num_batches_tracked": np.array(2.0)})
    task_data = task_data.to_shareable()
    assert through_chain(task_data, Scope.TASK_DATA_FILTERS_NAME, FilterKey.IN) is task_data
    diff = {name: np.ones_like(value) for name, value in GLOBAL_MODEL.items()}  # int64 counter, float recorded
    legit = train_result({"val_auc": math.nan}, params=diff)
    assert through_chain(legit, Scope.TASK_RESULT_FILTERS_NAME, FilterKey.OUT) is legit
    assert legit["DXO"]["meta"]["initial_metrics"] == {}
    hostile = [
        (train_result(params={**diff, "leak.extra": np.zeros(4, np.float32)}), "is not in the global model's"),
        (train_result(note="free text"), "is not one the site allows"),
        (train_result({f"val_auc_{patient['PatientID'].lower()}": 0.5}), "PatientID (train.csv)"),
    ]
    for shareable, reason in hostile:
        reply = through_chain(shareable, Scope.TASK_RESULT_FILTERS_NAME, FilterKey.OUT)
        assert_blocked(reply, reason, never=[patient["PatientID"], "free text", "leak.extra"])
