"""FedAvg that tolerates lost sites and continues after a server restart (the server side of every job).

* ``FedAvg`` (NVFlare's ``ScatterAndGather``): a round waits at most ``train_timeout`` seconds; it is aggregated
  when at least ``min_clients`` sites sent a usable result, and fails the job otherwise. Each round logs
  ``round 7: <site> missing, aggregated 1 of 2`` (or ``round 7: aggregated 2 of 2``) into the server's job
  log and is recorded in ``rounds.json`` next to the global model. When the job is started again over the
  workspace of an interrupted run (``job_recovery`` on the server puts it back), it continues after the last
  round whose global model was persisted.
* ``RoundPersistor`` (``PTFileModelPersistor``): the global model file carries the round that produced it,
  which makes the model file the commit point of a round, and a restarted run starts from that file.
* ``BestModelSelector`` (``IntimeModelSelector``): keeps the best metric in ``best_metric.json`` so that a
  restarted run never takes a worse model for the best one.

``rounds.json``: ``{"min_clients", "sites", "rounds": [{"round", "contributed", "missing", "aggregated",
"started", "finished"}], "restarts": [{"at", "resumed_from_round"}]}``; ``resumed_from_round`` is the first
round run after the restart. It may run one round ahead of the model file (it is written first); a restart
drops such a round, so every round counts exactly once.
"""

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from hcls.process_memory import release_large_blocks

ROUNDS_FILE = "rounds.json"
BEST_FILE = "best_metric.json"
ROUND_KEY = "round"  # the key of the global model file that names the round it comes from


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def progress_line(round_no: int, contributed, missing) -> str:
    """``round 7: <site> missing, aggregated 1 of 2`` or ``round 7: aggregated 2 of 2``."""
    total = len(contributed) + len(missing)
    gone = f"{', '.join(sorted(missing))} missing, " if missing else ""
    return f"round {round_no}: {gone}aggregated {len(contributed)} of {total}"


class RoundsRecord:
    """``rounds.json``: which sites contributed to each round, and the restarts of the run."""

    def __init__(self, path: Path, min_clients: int, sites: list):
        self.path = Path(path)
        self.existed = self.path.is_file()
        saved = json.loads(self.path.read_text()) if self.existed else {}
        self.data = {
            "min_clients": min_clients,
            "sites": sorted(sites),
            "rounds": saved.get("rounds", []),
            "restarts": saved.get("restarts", []),
        }

    @property
    def rounds(self) -> list:
        return self.data["rounds"]

    def resume(self, committed_round: Optional[int], next_round: int) -> None:
        """A restarted run: forget rounds after ``committed_round`` (their model was never persisted)."""
        last = -1 if committed_round is None else committed_round
        self.data["rounds"] = [r for r in self.rounds if r["round"] <= last]
        self.data["restarts"].append({"at": utc_now(), "resumed_from_round": next_round})

    def start_round(self, round_no: int) -> None:
        self.data["rounds"] = [r for r in self.rounds if r["round"] != round_no]
        self.rounds.append({"round": round_no, "contributed": [], "missing": [], "aggregated": False,
                            "started": utc_now(), "finished": None})  # fmt: skip

    def finish_round(self, round_no: int, contributed, missing, aggregated: bool) -> None:
        entry = next(r for r in self.rounds if r["round"] == round_no)
        entry.update(contributed=sorted(contributed), missing=sorted(missing), aggregated=aggregated,
                     finished=utc_now())  # fmt: skip

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


class FedAvg(ScatterAndGather):
    """ScatterAndGather with bounded rounds, a per-round record of the sites, and continuation after a restart.

    ``train_timeout`` bounds each round (a dead or hung trainer, or a site gone entirely, is dropped by then);
    ``min_clients`` results must have arrived for the round to be aggregated, else the job fails.
    ``task_check_period`` is how soon a round ends after its last result (NVFlare 2.9 itself ignores it).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        release_large_blocks()  # this is the server's job process
        if self._train_timeout <= 0:
            raise ValueError("FedAvg: train_timeout must be > 0 seconds (it bounds how long a round waits for a site)")
        self._record = None
        self._contributed = set()
        self._sites = []

    def set_communicator(self, communicator) -> None:
        super().set_communicator(communicator)
        # NVFlare 2.9 hands task_check_period to the communicator as `task_check_period`, but its task monitor reads
        # `_task_check_period` (0.2 s): without this, every round waits up to 0.2 s after its last result.
        if hasattr(communicator, "_task_check_period"):
            communicator._task_check_period = self._task_check_period

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        self._sites = sorted(c.name for c in self._engine.get_clients())
        app_dir = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT))
        self._record = RoundsRecord(app_dir / ROUNDS_FILE, self._min_clients, self._sites)
        if self._record.existed:  # the workspace of an interrupted run
            committed = getattr(self.persistor, "saved_round", None)
            self._current_round = self._start_round if committed is None else committed + 1
            self._record.resume(committed, self._current_round)
            self.log_info(
                fl_ctx,
                f"continuing after a server restart from round {self._current_round} "
                f"(last persisted round: {'none' if committed is None else committed})",
            )
        self._record.save()

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if self._record is None:
            return
        if event_type == AppEventType.ROUND_STARTED:
            self._contributed = set()
            self._record.start_round(self._current_round)
            self._record.save()
        elif event_type == AppEventType.BEFORE_AGGREGATION:
            self._close_round(fl_ctx)

    def _accept_train_result(self, client_name, result, fl_ctx, is_unknown_task=False) -> bool:
        accepted = super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task=is_unknown_task)
        if accepted and not is_unknown_task:
            self._contributed.add(client_name)
        return accepted

    def _close_round(self, fl_ctx: FLContext) -> None:
        """Log and record who contributed; fail the job when fewer than min_clients did.

        Written before the model is persisted: the model file is the commit point (see ``RoundsRecord.resume``).
        """
        contributed = sorted(self._contributed)
        missing = [s for s in self._sites if s not in self._contributed]
        enough = len(contributed) >= self._min_clients
        self._record.finish_round(self._current_round, contributed, missing, aggregated=enough)
        self._record.save()
        self.log_info(fl_ctx, progress_line(self._current_round, contributed, missing))
        if not enough:
            self.system_panic(
                f"round {self._current_round}: {len(contributed)} of {len(self._sites)} sites sent a result within "
                f"train_timeout {self._train_timeout}s, fewer than min_clients {self._min_clients}",
                fl_ctx,
            )


class RoundPersistor(PTFileModelPersistor):
    """PTFileModelPersistor whose global model file names its round, and which restarts from that file.

    ``saved_round`` is the round of the model loaded at start (None on a fresh run).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.saved_round = None

    def load_model(self, fl_ctx: FLContext):
        source = self.source_ckpt_file_full_name  # pre-trained initial weights, if any
        if os.path.isfile(self._ckpt_save_path):  # left by an interrupted run of this job: it wins over them
            self.ckpt_preload_path, self.source_ckpt_file_full_name = self._ckpt_save_path, None
        try:
            learnable = super().load_model(fl_ctx)
        finally:
            self.source_ckpt_file_full_name = source
        if self.persistence_manager is not None:
            self.saved_round = self.persistence_manager.other_props.get(ROUND_KEY)
        return learnable

    def save_model(self, ml, fl_ctx: FLContext):
        manager = self._get_persistence_manager(fl_ctx)
        manager.update(ml)
        manager.other_props[ROUND_KEY] = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        self.save_model_file(self._ckpt_save_path)


class BestModelSelector(IntimeModelSelector):
    """IntimeModelSelector that keeps its best metric in ``best_metric.json`` across a server restart.

    After a restart it logs the kept best again (``new best validation metric at round N: V``), so the job log
    names the best round even if it starts afresh.
    """

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.START_RUN:
            self._restore(fl_ctx)

    def _path(self, fl_ctx: FLContext) -> Path:
        return Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)) / BEST_FILE

    def _restore(self, fl_ctx: FLContext) -> None:
        path = self._path(fl_ctx)
        if not path.is_file():
            return
        best = json.loads(path.read_text())
        self.best_val_metric, self.best_raw_val_metric = best["value"], best["raw_value"]
        kept = f"new best validation metric at round {best['round']}: {best['value']} (kept across a server restart)"
        self.log_info(fl_ctx, kept)

    def _before_aggregate(self, fl_ctx: FLContext):
        before = self.best_val_metric
        result = super()._before_aggregate(fl_ctx)
        if self.best_val_metric != before and math.isfinite(self.best_val_metric):
            best = {"round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND), "value": self.best_val_metric,
                    "raw_value": self.best_raw_val_metric}  # fmt: skip
            write_json_atomic(self._path(fl_ctx), best)
        return result
