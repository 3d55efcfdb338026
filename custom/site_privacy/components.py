"""NVFlare components that the site's privacy scope installs (``local/privacy.json``, rendered by deployment).

* ``SitePolicyFilter``: a task result filter of the scope. A result leaves the site only if the site's
  own training manifest for the job lists at least ``min_dataset_size`` samples, it carries no blocked
  field name and no identifier value from the site's manifests, and, where the site requires DP, it
  reports DP accounting within the site's budget. Otherwise the server receives, instead of the result,
  an error reply whose return code names the site and the reason (so the job log shows it) and the
  site logs the same line.
* ``OutgoingEventGuard``: stops federated events (metrics streamed to the server, e.g. TensorBoard)
  that carry a blocked field name or identifier value. It sees each outgoing event before NVFlare's
  event sender does, because NVFlare adds scope components before its own widgets.

A site that cannot read its own policy or data blocks everything (fails closed).
"""

from functools import lru_cache
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import EventScope, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
from nvflare.widgets.fed_event import FedEventHeader

from site_privacy import dataset
from site_privacy.outgoing import dp_violation, find_blocked
from site_privacy.policy import SitePolicy, parse_policy

BLOCKED = "PRIVACY_POLICY_BLOCKED"  # start of the return code of a blocked result
PRIVACY_FILE = "local/privacy.json"
SITE_CONFIG_FILE = "site_config.json"  # in local/, rendered by deployment: data root and datasets per job


@lru_cache(maxsize=8)
def _site_data(site_config: str, job_name: str, fields: tuple[str, ...]) -> tuple[Path, int, dict]:
    """(dataset dir, training samples, blocked identifier values) of ``job_name`` at this site."""
    data_dir = dataset.dataset_dir(Path(site_config), job_name)
    n_train = dataset.count_training_samples(data_dir, dataset.read_site_config(Path(site_config)))
    return data_dir, n_train, dataset.blocked_values(data_dir, fields)


def _job_policy(fl_ctx: FLContext) -> SitePolicy:
    scope = fl_ctx.get_prop(FLContextKey.EFFECTIVE_JOB_SCOPE_NAME) or "(none)"
    return parse_policy(fl_ctx.get_prop(FLContextKey.SCOPE_PROPERTIES), f"{PRIVACY_FILE} scope '{scope}'")


def _site_config(fl_ctx: FLContext) -> str:
    return str(Path(fl_ctx.get_workspace().get_site_config_dir()) / SITE_CONFIG_FILE)


def _job_name(fl_ctx: FLContext) -> str:
    return (fl_ctx.get_prop(FLContextKey.JOB_META) or {}).get("name", "")


class SitePolicyFilter(Filter):
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        site, task = fl_ctx.get_identity_name(), fl_ctx.get_prop(FLContextKey.TASK_NAME, "")
        try:
            reason = self._violation(shareable, fl_ctx)
        except ValueError as err:  # the site cannot read its own policy or data: fail closed
            reason = str(err)
        if reason is None:
            return shareable
        job = _job_name(fl_ctx)
        message = f"privacy policy: blocked the '{task}' result of job '{job}': {reason}"
        self.log_error(fl_ctx, message, fire_event=False)
        return make_reply(f"{BLOCKED} by {site}: {reason}")

    def _violation(self, shareable: Shareable, fl_ctx: FLContext) -> str | None:
        policy = _job_policy(fl_ctx)
        job = _job_name(fl_ctx)
        data_dir, n_train, values = _site_data(_site_config(fl_ctx), job, policy.blocked_data_fields)
        if n_train < policy.min_dataset_size:
            return (
                f"the site's training manifest in {data_dir} lists {n_train} samples for job '{job}', "
                f"fewer than min_dataset_size {policy.min_dataset_size}"
            )
        try:
            dxo = from_shareable(shareable)
        except ValueError:  # an error reply or a non-DXO result: check whatever it carries
            return find_blocked(dict(shareable), policy.blocked_data_fields, values)
        blocked = find_blocked({"data": dxo.data, "meta": dxo.meta}, policy.blocked_data_fields, values)
        if blocked:
            return blocked
        dp = policy.differential_privacy
        reason = dp_violation(dxo.data_kind, dxo.meta, dp)
        if reason is None and "dp_epsilon" in dxo.meta:
            self.log_info(
                fl_ctx, f"privacy policy: DP epsilon spent {dxo.meta['dp_epsilon']:.3f} of the site's budget "
                f"{dp.epsilon} (delta {dp.delta})", fire_event=False,
            )  # fmt: skip
        return reason


class OutgoingEventGuard(FLComponent):
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if fl_ctx.get_prop(FLContextKey.EVENT_SCOPE) != EventScope.FEDERATION:
            return
        event = fl_ctx.get_prop(FLContextKey.EVENT_DATA)
        if not isinstance(event, Shareable) or event.get_header(FedEventHeader.DIRECTION, "out") != "out":
            return
        payload = {k: v for k, v in event.items() if k != ReservedHeaderKey.HEADERS}
        try:
            policy = _job_policy(fl_ctx)
            values = _site_data(_site_config(fl_ctx), _job_name(fl_ctx), policy.blocked_data_fields)[2]
            reason = find_blocked(payload, policy.blocked_data_fields, values)
        except ValueError as err:
            reason = str(err)
        if reason:
            event.set_header(FedEventHeader.DIRECTION, "blocked")  # NVFlare's event sender sends only "out"
            message = f"privacy policy: stopped the outgoing event '{event_type}': {reason}"
            self.log_error(fl_ctx, message, fire_event=False)
