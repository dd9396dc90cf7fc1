"""The temperature: kept inside [tau_min, tau_max] on the stored parameter (never by a forward-only clamp), its own
AdamW group and LR schedule, and a warning when it sits at a bound. 2-rank ZeRO-2/3 runs check that tau comes back
from its lower bound when the objective turns, that the fp32 master in the checkpoint is inside the range, and
that resuming in the middle of it is bit-exact."""

import math

import pytest
import torch
from _launch import ROOT, launch_script, write_ds_config
from torch import nn

from neuclip_ds.checkpoint import load_checkpoint_state_dict
from neuclip_ds.config import TrainConfig
from neuclip_ds.engine import TemperatureKeeper, TemperatureLR, build_optimizer, build_scheduler
from neuclip_ds.launch import metrics
from neuclip_ds.model import build_model

TAU_MIN, TAU_MAX = 0.05, 0.5


# ---------------------------------------------------------------------------------------------------------------
# parametrization, optimizer groups, schedule (no DeepSpeed)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau_param,name,stored", [("log", "logit_scale", math.log(1 / 0.07)), ("raw", "tau", 0.07)])
def test_parametrizations_store_what_they_say(tau_param, name, stored):
    model = build_model("tiny", init_tau=0.07, tau_min=TAU_MIN, tau_max=TAU_MAX, tau_param=tau_param)
    p = model.temperature_parameter
    assert p is getattr(model, name) and p.shape == (1,)  # never 0-dim (ZeRO-2/3)
    assert float(p.detach()) == pytest.approx(stored)
    assert float(model.temperature()) == pytest.approx(0.07)
    lo, hi = model.temperature_bounds()
    if tau_param == "log":
        assert (lo, hi) == pytest.approx((math.log(1 / TAU_MAX), math.log(1 / TAU_MIN)))
    else:
        assert (lo, hi) == (TAU_MIN, TAU_MAX)


def test_forward_does_not_clamp_and_gradient_survives_outside_the_range():
    """The range is the engine's job after the step; forward reports the stored value and keeps its gradient."""
    model = build_model("tiny", init_tau=0.07, tau_min=TAU_MIN, tau_max=TAU_MAX, tau_param="raw")
    with torch.no_grad():
        model.tau.fill_(0.01)
    tau = model.temperature()
    assert float(tau) == pytest.approx(0.01)
    tau.sum().backward()
    assert float(model.tau.grad) == 1.0


def test_temperature_has_its_own_group_without_weight_decay():
    model = build_model("tiny", tau_param="log")
    cfg = TrainConfig(lr=2e-3, lr_tau=1e-4, wd=0.1)
    opt = build_optimizer(model, cfg)
    tau_groups = [g for g in opt.param_groups if g.get("is_temperature")]
    assert len(tau_groups) == 1 and tau_groups[0]["params"] == [model.logit_scale]
    assert tau_groups[0]["weight_decay"] == 0.0 and tau_groups[0]["lr"] == 1e-4
    others = [p for g in opt.param_groups if not g.get("is_temperature") for p in g["params"]]
    assert all(p is not model.logit_scale for p in others)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    assert TrainConfig(lr=2e-3).tau_lr() == 2e-3  # default: the encoder lr


def test_step_thresh_schedule_is_fastclips():
    """FastCLIP-v3 step_lr_thresh: (step+1)/warmup during warmup, then 1, times 1/3 while tau <= 0.03."""
    f = TemperatureLR("step_thresh", warmup=4, total=100, tau=0.07)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(50) == 1.0 and f(99) == 1.0  # constant: no cosine decay
    f.tau = 0.03
    assert f(50) == pytest.approx(1 / 3)
    f.tau = 0.0301
    assert f(50) == 1.0
    cos = TemperatureLR("cosine", warmup=4, total=104, tau=0.01)
    assert cos(4) == 1.0 and cos(54) == pytest.approx(0.5) and cos(104) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_gives_the_temperature_group_its_factor():
    model = build_model("tiny")
    cfg = TrainConfig(lr=1e-3, lr_tau=3e-4, warmup=2, lr_tau_schedule="step_thresh")
    opt = build_optimizer(model, cfg)
    sched, factor = build_scheduler(opt, cfg, total_steps=10)
    for _ in range(5):
        opt.step()
        sched.step()
    factor.tau = 0.02
    opt.step()
    sched.step()
    lrs = {bool(g.get("is_temperature")): g["lr"] for g in opt.param_groups}
    assert lrs[True] == pytest.approx(1e-4)  # 3e-4 / 3 below the threshold
    assert lrs[False] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


@pytest.mark.parametrize("schedule", ["cosine", "step_thresh"])
def test_resumed_temperature_schedule_follows_the_new_length(schedule):
    """A resume with another --steps/--warmup: the scheduler state restores the temperature factor as saved, the
    encoders' closure takes the new lengths; after `follow` both groups run the new schedule, as a fresh
    scheduler of the new lengths does (tau and the step count carry over)."""
    model = build_model("tiny")
    old = TrainConfig(lr=1e-3, warmup=2, lr_tau_schedule=schedule)
    opt = build_optimizer(model, old)
    sched, _ = build_scheduler(opt, old, total_steps=10)
    for _ in range(3):
        opt.step()
        sched.step()
    saved = sched.state_dict()

    new = TrainConfig(lr=1e-3, warmup=4, lr_tau_schedule=schedule)
    opt2 = build_optimizer(model, new)
    sched2, factor2 = build_scheduler(opt2, new, total_steps=40)
    sched2.load_state_dict(saved)
    assert (factor2.warmup, factor2.total) == (2, 10)  # what the scheduler's state alone leaves
    factor2.follow(new.lr_tau_schedule, new.warmup, 40)

    opt3 = build_optimizer(model, new)
    _, fresh_factor = build_scheduler(opt3, new, total_steps=40)
    fresh_factor.tau = factor2.tau
    assert vars(factor2) == vars(fresh_factor)
    encoders = next(f for f, g in zip(sched2.lr_lambdas, opt2.param_groups) if not g.get("is_temperature"))
    for step in (3, 5, 20, 39):
        assert factor2(step) == fresh_factor(step)
        if schedule == "cosine":  # the temperature's factor is the encoders'
            assert factor2(step) == encoders(step)


class _OneTemperature(nn.Module):
    """What TemperatureKeeper reads off a model, for a plain (non-DeepSpeed) parameter."""

    def __init__(self, tau_param="log"):
        super().__init__()
        self.tau_min, self.tau_max, self.tau_param = TAU_MIN, TAU_MAX, tau_param
        self.p = nn.Parameter(torch.tensor([math.log(1 / 0.1)] if tau_param == "log" else [0.1]))

    @property
    def temperature_parameter(self):
        return self.p

    def temperature_bounds(self):
        from neuclip_ds.model import parameter_bounds

        return parameter_bounds(self.tau_param, self.tau_min, self.tau_max)


@pytest.mark.parametrize("tau_param", ["log", "raw"])
def test_keeper_clamps_the_parameter_and_warns_once_per_episode(tau_param, capsys):
    m = _OneTemperature(tau_param)
    keeper = TemperatureKeeper(m, rank=0, warn_after=50)
    below = math.log(1 / 0.01) if tau_param == "log" else 0.01  # tau = 0.01 < tau_min
    for step in range(120):
        with torch.no_grad():
            m.p.fill_(below)  # the optimizer pushes past the bound each step
        assert keeper.after_step(step) == pytest.approx(TAU_MIN)
        lo, hi = (float(torch.tensor(b, dtype=torch.float32)) for b in m.temperature_bounds())
        assert lo <= float(m.p.detach()) <= hi
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tau has sat at its lower bound 0.05 for 50 steps (step 51)" in err[0]
    with torch.no_grad():  # leaves the bound: a new episode
        m.p.fill_(math.log(1 / 0.1) if tau_param == "log" else 0.1)
    assert keeper.after_step(120) == pytest.approx(0.1)
    for step in range(121, 190):
        with torch.no_grad():
            m.p.fill_(math.log(1 / 0.9) if tau_param == "log" else 0.9)  # above tau_max
        keeper.after_step(step)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "upper bound 0.5" in err[0]
    assert keeper.tau == pytest.approx(TAU_MAX)


def test_keeper_inside_the_range_writes_nothing():
    m = _OneTemperature("log")
    keeper = TemperatureKeeper(m, rank=0)
    before = m.p.detach().clone()
    assert keeper.after_step(0) == pytest.approx(0.1)
    assert torch.equal(m.p.detach(), before) and keeper.steps_at_bound == 0


# ---------------------------------------------------------------------------------------------------------------
# 2 ranks under ZeRO-2 / ZeRO-3: down onto the bound, back up, checkpoint, resume
# ---------------------------------------------------------------------------------------------------------------
STEPS, FLIP, SAVE = 28, 10, 12
ARGS = (
    f"--loss mbcl --synthetic-samples 128 --steps {STEPS} --global-batch-size 16 --lr 1e-3 --lr-tau 0.05"
    f" --lr-tau-schedule step_thresh --warmup 1 --init-tau 0.07 --tau-min {TAU_MIN} --tau-max {TAU_MAX}"
    f" --save-every {SAVE} --keep-last 3 --precision fp32 --report-to jsonl"
).split()


def _ds_config(tmp_path, name, stage):
    if stage == "3-offload":
        return str(ROOT / "ds_configs" / "zero3_offload.json")
    return write_ds_config(tmp_path / f"{name}.json", stage=stage)


@pytest.fixture
def tau_flip(monkeypatch):
    """The step tests/scripts/tau_push.py turns the objective at (the launcher passes the environment to every
    rank)."""
    monkeypatch.setenv("TAU_FLIP_STEP", str(FLIP))


def _run(tmp_path, name, stage, extra=()):
    out = tmp_path / name
    ds = _ds_config(tmp_path, name, stage)
    launch_script(
        "tests/scripts/tau_push.py",
        [*ARGS, "--ds-config", ds, "--output-dir", str(out), *extra],
        nproc=2,
        timeout=400,
    )
    return out


def _check_tau_turns(rows):
    taus = [r["tau"] for r in rows]  # the tau each step's forward used
    assert len(taus) == STEPS
    assert min(taus) >= TAU_MIN * (1 - 1e-6)  # never below: the parameter is kept inside
    at_bound = [i for i, t in enumerate(taus) if t <= TAU_MIN * (1 + 1e-6)]
    assert at_bound and at_bound[0] < FLIP, taus  # driven onto the bound before the turn
    assert taus[-1] > 1.2 * TAU_MIN, taus  # ... and back up after it
    assert all(b >= a for a, b in zip(taus[-6:], taus[-5:])), taus  # rising steadily at the end


@pytest.mark.parametrize("stage", [0, 1, "3-offload"])
@pytest.mark.usefixtures("tau_flip")
def test_tau_leaves_its_lower_bound_on_every_stage(tmp_path, stage):
    _check_tau_turns(metrics(_run(tmp_path, f"z{stage}", stage)))


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.usefixtures("tau_flip")
def test_tau_leaves_its_lower_bound_checkpoint_in_range_resume_exact(tmp_path, stage):
    out = _run(tmp_path, f"z{stage}", stage)
    rows = metrics(out)
    _check_tau_turns(rows)
    # the stored fp32 masters of both checkpoints are inside the range (step 12: AdamW's momentum still pushing down)
    lo, hi = math.log(1 / TAU_MAX), math.log(1 / TAU_MIN)
    for step in (SAVE, STEPS):
        state = load_checkpoint_state_dict(out / "checkpoints", f"step{step:08d}")
        value = float(state["logit_scale"].detach())
        assert lo - 1e-7 <= value <= hi + 1e-7, (step, value)
    assert float(
        load_checkpoint_state_dict(out / "checkpoints", f"step{SAVE:08d}")["logit_scale"].detach()
    ) == pytest.approx(hi, abs=1e-6)
    # resume at step 12 (tau on its bound, momentum pushing outward) continues exactly like the uninterrupted run
    resumed = _run(
        tmp_path, f"z{stage}_resumed", stage, extra=["--resume", str(out / "checkpoints" / f"step{SAVE:08d}")]
    )
    again = metrics(resumed)
    assert [r["step"] for r in again] == list(range(SAVE + 1, STEPS + 1))
    for a, b in zip(rows[SAVE:], again):
        assert (a["loss"], a["tau"], a["lr_tau"]) == (b["loss"], b["tau"], b["lr_tau"]), (a["step"], a, b)
