"""Multi-task soft actor-critic (SAC, Haarnoja et al. 2018) with a deconflict method on the
shared networks, as the CAGrad paper runs Meta-World MT10/MT50 (Section 5.3, following the mtrl
setup of Sodhani et al. 2021).

One actor and one pair of critics are shared by all T tasks; the task enters only through a
one-hot id appended to the observation. Every update draws ``batch_size`` transitions from each
task's own replay buffer and forms, per task i (mean over that task's transitions):

- critic loss  L^Q_i = E[(Q1(s, a) - y)^2 + (Q2(s, a) - y)^2] with the soft target
  y = r + gamma (1 - terminated) (min_j Qbar_j(s', a') - alpha_i log pi(a' | s')), a' ~ pi(s'),
  Qbar the target critics (SAC paper Eq. 5-6 with the twin-Q minimum);
- actor loss   L^pi_i = E[alpha_i log pi(a~ | s) - min_j Q_j(s, a~)], a~ = tanh(mu + sigma eps)
  reparameterized (SAC Eq. 7-9, with the tanh change of variables of its Appendix C);
- temperature loss L^alpha_i = E[-alpha_i (log pi(a~ | s) + H_target)], H_target = -dim(A)
  (SAC's automatic entropy tuning, Section 5 of Haarnoja et al. 2018b), one alpha per task.

The T critic losses go to ``deconflict.backward`` with the critic parameters as the shared
parameters and the T actor losses to a second call with the actor parameters, each with its own
method instance (the method's state, e.g. FAMO's logits, is per network): mtrl's
gradient-manipulation agents (PCGrad, and the CAGrad authors' agent built on it) replace the
gradient of both the critic and the actor loss this way. The temperatures are task-specific
parameters whose gradients never mix, so they take their ordinary gradient. The target critics
follow by Polyak averaging, Qbar <- (1 - tau) Qbar + tau Q, after every update.

Nothing here knows about Meta-World: ``..problems.metaworld`` drives the environments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..diagnostics import ConflictMonitor
from ..engine import backward
from ..methods.base import AfterStep, Method

# mtrl's bounds on the actor's log standard deviation (log_std_bounds: [-20, 2]).
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


def mlp(inputs: int, hidden: int, layers: int, outputs: int) -> nn.Sequential:
    """``layers`` hidden ReLU layers of width ``hidden``, then a linear output."""
    modules: list[nn.Module] = []
    width = inputs
    for _ in range(layers):
        modules += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    modules.append(nn.Linear(width, outputs))
    return nn.Sequential(*modules)


class Actor(nn.Module):
    """A tanh-squashed Gaussian policy: a = tanh(mu(s) + sigma(s) eps), eps ~ N(0, I).

    log pi(a | s) = log N(u; mu, sigma^2) - sum_k log(1 - tanh(u_k)^2) with u = mu + sigma eps
    (SAC Appendix C, Eq. 21); log(1 - tanh(u)^2) is computed as 2 (log 2 - u - softplus(-2u)),
    exact and finite for every u.
    """

    def __init__(self, observation: int, action: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.net = mlp(observation, hidden, layers, 2 * action)
        self.action = action

    def forward(self, observation: Tensor, noise: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """(sampled action, its log-probability (batch,), deterministic action tanh(mu)).
        ``noise``: eps (batch, action); drawn from the global torch RNG when None."""
        mu, raw = self.net(observation).chunk(2, dim=-1)
        # mtrl's squashing of the log std into its bounds (smooth, unlike a clamp).
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(raw) + 1)
        if noise is None:
            noise = torch.randn_like(mu)
        u = mu + log_std.exp() * noise
        gaussian = (-0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        correction = (2 * (math.log(2) - u - nn.functional.softplus(-2 * u))).sum(-1)
        return torch.tanh(u), gaussian - correction, torch.tanh(mu)


class TwinCritic(nn.Module):
    """Two Q-networks Q1, Q2 over (observation, action) (the clipped double Q of TD3/SAC)."""

    def __init__(self, observation: int, action: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.q1 = mlp(observation + action, hidden, layers, 1)
        self.q2 = mlp(observation + action, hidden, layers, 1)

    def forward(self, observation: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([observation, action], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class ReplayBuffer:
    """A ring buffer of transitions (s, a, r, s', terminated) for one task, in float32 NumPy
    arrays; ``state_dict`` holds the filled part, so a checkpoint carries the buffer."""

    def __init__(self, capacity: int, observation: int, action: int) -> None:
        self.capacity = capacity
        self.observations = np.zeros((capacity, observation), dtype=np.float32)
        self.actions = np.zeros((capacity, action), dtype=np.float32)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.next_observations = np.zeros((capacity, observation), dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.size = 0
        self.position = 0

    def add(self, observation: np.ndarray, action: np.ndarray, reward: float,
            next_observation: np.ndarray, terminated: bool) -> None:
        i = self.position
        self.observations[i] = observation
        self.actions[i] = action
        self.rewards[i] = reward
        self.next_observations[i] = next_observation
        self.terminated[i] = float(terminated)
        self.position = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, count: int, rng: np.random.Generator) -> tuple[Tensor, ...]:
        """``count`` transitions drawn uniformly with replacement."""
        index = rng.integers(0, self.size, size=count)
        return tuple(torch.from_numpy(array[index]) for array in (
            self.observations, self.actions, self.rewards, self.next_observations,
            self.terminated))

    def state_dict(self) -> dict[str, Any]:
        n = self.size
        return {"size": n, "position": self.position,
                **{name: getattr(self, name)[:n].copy() for name in self._ARRAYS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state["size"])
        for name in self._ARRAYS:
            getattr(self, name)[:n] = state[name]
        self.size, self.position = n, int(state["position"])

    _ARRAYS = ("observations", "actions", "rewards", "next_observations", "terminated")


@dataclass(frozen=True)
class SACConfig:
    """SAC's hyperparameters (defaults: mtrl's Meta-World configuration)."""

    hidden: int = 400
    layers: int = 3
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    discount: float = 0.99
    tau: float = 0.005
    init_temperature: float = 1.0
    per_task_alpha: bool = True


class MultiTaskSAC:
    """Shared actor and twin critics, per-task temperatures, a method per network (see the
    module docstring). ``observation`` includes the one-hot task id."""

    def __init__(self, observation: int, action: int, tasks: Sequence[str], config: SACConfig,
                 actor_method: Method, critic_method: Method,
                 device: torch.device | None = None) -> None:
        device = device or torch.device("cpu")
        self.tasks = tuple(tasks)
        self.config = config
        self.device = device
        self.actor = Actor(observation, action, config.hidden, config.layers).to(device)
        self.critic = TwinCritic(observation, action, config.hidden, config.layers).to(device)
        self.critic_target = TwinCritic(observation, action, config.hidden,
                                        config.layers).to(device)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        count = len(self.tasks) if config.per_task_alpha else 1
        self.log_alpha = torch.full((count,), math.log(config.init_temperature),
                                    device=device, requires_grad=True)
        self.target_entropy = -float(action)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=config.alpha_lr)
        self.actor_method, self.critic_method = actor_method, critic_method
        self.actor_monitor = ConflictMonitor(actor_method, task_names=self.tasks)
        self.critic_monitor = ConflictMonitor(critic_method, task_names=self.tasks)
        self.updates = 0

    def alpha(self) -> Tensor:
        """The temperatures (T,), one per task (or the one shared, repeated)."""
        return self.log_alpha.exp().expand(len(self.tasks))

    @torch.no_grad()
    def act(self, observations: Tensor, deterministic: bool = False) -> np.ndarray:
        """Actions (T, action) for one observation per task."""
        sampled, _, mean = self.actor(observations.to(self.device))
        return (mean if deterministic else sampled).cpu().numpy()

    # ------------------------------------------------------------------------------ losses
    def critic_losses(self, batch: Sequence[Tensor]) -> list[Tensor]:
        """L^Q_i per task from stacked per-task batches (T, n, ...)."""
        obs, action, reward, next_obs, terminated = batch
        alpha = self.alpha().detach()
        with torch.no_grad():
            next_action, next_log_pi, _ = self.actor(next_obs)
            q1, q2 = self.critic_target(next_obs, next_action)
            soft = torch.min(q1, q2) - alpha[:, None] * next_log_pi
            target = reward + self.config.discount * (1 - terminated) * soft
        q1, q2 = self.critic(obs, action)
        per_task = ((q1 - target).pow(2) + (q2 - target).pow(2)).mean(dim=1)
        return list(per_task.unbind())

    def actor_losses(self, obs: Tensor, noise: Tensor) -> tuple[list[Tensor], Tensor]:
        """(L^pi_i per task, log pi of the sampled actions (T, n)); the critics are frozen
        here (their parameters take no gradient from the actor loss)."""
        alpha = self.alpha().detach()
        action, log_pi, _ = self.actor(obs, noise)
        self.critic.requires_grad_(False)
        try:
            q1, q2 = self.critic(obs, action)
        finally:
            self.critic.requires_grad_(True)
        per_task = (alpha[:, None] * log_pi - torch.min(q1, q2)).mean(dim=1)
        return list(per_task.unbind()), log_pi

    # ------------------------------------------------------------------------------ update
    def update(self, batch: Sequence[Tensor]) -> dict[str, Tensor]:
        """One SAC update on per-task batches (T, n, ...): critics, actor, temperatures,
        targets. Returns the per-task losses (detached)."""
        batch = [part.to(self.device) for part in batch]
        critic = self.critic_losses(batch)
        self.critic_optimizer.zero_grad(set_to_none=True)
        self.critic_monitor.observe(backward(critic, self.critic, self.critic_method))
        self.critic_optimizer.step()
        if isinstance(self.critic_method, AfterStep):
            with torch.no_grad():
                self.critic_method.after_step(torch.stack(self.critic_losses(batch)))

        obs = batch[0]
        noise = torch.randn(*obs.shape[:2], self.actor.action, device=self.device)
        actor, log_pi = self.actor_losses(obs, noise)
        self.actor_optimizer.zero_grad(set_to_none=True)
        self.actor_monitor.observe(backward(actor, self.actor, self.actor_method))
        self.actor_optimizer.step()
        if isinstance(self.actor_method, AfterStep):
            with torch.no_grad():  # the same states and noise: the loss change of this step
                self.actor_method.after_step(torch.stack(self.actor_losses(obs, noise)[0]))

        entropy_gap = (-log_pi.detach() - self.target_entropy).mean(dim=1)
        temperature = self.alpha() * entropy_gap
        self.alpha_optimizer.zero_grad(set_to_none=True)
        temperature.sum().backward()
        self.alpha_optimizer.step()

        with torch.no_grad():
            for target, source in zip(self.critic_target.parameters(),
                                      self.critic.parameters(), strict=True):
                target.lerp_(source, self.config.tau)
        self.updates += 1
        return {"critic": torch.stack(critic).detach(), "actor": torch.stack(actor).detach(),
                "alpha": self.alpha().detach()}

    # -------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(),
                "log_alpha": self.log_alpha.detach().clone(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "alpha_optimizer": self.alpha_optimizer.state_dict(),
                "actor_method": self.actor_method.state_dict(),
                "critic_method": self.critic_method.state_dict(),
                "actor_monitor": self.actor_monitor.state_dict(),
                "critic_monitor": self.critic_monitor.state_dict(),
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        self.actor_method.load_state_dict(state["actor_method"])
        self.critic_method.load_state_dict(state["critic_method"])
        self.actor_monitor.load_state_dict(state["actor_monitor"])
        self.critic_monitor.load_state_dict(state["critic_monitor"])
        self.updates = int(state["updates"])
