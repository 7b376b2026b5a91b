"""Two-process side of the differential test, run under torchrun (gloo on the CPU).

    torchrun --standalone --nproc-per-node 2 tests/diff_worker.py OUT

Reads OUT/configs.json (a list of ``test_differential.Config`` fields), trains each one with
``test_differential.run_ours`` in this one launch (torchrun starts cost 10-20 s each), and writes
OUT/{i}_rank{r}.pt: the final weights, the complete passes the user's sampler made on this rank,
and the error (None when the run finished). The process group is created here, once, so
``train_model_advanced`` neither creates nor destroys it between configurations.
"""

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from test_differential import Config, run_ours


def main() -> int:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    configs = [Config(**c) for c in json.loads((out / "configs.json").read_text())]
    for i, c in enumerate(configs):
        state, passes, error = None, [], None
        try:
            net, train = run_ours(c)
            state = net.state_dict()
            passes = list(getattr(getattr(train, "sampler", None), "passes", []))
        except Exception as e:  # noqa: BLE001  (reported per configuration by the test)
            error = f"{type(e).__name__}: {e}"
        torch.save({"state": state, "passes": passes, "error": error}, out / f"{i}_rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
