"""The client script of the stock NVFlare FedAvg job that row "overhead" compares this project's jobs with.

NVFlare's own recipe (``nvflare.app_opt.pt.recipes.fedavg.FedAvgRecipe``: in-process Client API, the weights sent
back whole) runs it at each site as NVFlare's hello-pt example runs its client. It trains nothing: it sends back the
weights it received, and logs how long it held them (its compute), so a round is all orchestration.
"""

import logging
import time

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel


def main() -> None:
    flare.init()
    log = logging.getLogger("stock_client")
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        started = time.time()
        result = FLModel(params=received.params, meta={"NUM_STEPS_CURRENT_ROUND": 1})
        log.info(f"[{flare.get_site_name()}] round {received.current_round}: compute {time.time() - started:.3f}s")
        flare.send(result)


if __name__ == "__main__":
    main()
