"""Meta-World MT10/MT50 with multi-task SAC (problems ``mt10``, ``mt50``; ``experiments.sac``).

The SAC pieces are checked without environments: the tanh-Gaussian log-density against
torch.distributions, the per-task split of the losses (task i's loss sees only task i's
transitions and temperature), Polyak averaging exactly, the replay buffer's ring and state.
With the ``rl`` extra installed: goals as Meta-World makes them (accepted by the tasks that
reject-sample theirs, observable, reproducible), a replayed episode lands on the bit-identical
state (what a resumed run relies on), and success counted as Meta-World defines it.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

import deconflict
from deconflict.experiments.problems import get_problem
from deconflict.experiments.problems import metaworld as mw
from deconflict.experiments.sac import Actor, MultiTaskSAC, ReplayBuffer, SACConfig

EPS64 = torch.finfo(torch.float64).eps


def agent(tasks: int = 3, method: str = "sum", dtype: torch.dtype = torch.float64
          ) -> MultiTaskSAC:
    torch.manual_seed(0)
    sac = MultiTaskSAC(5 + tasks, 2, [f"t{i}" for i in range(tasks)],
                       SACConfig(hidden=8, layers=2, tau=0.25), deconflict.get(method),
                       deconflict.get(method))
    for module in (sac.actor, sac.critic, sac.critic_target):
        module.to(dtype)
    return sac


def batch(tasks: int = 3, n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(tasks, n, 5 + tasks, generator=g, dtype=torch.float64)
    return [obs, torch.rand(tasks, n, 2, generator=g, dtype=torch.float64) * 2 - 1,
            torch.rand(tasks, n, generator=g, dtype=torch.float64),
            torch.randn(tasks, n, 5 + tasks, generator=g, dtype=torch.float64),
            torch.zeros(tasks, n, dtype=torch.float64)]


# ------------------------------------------------------------------------------- the agent
def test_the_tanh_gaussian_log_density_matches_torch_distributions():
    torch.manual_seed(0)
    actor = Actor(6, 3, 16, 2).double()
    obs = torch.randn(64, 6, dtype=torch.float64)
    noise = 3 * torch.randn(64, 3, dtype=torch.float64)  # far tails: tanh saturates
    action, log_pi, mean = actor(obs, noise)
    mu, raw = actor.net(obs).chunk(2, dim=-1)
    log_std = -20 + 11 * (torch.tanh(raw) + 1)
    u = mu + log_std.exp() * noise
    std = log_std.exp()
    # torch.distributions on the pre-tanh value u (inverting tanh(u) loses u where tanh
    # saturates): log N(u; mu, sigma) - log |d tanh(u) / du|.
    reference = (torch.distributions.Normal(mu, std).log_prob(u)
                 - torch.distributions.TanhTransform().log_abs_det_jacobian(u, torch.tanh(u))
                 ).sum(-1)
    # Each of the 3 dimensions adds a few terms, each within a few roundings of its size; the
    # reference recovers eps = (u - mu) / sigma, off by about eps_mach (|u| + |mu|) / sigma.
    size = (noise.pow(2) + log_std.abs() + u.abs() + 2
            + noise.abs() * (u.abs() + mu.abs()) / std).sum(-1)
    assert torch.all((log_pi - reference).abs() <= 32 * EPS64 * size)
    # Independently, where tanh is far from saturating: the textbook log(1 - tanh(u)^2).
    moderate = u.abs().lt(2).all(-1)
    naive = (torch.distributions.Normal(mu, std).log_prob(u)
             - torch.log1p(-torch.tanh(u).pow(2))).sum(-1)
    # log1p(-t^2) near t^2 = tanh(2)^2 ~ 0.93: relative error ~ eps / (1 - t^2) ~ 15 eps.
    assert moderate.any()
    assert torch.all((log_pi - naive).abs()[moderate] <= 512 * EPS64 * size[moderate])
    assert torch.isfinite(log_pi).all()  # the stable form stays finite where tanh saturates
    assert torch.equal(mean, torch.tanh(mu)) and torch.equal(action, torch.tanh(u))


def test_each_task_loss_sees_only_its_own_transitions_and_temperature():
    sac = agent()
    data = batch()
    torch.manual_seed(1)  # the target's a' is sampled: the same draws for both
    reference = torch.stack(sac.critic_losses(data)).detach()
    changed = [part.clone() for part in data]
    changed[2][1] += 5.0  # task 1's rewards
    with torch.no_grad():
        sac.log_alpha[2] += 1.0  # task 2's temperature
    torch.manual_seed(1)
    again = torch.stack(sac.critic_losses(changed)).detach()
    assert torch.equal(again[0], reference[0])
    assert again[1] != reference[1] and again[2] != reference[2]

    noise = torch.randn(3, 4, 2, dtype=torch.float64)
    actor, log_pi = sac.actor_losses(data[0], noise)
    # By hand for task 0: E[alpha_0 log pi - min(Q1, Q2)] over its 4 transitions.
    action, log_p, _ = sac.actor(data[0][0], noise[0])
    q1, q2 = sac.critic(data[0][0], action)
    by_hand = (sac.alpha()[0] * log_p - torch.min(q1, q2)).mean()
    size = float(((sac.alpha()[0] * log_p).abs().mean() + torch.min(q1, q2).abs().mean()).detach())
    assert torch.allclose(actor[0], by_hand, rtol=0, atol=64 * EPS64 * size)
    assert torch.equal(log_pi[0], log_p)
    assert all(p.requires_grad for p in sac.critic.parameters())  # unfrozen again


def test_an_update_averages_the_targets_exactly_and_leaves_critics_to_the_critic_loss():
    sac = agent(method="pcgrad")
    before_target = [p.detach().clone() for p in sac.critic_target.parameters()]
    losses = sac.update(batch())
    after = list(sac.critic.parameters())
    for old, target, critic in zip(before_target, sac.critic_target.parameters(), after,
                                   strict=True):
        # lerp: old + tau (critic - old), one rounding per operation
        expected = old + 0.25 * (critic.detach() - old)
        bound = 4 * EPS64 * (old.abs() + critic.detach().abs())
        assert torch.all((target - expected).abs() <= bound)
    assert set(losses) == {"critic", "actor", "alpha"} and losses["critic"].shape == (3,)
    assert sac.updates == 1
    assert sac.critic_monitor.steps == 1 and sac.actor_monitor.steps == 1


def test_the_temperature_step_is_the_entropy_gap_per_task():
    """d/dlog alpha_i of alpha_i E_i[-log pi - H_target] is alpha_i E_i[-log pi - H_target]:
    with SGD, each task's log alpha moves by -lr times its own gap."""
    sac = agent(tasks=2)
    sac.alpha_optimizer = torch.optim.SGD([sac.log_alpha], lr=0.1)
    copy = agent(tasks=2)
    data = batch(tasks=2)
    before = sac.log_alpha.detach().clone()
    torch.manual_seed(5)
    sac.update(data)
    torch.manual_seed(5)
    copy.critic_losses(data)  # the update's draws before the actor's noise
    noise = torch.randn(2, 4, 2)  # float32, as the update draws it
    log_pi = copy.actor(data[0], noise)[1].detach()
    gap = (-log_pi - copy.target_entropy).mean(dim=1)
    expected = before - 0.1 * before.exp() * gap
    step = sac.log_alpha.detach()
    # log alpha is float32: a few float32 roundings of the step's terms.
    eps32 = torch.finfo(torch.float32).eps
    assert torch.all((step - expected).abs() <= 8 * eps32 * (before.abs() + 0.1 * gap.abs()))
    assert torch.all(step != before)


def test_the_replay_buffer_is_a_ring_and_its_state_round_trips():
    buffer = ReplayBuffer(3, 2, 1)
    for k in range(5):
        buffer.add(np.full(2, k), np.full(1, -k), float(k), np.full(2, k + 1), k == 4)
    assert buffer.size == 3 and buffer.position == 2
    assert buffer.rewards.tolist() == [3.0, 4.0, 2.0] and buffer.terminated.tolist() == [0, 1, 0]
    copy = ReplayBuffer(3, 2, 1)
    copy.load_state_dict(buffer.state_dict())
    a = buffer.sample(50, np.random.default_rng(0))
    b = copy.sample(50, np.random.default_rng(0))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert set(a[2].tolist()) <= {2.0, 3.0, 4.0}
    assert torch.equal(a[3][:, 0], a[0][:, 0] + 1)  # s' stays with its s


# ------------------------------------------------------------------------- the problem
def test_the_benchmarks_tasks_and_the_subset_setting():
    mt10, mt50 = get_problem("mt10"), get_problem("mt50")
    assert len(mt10.tasks({})) == 10 and len(mt50.tasks({})) == 50
    assert set(mt10.tasks({})) <= set(mt50.tasks({}))
    config = mt50.resolve_config({"subset": "window-open,reach"})
    assert mt50.tasks(config) == ("reach", "window-open")  # the benchmark's order
    assert [m.name for m in mt50.metrics(config)] == ["success", "success_reach",
                                                      "success_window-open"]
    with pytest.raises(deconflict.InvalidOptionError, match="mt10 has no task 'rech'"):
        mt10.tasks(mt10.resolve_config({"subset": "rech"}))


def test_without_the_extra_a_run_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "metaworld", None)  # import metaworld -> ImportError
    with pytest.raises(deconflict.InvalidOptionError, match=r"deconflict\[rl\]"):
        mw.require_metaworld()


class FakeEnv:
    """Succeeds at step ``succeed_at`` of every episode when the action's first entry is
    positive; counts its steps."""

    def __init__(self, succeed_at: int) -> None:
        self.succeed_at, self.t, self.steps = succeed_at, 0, 0

    def set_task(self, task: object) -> None:
        pass

    def reset(self) -> tuple[np.ndarray, dict]:
        self.t = 0
        return np.zeros(3), {}

    def step(self, action: np.ndarray) -> tuple:
        self.t += 1
        self.steps += 1
        success = float(self.t == self.succeed_at and action[0] > 0)
        return np.full(3, self.t, dtype=float), 0.0, False, False, {"success": success}


def test_success_is_info_success_at_any_step_of_a_deterministic_episode():
    envs = [FakeEnv(3), FakeEnv(99), FakeEnv(1)]
    episodes = mw.Episodes(("a", "b", "c"), [[None]] * 3, envs)
    sac = MultiTaskSAC(6, 1, ["a", "b", "c"], SACConfig(hidden=4, layers=1),
                       deconflict.get("sum"), deconflict.get("sum"))
    with torch.no_grad():  # the deterministic action tanh(mu) = tanh(1) > 0 everywhere
        for p in sac.actor.parameters():
            p.zero_()
        sac.actor.net[-1].bias[0] = 1.0
        sac.actor.net[-1].bias[1] = 5.0  # a wide Gaussian: sampled actions would vary
    rates = mw.evaluate(sac, episodes, count=2, length=10, rng=np.random.default_rng(0))
    assert rates.tolist() == [1.0, 0.0, 1.0]  # b's success would come at step 99 > 10
    # a stops once it succeeded (3 steps), b runs the whole episode, c stops after 1.
    assert [env.steps for env in envs] == [6, 20, 2]


# ---------------------------------------------------------------- with Meta-World installed
@pytest.fixture(scope="module")
def metaworld():
    return pytest.importorskip("metaworld")


def test_goals_are_metaworlds_accepted_observable_and_seeded(metaworld):
    # box-close reject-samples its goal vector in reset: a vector drawn blindly could loop.
    goals = mw.make_goals("box-close", 3, (0, 1, 3))
    assert len({g.data for g in goals}) == 3
    assert [g.data for g in mw.make_goals("box-close", 3, (0, 1, 3))] == [g.data for g in goals]
    env = mw.environment("box-close")
    env.set_task(goals[1])
    observation, _ = env.reset()
    assert np.allclose(observation[-3:], env._target_pos)  # the goal is in the observation


def test_a_replayed_episode_reaches_the_bit_identical_state(metaworld):
    tasks = ("reach", "push")
    goals = [mw.make_goals(task, 2, (0, 1, i)) for i, task in enumerate(tasks)]
    episodes = mw.Episodes(tasks, goals, [mw.environment(task) for task in tasks])
    rng = np.random.default_rng(0)
    episodes.start(rng)
    for k in range(5):  # float64 and float32 actions, as warm-up and policy give them
        actions = rng.uniform(-1, 1, size=(2, 4))
        episodes.step(actions if k % 2 else actions.astype(np.float32))
    saved = episodes.state()
    expected = episodes.step(np.full((2, 4), 0.3, dtype=np.float32))
    episodes.start(rng)  # another episode in between, as in another run of the process
    episodes.step(np.zeros((2, 4)))
    episodes.restore(saved)
    replayed = episodes.step(np.full((2, 4), 0.3, dtype=np.float32))
    for a, b in zip(expected, replayed, strict=True):
        assert np.array_equal(a, b)


def test_a_smoke_run_trains_and_reports_success_per_task(metaworld):
    problem = get_problem("mt50")
    config = problem.resolve_config(smoke=True)
    result = problem.train(lambda: deconflict.get("cagrad_fast", num_sampled=2), config, 0,
                           torch.device("cpu"))
    tasks = problem.tasks(config)
    assert set(result.metrics["test"]) == {"success", *(f"success_{t}" for t in tasks)}
    rates = [result.metrics["test"][f"success_{t}"] for t in tasks]
    assert all(r in (0.0, 1.0) for r in rates)  # one evaluation episode per task
    assert math.isclose(result.metrics["test"]["success"], sum(rates) / len(rates))
    stats = result.statistics
    assert stats["steps"] == config["steps"]
    assert stats["updates"] == config["steps"] - config["warmup"]
    assert stats["critic_steps"] == stats["actor_steps"] == stats["updates"]
