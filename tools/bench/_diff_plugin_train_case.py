"""One Diff-Plugin training benchmark case in its own process (run by tools/bench/diff_plugin.py): the tiny SD1.x
model, VAE and CLIP vision of the tests; N tiny pairs (64 px PNGs) streamed; prints one JSON line with
pairs/s and memory. Usage: python tools/bench/_diff_plugin_train_case.py PAIRS STEPS BATCH."""
from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))


def main() -> int:
    from tools.harness import host

    host.register_pack()
    host.setup_in_process()
    import numpy as np
    import torch
    from PIL import Image

    from plugkit.nodes.diff_plugin.runs import train_from_folder
    from tools.bench import rss_growth
    from tools.fixtures.models import build_clip_vision, build_model, build_vae

    n, steps, batch = (int(a) for a in sys.argv[1:4])
    model, cv, vae = build_model(seed=0), build_clip_vision(seed=0, layers=2, intermediate=256), build_vae(seed=0, channels=32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "input").mkdir()
        (root / "target").mkdir()
        rng = np.random.default_rng(0)
        for i in range(n):
            clean = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
            Image.fromarray(clean).save(root / "target" / f"{i:05d}.png")
            Image.fromarray(np.clip(clean.astype(int) + 40, 0, 255).astype(np.uint8)).save(root / "input" / f"{i:05d}.png")
        times = []
        seconds = []

        def train():
            t0 = time.perf_counter()
            train_from_folder(model, cv, vae, str(root), root / "p.safetensors", name="p", resolution=64, steps=steps,
                              batch_size=batch, learning_rate=1e-4, save_every=0, seed=0,
                              on_step=lambda step, loss: times.append(time.perf_counter()))
            seconds.append(time.perf_counter() - t0)

        growth = rss_growth(train)
        total = seconds[0]
    warm = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else total
    sys.stdout.write(json.dumps({
        "pairs": n, "steps": steps, "batch": batch, "pairs_per_s": batch / warm, "seconds": total,
        "rss_growth": growth, "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads()}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
