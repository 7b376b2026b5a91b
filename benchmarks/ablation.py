"""Where the tiny-MLP loop overhead goes: train_model_advanced with features added one by one,
against the hand-written loop, in one process (3 epochs x 64 steps, median of 5, interleaved).

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        PYTHONPATH=src:. .venv/bin/python benchmarks/ablation.py
"""

import statistics
import tempfile
import time

import torch

from advanced_training_utils import train_model_advanced
from benchmarks import cases

torch.set_num_threads(1)
tl, vl = cases._loaders()
steps = 3 * len(tl)


def ours(**kw):
    base = dict(epochs=3, learning_rate=1e-3, device="cpu", scheduler_type="step", step_size=10,
                gamma=0.5, gradient_clip=1.0, restore_best_weights=False, handle_signals=False,
                verbose=False)
    base.update(kw)
    return lambda: train_model_advanced(cases._mlp(), tl, vl, torch.nn.CrossEntropyLoss(), **base)


d = tempfile.mkdtemp()
variants = {
    "hand-written loop": lambda: cases._hand_loop(cases._mlp(), tl, vl, 3),
    "ours, guard/recovery off": ours(recovery=False, spike_factor=None),
    "+ non-finite guard, recovery": ours(spike_factor=None),
    "+ loss-spike detection": ours(),
    "+ stability checks every epoch": ours(check_stability=True, stability_every=1),
    "+ checkpoints every epoch": ours(check_stability=True, stability_every=1, checkpoint_dir=d),
    "+ progress bar (verbose, to /dev/null)": lambda: cases._ours(cases._mlp(), tl, vl, 3, d),
}
for f in variants.values():
    f()
res = {k: [] for k in variants}
for _ in range(5):
    for k, f in variants.items():
        t = time.perf_counter()
        f()
        res[k].append(time.perf_counter() - t)
h = statistics.median(res["hand-written loop"])
print("| configuration | ms for 192 steps | us/step over the hand loop |\n| --- | --- | --- |")
for k, v in res.items():
    m = statistics.median(v)
    print(f"| {k} | {m * 1e3:.1f} | {(m - h) / steps * 1e6:+.1f} |")
