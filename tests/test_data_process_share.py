"""Process shares of the example stream (jsr.data.process_share): P processes together read exactly the
single-process batches, row for row, for any row layout; a data state saved by P processes continues the
stream on P' processes (and back), with and without worker processes."""

import json
from pathlib import Path

import numpy as np
import pytest

from jsr.data import pipeline as P
from jsr.data import process_share as S

BASE = dict(crop_size=32, batch_size=4, synthetic_images=12, synthetic_size=40, prefetch_batches=0,
            read_threads=0)


def _it(rows=None, **over):
    cfg = {**BASE, **over}
    if rows is None:
        return P.make_iterator(cfg, process_index=0, process_count=1)
    return P.make_iterator(cfg, rows=rows)


def _take(it, n):
    return [next(it)["hq"] for _ in range(n)]


def _assemble(parts, layout, batch_size):
    """The global batches the processes' local ones make (``jax.make_array_from_process_local_data``: process p's
    rows at their global positions)."""
    out = []
    for step in range(len(parts[0])):
        g = np.zeros((batch_size,) + parts[0][step].shape[1:], parts[0][step].dtype)
        for local, rows in zip(parts, layout):
            g[list(rows)] = local[step][:len(rows)]
        out.append(g)
    return out


@pytest.mark.parametrize("layout", [((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0,), (1,), (2,), (3,))])
def test_shares_are_disjoint_and_make_the_single_process_batches(layout):
    single = _take(_it(), 4)  # 16 examples > 12 images: crosses an epoch boundary (new shuffle)
    parts = [_take(_it(rows), 4) for rows in layout]
    for local, rows in zip(parts, layout):
        assert all(b.shape[0] == len(rows) for b in local)
    for got, want in zip(_assemble(parts, layout, 4), single):
        np.testing.assert_array_equal(got, want)
    seen = [bytes(x) for local in parts for b in local for x in b]
    assert len(set(seen)) == len(seen)  # no example read by two processes


def test_contiguous_rows_and_errors():
    assert S.contiguous_rows(1, 2, 8) == (4, 5, 6, 7)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        S.contiguous_rows(0, 3, 8)
    with pytest.raises(ValueError, match="distinct rows"):
        _it(rows=(0, 4))


@pytest.mark.parametrize("n,shuffled", [(12, False), (10, False), (7, False), (12, True)])
def test_distinct_items_counts_what_a_process_sees(n, shuffled):
    for rows in ((0, 1), (2, 3), (1,)):
        seen = {g % n for g in range(4 * n * 4) if g % 4 in rows}
        assert S.distinct_items(rows, 4, n, shuffled) == (n if shuffled else len(seen))


def _states_after(layout, steps, **over):
    its = [_it(rows, **over) for rows in layout]
    for it in its:
        _take(it, steps)
    states = [json.loads(json.dumps(it.get_state())) for it in its]
    for it in its:
        it.close()
    return S.pack(states, layout, 4)


# Worker processes (the multiprocessing prefetch's state form) cost ~7 s per iterator start on the 2-core CPU:
# one layout change with them, the others without.
@pytest.mark.parametrize("before,after,workers", [(((0, 1, 2, 3),), ((0, 1), (2, 3)), 0),
                                                  (((0, 1), (2, 3)), ((0, 1, 2, 3),), 0),
                                                  (((0, 1), (2, 3)), ((0, 2), (1, 3)), 0),
                                                  (((0, 1), (2, 3)), ((0, 1, 2, 3),), 2)])
def test_a_saved_state_continues_on_another_process_count(before, after, workers):
    over = dict(num_workers=workers, read_threads=1) if workers else {}
    saved = json.loads(json.dumps(_states_after(before, 2, **over)))
    want = _take(_it(), 5)[2:]
    parts = []
    for p, rows in enumerate(after):
        it = _it(rows, **over)
        it.set_state(S.reshard_states(saved, rows, 4, it.get_state(), p, after))
        parts.append(_take(it, 3))
        it.close()
    for got, w in zip(_assemble(parts, after, 4), want):
        np.testing.assert_array_equal(got, w)


def test_same_layout_restores_each_process_own_state_and_old_checkpoints_still_load():
    layout = ((0, 1), (2, 3))
    saved = _states_after(layout, 1)
    assert S.reshard_states(saved, (2, 3), 4, {"next_index": 0}, 1, layout) is saved["states"][1]
    # A checkpoint from before process_share: the bare single-process state.
    old = {"next_index": 8}
    assert S.reshard_states(old, (0, 1, 2, 3), 4, {"next_index": 0}, 0, [(0, 1, 2, 3)]) == old
    assert S.reshard_states(old, (2, 3), 4, {"next_index": 0}, 1, layout) == {"next_index": 4}
    with pytest.raises(ValueError, match="global batch 4 when saved, 8 now"):
        S.reshard_states(saved, (0, 1, 2, 3), 8, {"next_index": 0}, 0, [(0, 1, 2, 3)])
    with pytest.raises(ValueError, match="unknown iterator state form"):
        S.reshard_states(S.pack([{"x": 1}, {"x": 1}], layout, 4), (0, 1, 2, 3), 4, {"next_index": 0}, 0,
                         [(0, 1, 2, 3)])


def test_skipped_images_continue_from_the_furthest_process(caplog):
    saved = S.pack([{"next_index": 5}, {"next_index": 4}], ((0, 1), (2, 3)), 4)  # process 0 skipped one image
    assert S.reshard_states(saved, (0, 1, 2, 3), 4, {"next_index": 0}, 0, [(0, 1, 2, 3)]) == {"next_index": 12}
    assert "continues at global batch 3" in caplog.text
