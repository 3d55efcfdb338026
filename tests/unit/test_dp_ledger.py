"""The site recomputes a job's DP spending from what each result records, with its own ledger and
accountant; a result that lies about or lacks its accounting is blocked and the ledger stays as it was."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "custom"))
from site_privacy.dp_ledger import Ledger, epsilon  # noqa: E402
from site_privacy.policy import DifferentialPrivacy  # noqa: E402

SITE_DP = DifferentialPrivacy(True, "gaussian", 8.0, 1e-5, 1.0)
HONEST = {"dp_noise_multiplier": 1.1, "dp_sample_rate": 0.01, "dp_steps": 100, "dp_max_grad_norm": 1.0,
          "dp_epsilon": 0.5, "dp_delta": 1e-5}  # fmt: skip


@pytest.fixture
def ledger(tmp_path):
    return Ledger(tmp_path / "dp_ledger", "job-1")


def test_honest_results_add_up_in_the_ledger(ledger):
    for sent in (1, 2, 3):
        reason, entries = ledger.check("WEIGHT_DIFF", HONEST, SITE_DP, n_train=1000)
        assert reason is None
        ledger.record(entries)
        assert ledger.entries() == [[1.1, 0.01, 100 * sent]]
    assert 0 < epsilon(ledger.entries(), SITE_DP.delta) < SITE_DP.epsilon
    # metrics and results without parameters release no DP-SGD steps and need no accounting
    assert ledger.check("METRICS", {}, SITE_DP, n_train=1000) == (None, ledger.entries())


@pytest.mark.parametrize("lie, why", [
    ({"dp_steps": None}, r"lacks DP accounting \(dp_steps\)"),
    ({"dp_noise_multiplier": "1.1"}, r"lacks DP accounting \(dp_noise_multiplier\)"),
    ({"dp_sample_rate": float("nan")}, r"lacks DP accounting \(dp_sample_rate\)"),
    ({"dp_max_grad_norm": 5.0}, "clipping norm 5.0 exceeds the site's max_grad_norm 1.0"),
    ({"dp_noise_multiplier": 0.0}, "is not DP-SGD"),
    ({"dp_steps": 2.5}, "is not DP-SGD"),
    ({"dp_sample_rate": 1e-6}, "not between one record of the site's 1000 training samples and 1"),
    ({"dp_noise_multiplier": 0.3, "dp_epsilon": 0.0}, r"DP epsilon \d+\.\d+ \(the site's accountant.*budget 8.0"),
])  # fmt: skip
def test_a_result_that_lies_about_its_dp_is_blocked_and_not_recorded(ledger, lie, why):
    ledger.record([[1.1, 0.01, 100]])
    reason, entries = ledger.check("WEIGHT_DIFF", {**HONEST, **lie}, SITE_DP, n_train=1000)
    assert reason is not None and re.search(why, reason), reason
    assert entries == ledger.entries() == [[1.1, 0.01, 100]]


def test_the_budget_counts_every_result_of_the_job(ledger):
    """Each result alone is within the budget; together they are not, so the one that crosses it is blocked."""
    meta = {**HONEST, "dp_steps": 2000}
    sent = 0
    while (check := ledger.check("WEIGHTS", meta, SITE_DP, n_train=1000))[0] is None:
        ledger.record(check[1])
        sent += 1
    assert sent >= 1 and "exceeds the site's budget 8.0" in check[0]
    assert epsilon(ledger.entries(), SITE_DP.delta) <= SITE_DP.epsilon


def test_a_job_id_cannot_name_a_file_elsewhere(tmp_path):
    for job_id in ("", "../x", ".hidden"):
        with pytest.raises(ValueError, match="no usable job id"):
            Ledger(tmp_path, job_id)
