"""The site's privacy policy, read from the properties of its NVFlare privacy scope (``local/privacy.json``).

Deployment renders those properties from ``privacy`` of ``site_configs/<site>/local_config.json``::

    {"min_dataset_size": 50,
     "blocked_data_fields": ["PatientName", "PatientID", "PatientBirthDate"],
     "differential_privacy": {"enabled": true, "mechanism": "gaussian", "epsilon": 8, "delta": 1e-5,
                              "max_grad_norm": 1},
     "allowed_metrics": [<metric name>, ...]}

``allowed_metrics`` (optional; default ``structure.DEFAULT_ALLOWED_METRICS``, the project's key metrics and the
CT job's per-organ Dice): the only metric names a result may carry. It is the site's list: a job cannot widen it.

Every error names the file and the field.
"""

from dataclasses import dataclass

from site_privacy.structure import DEFAULT_ALLOWED_METRICS

DP_MECHANISMS = ("gaussian",)


@dataclass(frozen=True)
class DifferentialPrivacy:
    enabled: bool
    mechanism: str
    epsilon: float
    delta: float
    max_grad_norm: float


@dataclass(frozen=True)
class SitePolicy:
    min_dataset_size: int
    blocked_data_fields: tuple[str, ...]
    differential_privacy: DifferentialPrivacy
    allowed_metrics: tuple[str, ...] = DEFAULT_ALLOWED_METRICS


def _number(value, where: str, low: float, high: float = float("inf")) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        raise ValueError(f"{where} must be a number in ({low}, {high}), got {value!r}")
    return float(value)


def parse_policy(props, source: str) -> SitePolicy:
    """The policy in ``props`` (scope properties); ValueError naming ``source`` and the field."""
    if not isinstance(props, dict):
        raise ValueError(f"{source}: the privacy scope has no properties (expected the site's privacy policy)")
    size = props.get("min_dataset_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{source}: min_dataset_size must be an integer >= 1, got {size!r}")
    fields = props.get("blocked_data_fields")
    if not isinstance(fields, list) or not all(isinstance(f, str) and f for f in fields):
        raise ValueError(f"{source}: blocked_data_fields must be a list of column/header names, got {fields!r}")
    dp = props.get("differential_privacy")
    if not isinstance(dp, dict) or not isinstance(dp.get("enabled"), bool):
        raise ValueError(f"{source}: differential_privacy must be an object with a boolean 'enabled'")
    metrics = props.get("allowed_metrics", list(DEFAULT_ALLOWED_METRICS))
    if not isinstance(metrics, list) or not all(isinstance(m, str) and m for m in metrics):
        raise ValueError(f"{source}: allowed_metrics must be a list of metric names, got {metrics!r}")
    where = f"{source}: differential_privacy"
    if dp.get("mechanism") not in DP_MECHANISMS:
        raise ValueError(f"{where}.mechanism must be one of {', '.join(DP_MECHANISMS)}, got {dp.get('mechanism')!r}")
    return SitePolicy(
        min_dataset_size=size,
        blocked_data_fields=tuple(fields),
        differential_privacy=DifferentialPrivacy(
            enabled=dp["enabled"],
            mechanism=dp["mechanism"],
            epsilon=_number(dp.get("epsilon"), f"{where}.epsilon", 0.0),
            delta=_number(dp.get("delta"), f"{where}.delta", 0.0, 1.0),
            max_grad_norm=_number(dp.get("max_grad_norm"), f"{where}.max_grad_norm", 0.0),
        ),
        allowed_metrics=tuple(metrics),
    )
