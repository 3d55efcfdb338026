"""NVFlare components that the site's privacy scope installs (``local/privacy.json``, rendered by deployment).

* ``SitePolicyFilter``: a task result filter of the scope. A result leaves the site only if the site's
  own training manifest for the job lists at least ``min_dataset_size`` samples, it carries no blocked
  field name and no identifier value from the site's manifests (however written: ``identifiers``), it has
  the structure the site allows (``structure``: the global model's parameters, allowed metrics as finite
  numbers, allowed meta keys with numeric values), and, where the site requires DP, the epsilon the site's own
  accountant computes for the job from what the result records stays within the site's budget
  (``dp_ledger``; a metric under an allowed name whose value is NaN or infinite is dropped from the
  result with a warning naming the metric, not blocking the result: ``structure``). Otherwise the server
  receives, instead of the result, an error reply whose return code names the site and the reason (so the job
  log shows it) and the site logs the same line.
  Installed also as a task data filter of the scope (deployment renders it into both lists of the scope), it
  records the global model's structure from the task data, after NVFlare materialised it (lazy download
  references become arrays only for filters) and before any of the job's filters (NVFlare runs the scope's
  filters first).
* ``OutgoingEventGuard``: stops federated events (metrics streamed to the server, e.g. TensorBoard)
  that carry a blocked field name or identifier value. It sees each outgoing event before NVFlare's
  event sender does, because NVFlare adds scope components before its own widgets. It also records the
  structure of the global model from each task's data as the server sent it (``BEFORE_TASK_DATA_FILTER``,
  before any of the job's filters) and, when the run starts, the name under which the site approves the job's
  app (``approval.approved_job_name``).

The job a result belongs to (whose dataset is counted and checked) is the site's, not the job's word: the job
name under which the site approves the deployed app's digest (``approval``: ``local/approved_jobs.json``), fixed
when the run starts, whatever name the job's meta gives itself; a job the site does not approve is refused
before it runs (``approval.ApprovingAppDeployer``), and its results, should one run anyway, are blocked.

A site that cannot read its own policy or data blocks everything (fails closed).
"""

import json
import os
from functools import lru_cache
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.filter import Filter
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import EventScope, FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
from nvflare.widgets.fed_event import FedEventHeader

from site_privacy import dataset
from site_privacy.approval import approved_job_name
from site_privacy.identifiers import IdentifierIndex
from site_privacy.dp_ledger import PARAMETER_KINDS, Ledger
from site_privacy.outgoing import find_blocked
from site_privacy.policy import SitePolicy, parse_policy
from site_privacy.structure import (
    META_KEYS,
    ModelStructure,
    check_headers,
    check_result,
    drop_non_finite_metrics,
    job_headers,
)

BLOCKED = "PRIVACY_POLICY_BLOCKED"  # start of the return code of a blocked result
PRIVACY_FILE = "local/privacy.json"
SITE_CONFIG_FILE = "site_config.json"  # in local/, rendered by deployment: data root and datasets per job
STATE_DIR = "site_privacy_state"  # <site workspace>/site_privacy_state/<job id>.json: the recorded model structure
DP_LEDGER_DIR = "dp_ledger"  # <site workspace>/site_privacy_state/dp_ledger/<job id>.json: site_privacy.dp_ledger

_structures: dict[str, ModelStructure] = {}  # job id -> structure of its global model (this job process)


@lru_cache(maxsize=8)
def _dataset(site_config: str, job_name: str) -> tuple[Path, int]:
    """(dataset dir, training samples) of ``job_name`` at this site."""
    data_dir = dataset.dataset_dir(Path(site_config), job_name)
    return data_dir, dataset.count_training_samples(data_dir, dataset.read_site_config(Path(site_config)))


@lru_cache(maxsize=4)
def _site_identifiers(site_config: str, fields: tuple[str, ...]) -> IdentifierIndex:
    """The identifier values of every dataset the site config lists (whichever job asks)."""
    config = dataset.read_site_config(Path(site_config))
    values: dict[str, str] = {}
    for job_name in sorted(config.get("datasets") or {}):
        data_dir = dataset.dataset_dir(Path(site_config), job_name)
        if data_dir.is_dir():
            for value, origin in dataset.blocked_values(data_dir, fields).items():
                values.setdefault(value, origin)
    return IdentifierIndex(values)


def _job_policy(fl_ctx: FLContext) -> SitePolicy:
    scope = fl_ctx.get_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME) or "(none)"
    return parse_policy(fl_ctx.get_prop(FLContextKey.SCOPE_PROPERTIES), f"{PRIVACY_FILE} scope '{scope}'")


def _site_config(fl_ctx: FLContext) -> str:
    return str(Path(fl_ctx.get_workspace().get_site_config_dir()) / SITE_CONFIG_FILE)


def job_identity(fl_ctx: FLContext) -> str:
    """The job name whose dataset the site counts for this job: the name under which the site approves the job's
    app (never the job's meta name). ValueError when the site approves no such app."""
    return approved_job_name(fl_ctx)


def _state_dir(fl_ctx: FLContext) -> Path:
    return Path(fl_ctx.get_workspace().get_root_dir()) / STATE_DIR


def _state_file(fl_ctx: FLContext, job_id: str) -> Path:
    return _state_dir(fl_ctx) / f"{job_id}.json"


def record_structure(task_data, fl_ctx: FLContext) -> None:
    """Keep the structure of the first global model of the job that the site receives; a later model adds
    no names, it only fills in specs the first could not show (ciphertext, references not yet downloaded)."""
    seen = ModelStructure.from_task_data(task_data.get("DXO") if isinstance(task_data, dict) else None)
    if seen is None:
        return
    job_id = fl_ctx.get_job_id()
    known = known_structure(fl_ctx)
    if known is not None:
        missing = {n for n, spec in known.specs.items() if spec == (None, None) and seen.specs.get(n, spec) != spec}
        if not missing:
            return
        seen = ModelStructure({n: seen.specs[n] if n in missing else spec for n, spec in known.specs.items()})
    _structures[job_id] = seen
    path = _state_file(fl_ctx, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(seen.to_json()))
    os.replace(tmp, path)


def known_structure(fl_ctx: FLContext) -> ModelStructure | None:
    """The recorded structure of this job's global model (also across a restart of the site's job process)."""
    job_id = fl_ctx.get_job_id()
    if job_id not in _structures:
        path = _state_file(fl_ctx, job_id)
        if not path.is_file():
            return None
        _structures[job_id] = ModelStructure.from_json(json.loads(path.read_text()))
    return _structures[job_id]


class SitePolicyFilter(Filter):
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) == FilterKey.IN:  # installed as a task data filter
            record_structure(shareable, fl_ctx)
            return shareable
        site, task = fl_ctx.get_identity_name(), fl_ctx.get_prop(FLContextKey.TASK_NAME, "")
        try:
            reason = self._violation(shareable, fl_ctx)
        except (ValueError, OSError) as err:  # the site cannot read its own policy or data: fail closed
            reason = str(err)
        except (TypeError, KeyError, AttributeError) as err:  # a result of an unexpected make: fail closed
            reason = f"the result could not be checked ({type(err).__name__})"
        if reason is None:
            return shareable
        message = f"privacy policy: blocked the '{task}' result of job {fl_ctx.get_job_id()}: {reason}"
        self.log_error(fl_ctx, message, fire_event=False)
        return make_reply(f"{BLOCKED} by {site}: {reason}")

    def _violation(self, shareable: Shareable, fl_ctx: FLContext) -> str | None:
        policy = _job_policy(fl_ctx)
        job = job_identity(fl_ctx)
        site_config = _site_config(fl_ctx)
        data_dir, n_train = _dataset(site_config, job)
        if n_train < policy.min_dataset_size:
            return (
                f"the site's training manifest in {data_dir} lists {n_train} samples for job '{job}', "
                f"fewer than min_dataset_size {policy.min_dataset_size}"
            )
        index = _site_identifiers(site_config, policy.blocked_data_fields)
        structure = known_structure(fl_ctx)
        known = {"DXO", "data", "meta", *META_KEYS, *policy.allowed_metrics, *(structure.specs if structure else ())}
        payload = {k: v for k, v in shareable.items() if k != ReservedHeaderKey.HEADERS}
        blocked = find_blocked(payload.get("DXO", payload), policy.blocked_data_fields, index, known) or find_blocked(
            {"headers": job_headers(shareable.get(ReservedHeaderKey.HEADERS))}, policy.blocked_data_fields, index,
            {"headers"},
        )  # fmt: skip
        if blocked:
            return blocked
        try:
            dxo = from_shareable(shareable)
        except ValueError:  # an error reply carries nothing but its headers, or it is not a DXO: not sent
            return None if set(shareable) == {ReservedHeaderKey.HEADERS} else "the result is not a DXO"
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME, "")
        for name in drop_non_finite_metrics(shareable, policy.allowed_metrics):
            self.log_warning(
                fl_ctx, f"privacy policy: dropped metric {name} from the '{task}' result of job {fl_ctx.get_job_id()}: "
                "its value is not a finite number (the rest of the result is checked and sent)", fire_event=False,
            )  # fmt: skip
        reason = check_result(shareable, structure, policy.allowed_metrics) or check_headers(
            shareable.get(ReservedHeaderKey.HEADERS, {})
        )
        if reason:
            return reason
        dp = policy.differential_privacy
        if not dp.enabled or dxo.data_kind not in PARAMETER_KINDS:
            return None
        ledger = Ledger(_state_dir(fl_ctx) / DP_LEDGER_DIR, fl_ctx.get_job_id())
        reason, entries = ledger.check(dxo.data_kind, dxo.meta, dp, n_train)
        if reason is None:
            ledger.record(entries)  # before the result is sent: a result lost on the way is counted (conservative)
            self.log_info(
                fl_ctx, f"privacy policy: DP epsilon {ledger.spent:.3f} spent by job {fl_ctx.get_job_id()} at this site "
                f"(the site's accountant), budget {dp.epsilon} (delta {dp.delta})", fire_event=False,
            )  # fmt: skip
        return reason


class OutgoingEventGuard(FLComponent):
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type in (EventType.START_RUN, EventType.BEFORE_TASK_DATA_FILTER):
            try:
                if event_type == EventType.START_RUN:  # before a trainer runs in (and may write into) the app folder
                    name = approved_job_name(fl_ctx, refresh=True)
                    claimed = (fl_ctx.get_prop(FLContextKey.JOB_META) or {}).get("name", "")
                    self.log_info(
                        fl_ctx, f"privacy policy: job {fl_ctx.get_job_id()} is checked as '{name}', the job the site "
                        f"approved its code as (its meta name: '{claimed}')", fire_event=False,
                    )  # fmt: skip
                else:
                    record_structure(fl_ctx.get_prop(FLContextKey.TASK_DATA), fl_ctx)
            except (OSError, ValueError, TypeError) as err:  # the result filter then fails closed
                message = f"privacy policy: cannot record the job's approval or model: {err}"
                self.log_error(fl_ctx, message, fire_event=False)
            return
        if fl_ctx.get_prop(FLContextKey.EVENT_SCOPE) != EventScope.FEDERATION:
            return
        event = fl_ctx.get_prop(FLContextKey.EVENT_DATA)
        if not isinstance(event, Shareable) or event.get_header(FedEventHeader.DIRECTION, "out") != "out":
            return
        payload = {k: v for k, v in event.items() if k != ReservedHeaderKey.HEADERS}
        try:
            policy = _job_policy(fl_ctx)
            index = _site_identifiers(_site_config(fl_ctx), policy.blocked_data_fields)
            reason = find_blocked(payload, policy.blocked_data_fields, index, {"data", *policy.allowed_metrics})
        except ValueError as err:
            reason = str(err)
        if reason:
            event.set_header(FedEventHeader.DIRECTION, "blocked")  # NVFlare's event sender sends only "out"
            message = f"privacy policy: stopped the outgoing event '{event_type}': {reason}"
            self.log_error(fl_ctx, message, fire_event=False)
