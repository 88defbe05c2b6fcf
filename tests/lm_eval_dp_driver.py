"""Driver of the data-parallel lm-eval test: run it under ``accelerate launch`` (or ``torchrun``).

    accelerate launch --multi_gpu --num_processes 2 ... tests/lm_eval_dp_driver.py OUT.json LOG.jsonl

Every process loads smollm2-135m and calls ``lm_eval_bridge.evaluate`` on the same tasks and
variants; rank 0 writes ``OUT.json`` (``{"world_size", "pid", "results", "tasks"}``). Settings
come from the environment, so the test and this driver agree on them:

* ``TOKENLEAN_DP_TASKS`` (comma-separated), ``TOKENLEAN_DP_METHODS`` (semicolon-separated specs),
  ``TOKENLEAN_DP_LIMIT`` (int);
* ``TOKENLEAN_DP_FAIL_RANK``: that rank raises when its first patch variant starts (the others
  are then inside a collective operation), to check that the launch fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    out_path, log_path = sys.argv[1], sys.argv[2]
    import tokenlean
    from tokenlean.eval import lm_eval_bridge as bridge
    from tokenlean.eval.variants import Variant

    rank, world = bridge.distributed_rank()
    if os.environ.get("TOKENLEAN_DP_FAIL_RANK") == str(rank):
        applied = Variant.applied

        def failing(self, model):
            if self.kind == "patch":
                raise RuntimeError(f"injected failure on rank {rank}")
            return applied(self, model)

        Variant.applied = failing

    tasks = os.environ["TOKENLEAN_DP_TASKS"].split(",")
    methods = [m for m in os.environ.get("TOKENLEAN_DP_METHODS", "").split(";") if m]
    limit = int(os.environ["TOKENLEAN_DP_LIMIT"])
    model, tokenizer = tokenlean.zoo.load("smollm2-135m")
    results = bridge.evaluate(
        model, tokenizer, tasks, methods=methods, limit=limit, progress=False, log_path=log_path
    )
    if rank == 0:
        payload = {"world_size": world, "pid": os.getpid(), "results": results, "tasks": results.tasks}
        with open(out_path, "w", encoding="utf-8") as fh:
            json.dump(payload, fh)
    elif results is not None:
        raise SystemExit(f"rank {rank} got results; only rank 0 should")


if __name__ == "__main__":
    main()
