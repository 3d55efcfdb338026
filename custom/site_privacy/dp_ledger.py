"""The site's own DP accounting: the epsilon a job has spent at this site, recomputed by the site.

A result of a site that requires DP records how it was trained since the job's previous result from
this site (``hcls.dp_sgd.Accounting``): ``dp_noise_multiplier``, ``dp_sample_rate`` (Poisson sampling),
``dp_steps`` and ``dp_max_grad_norm``. The site keeps a ledger per job of what it let out, and computes
the epsilon of the ledger plus the new result with Opacus' PRV accountant (the one the trainers use to
calibrate their noise), at the site's delta. The job's own ``dp_epsilon`` is not used. A result that
lacks any of these, clips at more than the site's norm, samples less than one record of the site's
training data per step, or would take the job past the site's epsilon is blocked, and the ledger is
left as it was.

That the trainer really trained as it records (noise added, clipping applied) is a property of its code,
which the site trusts because it approved that code; the ledger cannot see inside a training step.
"""

import json
import math
import os
from pathlib import Path

from site_privacy.policy import DifferentialPrivacy

RECORD_KEYS = ("dp_noise_multiplier", "dp_sample_rate", "dp_steps", "dp_max_grad_norm")
PARAMETER_KINDS = ("WEIGHTS", "WEIGHT_DIFF")  # DXO kinds that carry trained parameters


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def epsilon(entries: list, delta: float) -> float:
    """Epsilon at ``delta`` of DP-SGD ``entries`` [(noise multiplier, sample rate, steps), ...]."""
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [tuple(e) for e in entries if e[2] > 0]
    return float(accountant.get_epsilon(delta)) if accountant.history else 0.0


class Ledger:
    """The DP-SGD steps a job's results took out of this site: ``<dir>/<job id>.json``, a list of
    [noise multiplier, sample rate, steps]. Kept by the site's filter, outside the job's run folder."""

    def __init__(self, directory: Path, job_id: str):
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"DP ledger: no usable job id ({job_id!r})")
        self.path = Path(directory) / f"{job_id}.json"
        self.spent = None

    def entries(self) -> list:
        if not self.path.is_file():
            return []
        try:
            entries = json.loads(self.path.read_text())
            assert isinstance(entries, list) and all(len(e) == 3 and all(map(_number, e)) for e in entries)
        except (ValueError, AssertionError) as err:
            raise ValueError(f"DP ledger {self.path} is unreadable ({err}): the site cannot account for this job")
        return entries

    def check(self, data_kind: str, meta: dict, dp: DifferentialPrivacy, n_train: int) -> tuple[str | None, list]:
        """(why the result breaks the site's DP budget or None, the ledger's entries with it). The epsilon
        of those entries is then ``self.spent`` (None for a result that needs no DP accounting)."""
        entries, self.spent = self.entries(), None
        if not dp.enabled or data_kind not in PARAMETER_KINDS:
            return None, entries
        missing = [key for key in RECORD_KEYS if not _number(meta.get(key))]
        if missing:
            return f"the site requires differential privacy and the result lacks DP accounting ({', '.join(missing)})", entries
        noise, rate, steps, norm = (meta[key] for key in RECORD_KEYS)
        if norm > dp.max_grad_norm:
            return f"DP clipping norm {norm} exceeds the site's max_grad_norm {dp.max_grad_norm}", entries
        if steps < 0 or steps != int(steps) or noise <= 0 and steps > 0:
            return f"DP accounting of {steps} steps at noise multiplier {noise} is not DP-SGD", entries
        if steps > 0 and not (min(1.0, 1 / max(n_train, 1)) <= rate <= 1):
            return (f"DP sample rate {rate} is not between one record of the site's {n_train} training samples "
                    f"and 1"), entries  # fmt: skip
        with_result = [list(e) for e in entries]
        if steps > 0 and with_result and with_result[-1][:2] == [float(noise), float(rate)]:
            with_result[-1][2] += int(steps)  # the same mechanism again: one entry, as Opacus keeps it
        elif steps > 0:
            with_result.append([float(noise), float(rate), int(steps)])
        spent = self.spent = epsilon(with_result, dp.delta)
        if spent > dp.epsilon:
            return f"DP epsilon {spent:.3f} (the site's accountant, this result included) exceeds the site's budget {dp.epsilon}", entries
        return None, with_result

    def record(self, entries: list) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, self.path)
