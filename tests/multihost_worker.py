"""One process of a multi-process test run: ``python tests/multihost_worker.py OUT_PREFIX train.py-flags...``.

Runs ``train.py`` (its own ``main``, flags and all) in this process and records, for the test to check:

- ``OUT_PREFIX.batches.jsonl``: one line per batch the loop takes from its data iterator (a resumed run's first
  feeds the checkpoint's step): a digest of each example (its HQ crop's bytes), in this process's local order;
- ``OUT_PREFIX.state.npz`` (process 0, when ``train`` returns): the final train state's leaves by tree path.

Only ``tests/test_multihost.py`` starts it; each process gets its own ``XLA_FLAGS`` device count.
"""

import hashlib
import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _digest(x) -> str:
    return hashlib.sha1(x.tobytes()).hexdigest()[:16]


def main() -> None:
    prefix, argv = Path(sys.argv[1]), sys.argv[2:]
    sys.path.insert(0, str(ROOT))
    import jax
    import numpy as np

    from jsr.train import loop

    real_iterator, real_train = loop.make_iterator, loop.train

    class Recording:
        def __init__(self, it):
            self.it = it

        def __next__(self):
            batch = next(self.it)
            with open(f"{prefix}.batches.jsonl", "a") as f:
                f.write(json.dumps([_digest(x) for x in batch["hq"]]) + "\n")
            return batch

        def __getattr__(self, name):
            return getattr(self.it, name)

    def make_iterator(cfg, **kw):
        return Recording(real_iterator(cfg, **kw))

    def train(config, workdir, *args, **kw):
        summary = real_train(config, workdir, *args, **kw)
        if jax.process_index() == 0:
            leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(summary["state"]))[0]
            np.savez(f"{prefix}.state.npz", **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
        return summary

    loop.make_iterator, loop.train = make_iterator, train
    sys.argv = ["train.py", *argv]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
