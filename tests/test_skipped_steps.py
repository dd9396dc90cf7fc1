"""A skipped step leaves the estimators as they were, in process and without DeepSpeed: FastCLIP's u tables
(only the rows the step touches are saved, and put back bitwise), an fp16 loss-scale overflow that DeepSpeed
reports only after its step (a faked engine), and NPN restarts due at a skipped step."""

import types

import torch

from neuclip_ds.engine import NeuCLIPEngine, NPNEstimator, PhaseTimer, StepBatch, TableEstimator
from neuclip_ds.losses import FastCLIPLoss, ShardedLogTable

N, B = 64, 8


def step_batch(step: int, index: list[int], seed: int = 0) -> StepBatch:
    gen = torch.Generator().manual_seed(seed + step)
    log_g = torch.randn(2, len(index), generator=gen)
    img = torch.nn.functional.normalize(torch.randn(len(index), 4, generator=gen), dim=1)
    return StepBatch(
        img, img.flip(0), torch.tensor([0.07]), log_g[0], log_g[1], log_g[0], log_g[1],
        torch.tensor(index), slice(0, len(index)), step, 0,
    )  # fmt: skip


def tables(est: TableEstimator) -> list[torch.Tensor]:
    return [t.log_u.clone() for t in (est.loss_fn.u_img, est.loss_fn.u_txt)]


def test_fastclip_restore_puts_the_touched_rows_back_bitwise():
    est = TableEstimator(FastCLIPLoss(N))
    est.prepare(step_batch(0, list(range(B))))  # some rows visited, the rest still -inf
    before = tables(est)
    batch = step_batch(1, [3, 3, 10, 20, 63, 0, 5, 40])  # visited and unvisited rows, one repeated
    snap = est.snapshot(batch)
    est.prepare(batch)
    assert not all(torch.equal(a, b) for a, b in zip(before, tables(est)))
    est.restore(snap)
    assert all(torch.equal(a, b) for a, b in zip(before, tables(est)))
    assert all(rows.numel() == B for rows, _ in snap)  # the batch's rows, not the table


def test_sharded_table_snapshot_holds_this_ranks_rows_only():
    table = ShardedLogTable(N, rank=1, world_size=2)
    table.log_u.copy_(torch.arange(table.log_u.numel(), dtype=torch.float32))
    before = table.log_u.clone()
    rows, values = table.snapshot_rows(torch.tensor([1, 2, 3, 3, 64, -1, 63]))
    assert rows.tolist() == [0, 1, 1, 31]  # 1, 3, 3, 63; 2 is rank 0's, 64 and -1 are outside the table
    table.log_u[rows] = float("nan")
    table.restore_rows(rows, values)
    assert torch.equal(table.log_u, before)


class _FakeDeepSpeed:
    """What train_step asks of DeepSpeed's engine; `overflow` makes its step skip the update as the fp16 loss
    scaler does (skipped_steps + 1, nothing applied)."""

    def __init__(self, overflow: bool):
        self.overflow, self.skipped_steps, self.applied = overflow, 0, 0

    def backward(self, loss, scale_wrt_gas=True):
        pass

    def step(self):
        if self.overflow:
            self.skipped_steps += 1
        else:
            self.applied += 1


def fake_engine(estimator, *, overflow: bool) -> NeuCLIPEngine:
    eng = object.__new__(NeuCLIPEngine)
    eng.info = types.SimpleNamespace(device=torch.device("cpu"), world_size=1, rank=0)
    eng.accumulation, eng.timer, eng.estimator = 1, PhaseTimer(torch.device("cpu")), estimator
    eng.skipped_steps, eng.skipped_in_a_row = 0, 0
    eng.ds = _FakeDeepSpeed(overflow)
    eng.cfg = types.SimpleNamespace(precision="fp16", max_skipped_in_a_row=5)
    eng.temperature = types.SimpleNamespace(after_step=lambda step: 0.07)
    eng.temperature_lr = types.SimpleNamespace(tau=0.07)
    eng.optimizer = types.SimpleNamespace(param_groups=[{"is_temperature": True, "lr": 1e-3}])
    eng._encode = lambda mb: {}
    eng._with_graph = lambda a, mb, cache, outputs: (None, {})
    eng.loss_call = lambda feats, **kw: torch.tensor(2.5, requires_grad=True)
    return eng


def test_fp16_overflow_undoes_the_fastclip_update_and_counts_the_step():
    est = TableEstimator(FastCLIPLoss(N))
    est.prepare(step_batch(0, list(range(B))))
    before = tables(est)
    eng = fake_engine(est, overflow=True)
    eng._gather = lambda outputs, mbs, step, epoch: (None, step_batch(step, [1, 2, 9, 30, 31, 32, 60, 61]))
    m = eng.train_step([{}], step=1, epoch=0)
    assert m["skipped"] and m["skip_reason"] == "fp16 loss-scale overflow" and m["loss"] == 2.5
    assert eng.skipped_steps == 1 and eng.skipped_in_a_row == 0  # counted, but not towards an abort
    assert all(torch.equal(a, b) for a, b in zip(before, tables(est)))

    eng.ds.overflow = False  # the next step applies: its update stays
    m = eng.train_step([{}], step=2, epoch=0)
    assert not m["skipped"] and eng.skipped_steps == 1 and eng.ds.applied == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, tables(est)))


def test_a_skipped_update_without_fp16_is_a_non_finite_step():
    """ZeRO's optimizers skip an update with non-finite gradients in any precision; without a loss scaler to
    recover, that is a non-finite step (towards --max-skipped-in-a-row), the estimator's update undone too."""
    est = TableEstimator(FastCLIPLoss(N))
    before = tables(est)
    eng = fake_engine(est, overflow=True)
    eng.cfg.precision = "bf16"
    eng._gather = lambda outputs, mbs, step, epoch: (None, step_batch(step, list(range(B))))
    m = eng.train_step([{}], step=0, epoch=0)
    assert m["skip_reason"] == "non-finite gradients" and eng.skipped_steps == eng.skipped_in_a_row == 1
    assert all(torch.equal(a, b) for a, b in zip(before, tables(est)))


class _FakeNPN:
    def __init__(self):
        self.restarts, self.version = [], 0

    def restart(self, img, txt, seed, reset_optimizer=False):
        self.restarts.append(seed)
        self.version += 1

    def fit(self, *args, **kwargs):
        self.version += 1
        return 0.0

    def predict(self, img, txt, tau):
        return torch.zeros(len(img)), torch.zeros(len(img))

    def state_dict(self):
        return {"version": self.version, "restarts": list(self.restarts)}

    def load_state_dict(self, state):
        self.version, self.restarts = state["version"], list(state["restarts"])


def test_npn_restart_due_at_a_skipped_step_happens_at_the_next_step():
    """T_r = 4: restarts at 0 and 4; step 4 overflows, so the restart happens at step 5, and the next one at 8
    as planned (not 4 steps after 5, nor one period late at 8 only)."""
    cfg = types.SimpleNamespace(
        npn_parallel="replicated", npn_restart_every=4, seed=0, npn_restart_resets_adagrad=False,
        npn_update="alternating", npn_inner_steps=1,
    )  # fmt: skip
    npn = _FakeNPN()
    est = NPNEstimator(npn, cfg)
    eng = fake_engine(est, overflow=False)
    eng._gather = lambda outputs, mbs, step, epoch: (None, step_batch(step, list(range(B))))
    restarted = []
    for step in range(10):
        eng.ds.overflow = step == 4
        n = len(npn.restarts)
        m = eng.train_step([{}], step=step, epoch=0)
        if len(npn.restarts) > n and not m["skipped"]:
            restarted.append(step)
    assert restarted == [0, 5, 8]
    assert est.state_dict()["last_restart"] == 8
    fresh = NPNEstimator(_FakeNPN(), cfg)
    fresh.load_state_dict({"npn": npn.state_dict()})  # a checkpoint from before last_restart: every T_r steps
    assert [s for s in range(12) if fresh._restart_due(s)] == [0, 4, 8]
