"""An epoch's history row: one member's in Python floats and every member's as arrays are the same numbers."""

from __future__ import annotations

import math

import numpy as np

from gdlab.epoch_table import STEP_COLUMNS, BlockLayout, EpochTable, history_columns

LAYOUT = BlockLayout(n_metrics=4, n_numbers=1, n_layers=3)  # train and test, one logged number, 3 layers
NAMES = ["epoch", "train/loss", "train/acc", "test/loss", "test/acc", "grad_norm",
         *(f"grad_norm/layer{l}" for l in (1, 2, 3)), *STEP_COLUMNS, "hp/optimizer.lr"]  # fmt: skip


def measured_block(P: int, seed: int = 0) -> np.ndarray:
    """(rows, P) as `TrainingModule.epoch_block` lays them out, with a diverged member and an overflowed
    gradient among them."""
    rng = np.random.default_rng(seed)
    rows = 4 + 7 + 1 + 2 * 3
    block = rng.uniform(0.0, 3.0, size=(rows, P))
    block[4 + 3 : 4 + 7] = rng.integers(0, 5, size=(4, P))  # backtracks, failed, evals_fwd, evals_fwdbwd
    if P > 2:
        block[0, 1], block[12, 2] = math.nan, math.inf  # member 1 diverged; member 2's |dW1| overflowed
    return block


def test_one_members_row_in_floats_equals_its_column_of_the_population_row():
    P = 5
    block, counts = measured_block(P), np.arange(15.0).reshape(3, P)
    row, after = history_columns(list(block), list(counts), 7, 1.5, LAYOUT, np.sqrt)
    assert len(row) == len(NAMES)
    for p in range(P):
        single, single_after = history_columns(block[:, p].tolist(), counts[:, p].tolist(), 7, 1.5, LAYOUT,
                                               math.sqrt)  # fmt: skip
        np.testing.assert_array_equal(np.array(single), np.array([np.broadcast_to(v, P)[p] for v in row]))
        np.testing.assert_array_equal(single_after, [a[p] for a in after])


def test_the_derived_columns_are_the_norms_and_running_totals_they_name():
    block, counts = measured_block(1), [2.0, 10.0, 20.0]
    row, after = history_columns(block[:, 0].tolist(), counts, 3, 0.25, LAYOUT, math.sqrt)
    values = dict(zip(NAMES, row, strict=True))
    norms = block[12:, 0]  # |dW1|, |db1|, |dW2|, |db2|, |dW3|, |db3|
    assert values["grad_norm"] == math.sqrt(sum(n * n for n in norms))
    assert values["grad_norm/layer2"] == math.sqrt(norms[2] ** 2 + norms[3] ** 2)
    assert values["loss_before"] == values["train/loss"] == block[0, 0]
    failed, fwd, fwdbwd = block[8:11, 0]
    assert after == [2.0 + failed, 10.0 + fwd, 20.0 + fwdbwd]
    assert values["ls_failures"] == 2.0 + failed
    assert values["evals/total"] == 30.0 + fwd + fwdbwd
    assert values["evals/fwd"] == fwd
    assert values["hp/optimizer.lr"] == block[11, 0]
    assert (values["epoch"], values["time"]) == (3, 0.25)
    assert NAMES[LAYOUT.total_column] == "evals/total"


def test_a_members_values_are_its_own_after_another_member_or_block_was_asked():
    table = EpochTable(NAMES, 3)
    for epoch in range(2):
        row, _ = history_columns(list(measured_block(3, seed=epoch)), list(np.zeros((3, 3))), epoch, 0.1,
                                 LAYOUT, np.sqrt)  # fmt: skip
        table.append(np.array([np.broadcast_to(v, 3) for v in row], dtype=float), np.ones(3, dtype=bool))
    for p, epoch in [(0, -1), (0, -1), (2, -1), (0, 0), (0, -1)]:
        row = table.row(p, epoch)
        assert row["epoch"] == (1 if epoch == -1 else 0) and isinstance(row["epoch"], int)
        assert row["train/loss"] == table.blocks[epoch][1, p] or math.isnan(table.blocks[epoch][1, p])
        line = table.format_row(table.blocks[epoch], p)
        assert line.split(",")[0] == str(row["epoch"])
        assert line.split(",")[5] == repr(row["grad_norm"])
