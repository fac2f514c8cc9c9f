"""Meta-World MT10 and MT50 (Yu et al., CoRL 2020) with multi-task SAC: the CAGrad paper's
reinforcement-learning benchmark (Section 5.3, Table 3), problems ``mt10`` and ``mt50``.

Each of the 10 (50) robot-manipulation tasks has its own MuJoCo environment and ``goals``
goal positions (Meta-World's 50 by default, drawn per seed as ``metaworld.MT10(seed)`` draws
them: uniformly from the task's reset space); an episode picks one at random and lasts
``episode_length`` steps (Meta-World v3's 500), with the goal in the observation (MT10's
``partially_observable=False``). All the environments step together: one *step* of the run is
one action in every task's environment, its transition stored in that task's replay buffer,
then ``updates_per_step`` SAC updates (``..sac.MultiTaskSAC``: shared actor and twin critics
over the observation and a one-hot task id, per-task temperatures, the method applied to the
per-task critic losses and, separately, to the per-task actor losses). The first ``warmup``
steps act uniformly at random and do not update (mtrl's ``init_steps``).

Success as Meta-World defines it: an evaluation episode succeeds if ``info["success"]`` is set
at any of its steps; the policy is deterministic (tanh of the Gaussian's mean). After training,
``eval_episodes`` episodes per task, each on a goal drawn from the task's goals, give the success
rate per task (``success_<task>``) and their mean (``success``); the validation and test splits
are the same evaluation (Meta-World's MT benchmarks have no held-out tasks).

Defaults: mtrl's Meta-World SAC (hidden 400 x 3 layers, lr 3e-4, discount 0.99, Polyak tau
0.005, initial temperature 1, 128 transitions per task and update as the authors' batch of 1280
on MT10, 1500 warm-up steps) with a reduced number of steps; the authors' runs use
``--set steps=2000000`` (their ``experiment.num_train_steps``), far beyond a CPU.

Checkpoints (``--checkpoint-every N`` steps) hold the networks, their optimizers, the methods'
and monitors' states, every replay buffer, the run's generator and the global RNGs, and for
each environment the goal and the actions of the episode in progress: MuJoCo is deterministic,
so a resumed run replays those actions from the episode's reset and continues exactly where the
interrupted one stopped (tests/test_metaworld.py checks the replayed state).

Methods that weight the losses by their values assume positive losses; the critic losses are
(squared errors), the actor losses -Q + alpha log pi are not, and usually negative. FAMO, for
one, then takes l_i = max(L_i, 0) + 1e-8 for the actor: the tasks with negative losses share
the weight and its logits stop moving, so FAMO acts on the critics only in effect; the
log-loss methods refuse the negative losses in one line.

Needs the ``rl`` extra (``pip install 'deconflict[rl]'``: metaworld, mujoco, gymnasium); without
it the problem is listed but a run refuses to start, naming the extra.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from ...errors import InvalidOptionError
from ..sac import MultiTaskSAC, ReplayBuffer, SACConfig
from .base import (
    Checkpointing,
    MethodFactory,
    Metric,
    Problem,
    TrainResult,
    load_checkpoint,
    rng_states,
    save_torch,
    set_rng_states,
)
from .settings import Setting

EXTRA = "pip install 'deconflict[rl]'"
# The benchmarks' task lists, in Meta-World's order (metaworld.env_dict.MT10_V3 / MT50_V3);
# written out so that the problem's tasks are known without the extra installed.
MT10_TASKS = ("reach", "push", "pick-place", "door-open", "drawer-open", "drawer-close",
              "button-press-topdown", "peg-insert-side", "window-open", "window-close")
MT50_TASKS = (
    "assembly", "basketball", "bin-picking", "box-close", "button-press-topdown",
    "button-press-topdown-wall", "button-press", "button-press-wall", "coffee-button",
    "coffee-pull", "coffee-push", "dial-turn", "disassemble", "door-close", "door-lock",
    "door-open", "door-unlock", "hand-insert", "drawer-close", "drawer-open", "faucet-open",
    "faucet-close", "hammer", "handle-press-side", "handle-press", "handle-pull-side",
    "handle-pull", "lever-pull", "pick-place-wall", "pick-out-of-hole", "pick-place",
    "plate-slide", "plate-slide-side", "plate-slide-back", "plate-slide-back-side",
    "peg-insert-side", "peg-unplug-side", "soccer", "stick-push", "stick-pull", "push",
    "push-wall", "push-back", "reach", "reach-wall", "shelf-place", "sweep-into", "sweep",
    "window-open", "window-close")
VERSION = "-v3"


def require_metaworld() -> Any:
    """The ``metaworld`` module, or one InvalidOptionError naming the extra to install."""
    try:
        import metaworld
    except ImportError as error:
        raise InvalidOptionError(f"the Meta-World problems need the rl extra ({EXTRA}): "
                                 f"{error}") from None
    return metaworld


# Environments built in this process, by task: building one compiles its MuJoCo model (about
# 0.2 s), and every episode starts with set_task + reset (mj_resetData), so an environment's
# history never shows in a later run.
_ENVIRONMENTS: dict[str, Any] = {}


def environment(task: str) -> Any:
    """Meta-World's environment of ``task`` (e.g. ``reach``), built once per process."""
    env = _ENVIRONMENTS.get(task)
    # An environment whose simulation once went unstable stays so (Meta-World never clears
    # the flag): build a fresh one.
    if env is None or getattr(env, "_did_see_sim_exception", False):
        require_metaworld()
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        env = ALL_V3_ENVIRONMENTS[task + VERSION]()
        _ENVIRONMENTS[task] = env
    return env


def make_goals(task: str, count: int, seed: Sequence[int]) -> list[Any]:
    """``count`` goals (``metaworld.types.Task``) of ``task``, made as Meta-World's
    ``_make_tasks`` makes an MT benchmark's: reset the environment with its goal vector unfrozen
    and keep the vector its ``reset_model`` accepted (some tasks reject-sample it), the goal
    made observable; drawn from a generator seeded with ``seed`` instead of NumPy's global one."""
    require_metaworld()
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT50_V3_ARGS_KWARGS
    from metaworld.types import Task

    name = task + VERSION
    env = environment(task)
    given: dict[str, Any] = dict(MT50_V3_ARGS_KWARGS[name]["kwargs"])
    kwargs = {k: v for k, v in given.items() if k != "task_id"}
    goals = []
    env._set_task_called = True
    env._freeze_rand_vec, env.seeded_rand_vec = False, True  # draw from env.np_random
    env.np_random = np.random.default_rng(list(seed))
    try:
        for _ in range(count):
            env.reset()
            data = {**kwargs, "rand_vec": np.array(env._last_rand_vec),
                    "env_cls": ALL_V3_ENVIRONMENTS[name], "partially_observable": False}
            goals.append(Task(env_name=name, data=pickle.dumps(data)))
    finally:
        env._freeze_rand_vec, env.seeded_rand_vec = True, False
    return goals


@dataclass
class Episodes:
    """The environments of a run, stepping together, and the episode in progress in each:
    its goal and the actions taken since its reset (what a checkpoint keeps)."""

    tasks: tuple[str, ...]
    goals: list[list[Any]]
    envs: list[Any]
    goal_index: list[int] = field(default_factory=list)
    actions: list[list[np.ndarray]] = field(default_factory=list)
    observations: np.ndarray | None = None

    def start(self, rng: np.random.Generator) -> None:
        """A new episode in every environment, on a goal drawn from its task's goals."""
        self.goal_index = [int(rng.integers(len(goals))) for goals in self.goals]
        self.actions = [[] for _ in self.envs]
        self.observations = np.stack([self._reset(i) for i in range(len(self.envs))])

    def _reset(self, i: int) -> np.ndarray:
        env = self.envs[i]
        env.set_task(self.goals[i][self.goal_index[i]])
        observation, _ = env.reset()
        return observation

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                  np.ndarray]:
        """(next observations, rewards, terminated, success) of one action per task."""
        results = []
        for i, (env, action) in enumerate(zip(self.envs, actions, strict=True)):
            # The action exactly as the environment got it, dtype included (float32 and float64
            # actions round differently inside the environment): the replay is bit-identical.
            self.actions[i].append(np.array(action))
            observation, reward, terminated, _, info = env.step(action)
            results.append((observation, float(reward), bool(terminated),
                            float(info.get("success", 0.0)) > 0))
        observations, rewards, terminated, success = (
            np.array(x) for x in zip(*results, strict=True))
        self.observations = observations
        return observations, rewards, terminated, success

    def state(self) -> dict[str, Any]:
        return {"goal_index": list(self.goal_index),
                "actions": [[a.copy() for a in actions] for actions in self.actions]}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Reset each environment to its saved goal and replay the episode's actions."""
        self.goal_index = [int(i) for i in state["goal_index"]]
        observations = []
        self.actions = [[] for _ in self.envs]
        for i, env in enumerate(self.envs):
            observation = self._reset(i)
            for action in state["actions"][i]:
                self.actions[i].append(np.array(action))
                observation, *_ = env.step(action)
            observations.append(observation)
        self.observations = np.stack(observations)


def with_task_ids(observations: np.ndarray) -> torch.Tensor:
    """Observations (T, d) with each task's one-hot id appended: (T, d + T), float32."""
    count = observations.shape[0]
    return torch.from_numpy(np.concatenate(
        [observations.astype(np.float32), np.eye(count, dtype=np.float32)], axis=1))


class MetaWorld(Problem):
    """Meta-World MT benchmarks with multi-task SAC (see the module docstring)."""

    benchmark: tuple[str, ...] = ()
    checkpointable = True
    not_distributed = "steps its environments in one process"
    single_task_baseline = False  # one SAC per task (the paper's upper bound): --method single_task
    schema = (
        Setting("steps", "int", 3_000, "environment steps per task (each followed by "
                "updates_per_step SAC updates; the authors ran 2000000)", 6, low=1),
        Setting("warmup", "int", 1_500, "first steps with uniformly random actions and no "
                "update (mtrl's init_steps)", 2, low=0),
        Setting("updates_per_step", "int", 1, "SAC updates after each environment step",
                low=1),
        Setting("batch_size", "int", 128, "transitions per task in each update (the authors' "
                "1280 on MT10)", 8, low=1),
        Setting("buffer", "int", 1_000_000, "replay buffer capacity per task", low=1),
        Setting("hidden", "int", 400, "width of the actor's and critics' hidden layers", 16,
                low=1),
        Setting("layers", "int", 3, "hidden layers of the actor and of each critic", 1, low=1),
        Setting("lr", "float", 3e-4, "Adam learning rate of the actor, critics and "
                "temperatures", low=0.0, open_low=True),
        Setting("discount", "float", 0.99, "discount factor gamma", low=0.0, high=1.0),
        Setting("tau", "float", 0.005, "Polyak rate of the target critics", low=0.0,
                high=1.0, open_low=True),
        Setting("init_temperature", "float", 1.0, "initial entropy temperature alpha",
                low=0.0, open_low=True),
        Setting("alpha", "str", "per_task", "entropy temperatures: one per task (Meta-World's "
                "MT-SAC) or one shared (the CAGrad authors' run.sh)",
                choices=("per_task", "shared")),
        Setting("episode_length", "int", 500, "steps per episode (Meta-World v3's "
                "max_path_length)", 4, low=1, high=500),
        Setting("goals", "int", 50, "goal positions per task (Meta-World's 50)", 2, low=1),
        Setting("eval_episodes", "int", 10, "deterministic evaluation episodes per task "
                "after training", 1, low=1),
        Setting("subset", "strs", [], "train on these of the benchmark's tasks only (none "
                "given: all of them)"),
    )
    # The smoke run's tasks: building an environment compiles its MuJoCo model (about 0.2 s),
    # too slow for a suite's smoke runs of all 50 tasks.
    smoke_subset: ClassVar[tuple[str, ...]] = ()
    requires = ("metaworld", "mujoco", "gymnasium")

    def settings(self) -> tuple[Setting, ...]:
        return tuple(replace(s, smoke=list(self.smoke_subset)) if s.name == "subset" else s
                     for s in self.schema)

    def tasks(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        subset = list(config.get("subset") or [])
        unknown = [task for task in subset if task not in self.benchmark]
        if unknown:
            raise InvalidOptionError(f"{self.name} has no task {unknown[0]!r}; its tasks are: "
                                     f"{', '.join(self.benchmark)}")
        return tuple(task for task in self.benchmark if task in subset) or self.benchmark

    def metrics(self, config: Mapping[str, Any]) -> tuple[Metric, ...]:
        return (Metric("success", "all", True),
                *(Metric(f"success_{task}", task, True) for task in self.tasks(config)))

    def train(self, method_factory: MethodFactory, config: Mapping[str, Any], seed: int,
              device: torch.device, tasks: Sequence[str] | None = None,
              progress: bool = False, checkpoint: Checkpointing | None = None) -> TrainResult:
        """Train multi-task SAC with the method and evaluate it; ``tasks``: a subset of the
        benchmark's tasks (e.g. one: single-task SAC); ``checkpoint``: save every N steps and
        resume (``Checkpointing``)."""
        tasks = tuple(tasks or self.tasks(config))
        unknown = [task for task in tasks if task not in self.benchmark]
        if unknown:
            raise InvalidOptionError(f"{self.name} has no task {unknown[0]!r}; its tasks are: "
                                     f"{', '.join(self.benchmark)}")
        require_metaworld()
        torch.manual_seed(seed)
        index = {task: i for i, task in enumerate(self.benchmark)}
        goals = [make_goals(task, config["goals"], (seed, 1, index[task])) for task in tasks]
        episodes = Episodes(tasks, goals, [environment(task) for task in tasks])
        env = episodes.envs[0]
        observation_size = env.observation_space.shape[0] + len(tasks)
        action_size = env.action_space.shape[0]
        sac = SACConfig(hidden=config["hidden"], layers=config["layers"], actor_lr=config["lr"],
                        critic_lr=config["lr"], alpha_lr=config["lr"],
                        discount=config["discount"], tau=config["tau"],
                        init_temperature=config["init_temperature"],
                        per_task_alpha=config["alpha"] == "per_task")
        agent = MultiTaskSAC(observation_size, action_size, tasks, sac, method_factory(),
                             method_factory(), device)
        steps = config["steps"]
        capacity = min(config["buffer"], steps)
        buffers = [ReplayBuffer(capacity, observation_size, action_size) for _ in tasks]
        rng = np.random.default_rng([seed, 2])
        counters = {"episodes": np.zeros(len(tasks)), "successes": np.zeros(len(tasks)),
                    "returns": np.zeros(len(tasks)), "episode_return": np.zeros(len(tasks)),
                    "episode_success": np.zeros(len(tasks), dtype=bool)}
        identity = {"problem": self.name, "config": dict(config), "seed": seed,
                    "tasks": list(tasks), "method": repr(agent.actor_method)}
        step, seconds = 0, 0.0
        last: dict[str, torch.Tensor] = {}
        if checkpoint is not None and checkpoint.resume and checkpoint.path.is_file():
            saved = load_checkpoint(checkpoint.path, identity)
            agent.load_state_dict(saved["agent"])
            for buffer, state in zip(buffers, saved["buffers"], strict=True):
                buffer.load_state_dict(state)
            rng.bit_generator.state = saved["generator"]
            counters = saved["counters"]
            step, seconds = saved["step"], saved["seconds"]
            last = saved["last"]
            episodes.restore(saved["episodes"])
            set_rng_states(saved["rng"])
        else:
            episodes.start(rng)
        started = time.perf_counter() - seconds
        from tqdm import tqdm  # the experiments extra: never imported with the library

        name = getattr(agent.actor_method, "name", "method")
        bar = tqdm(total=steps, initial=step, unit="step", leave=False, disable=not progress,
                   desc=f"{self.name}: {name} seed {seed}")
        shown = 0.0
        while step < steps:
            assert episodes.observations is not None
            observations = episodes.observations
            if step < config["warmup"]:
                actions = rng.uniform(-1.0, 1.0, size=(len(tasks), action_size))
            else:
                actions = agent.act(with_task_ids(observations))
            next_observations, rewards, terminated, success = episodes.step(actions)
            before, after = with_task_ids(observations).numpy(), with_task_ids(
                next_observations).numpy()
            for i, buffer in enumerate(buffers):
                buffer.add(before[i], actions[i], rewards[i], after[i], terminated[i])
            counters["episode_return"] += rewards
            counters["episode_success"] |= success
            if step >= config["warmup"]:
                for _ in range(config["updates_per_step"]):
                    samples = [buffer.sample(config["batch_size"], rng) for buffer in buffers]
                    last = agent.update([torch.stack(part) for part in zip(*samples, strict=True)])
            step += 1
            # Meta-World never terminates an episode: every environment ends its episode
            # at the time limit, together.
            if len(episodes.actions[0]) == config["episode_length"]:
                counters["episodes"] += 1
                counters["successes"] += counters["episode_success"]
                counters["returns"] += counters["episode_return"]
                counters["episode_return"][:] = 0.0
                counters["episode_success"][:] = False
                episodes.start(rng)
            bar.update()
            if last and not bar.disable and time.monotonic() - shown > 0.5:
                bar.set_postfix_str(", ".join(
                    f"{task} {value:.4g}" for task, value in zip(
                        tasks, last["critic"].tolist(), strict=True)), refresh=shown == 0.0)
                shown = time.monotonic()
            if checkpoint is not None and step % checkpoint.every == 0:
                save_torch(checkpoint.path, {
                    "identity": identity, "step": step, "agent": agent.state_dict(),
                    "buffers": [buffer.state_dict() for buffer in buffers],
                    "generator": rng.bit_generator.state, "counters": counters,
                    "episodes": episodes.state(), "last": last,
                    "seconds": time.perf_counter() - started, "rng": rng_states()})
        bar.close()
        train_seconds = time.perf_counter() - started
        success_rates = evaluate(agent, episodes, config["eval_episodes"],
                                 config["episode_length"], rng)
        metrics = {"success": float(np.mean(success_rates)),
                   **{f"success_{task}": float(rate)
                      for task, rate in zip(tasks, success_rates, strict=True)}}
        done = np.maximum(counters["episodes"], 1)
        statistics: dict[str, Any] = {
            "steps": step, "updates": agent.updates,
            "train_episodes": int(counters["episodes"][0]),
            "train_success": dict(zip(tasks, (counters["successes"] / done).tolist(),
                                      strict=True)),
            "train_return": dict(zip(tasks, (counters["returns"] / done).tolist(),
                                     strict=True)),
            "temperature": dict(zip(tasks, agent.alpha().tolist(), strict=True)),
            "train_seconds": train_seconds,
            "parameters": sum(p.numel() for module in (agent.actor, agent.critic)
                              for p in module.parameters()),
        }
        for network, monitor in (("critic", agent.critic_monitor),
                                 ("actor", agent.actor_monitor)):
            statistics.update({f"{network}_{key}": value
                               for key, value in monitor.summary().items()})
        return TrainResult({"validation": metrics, "test": metrics}, statistics)


def evaluate(agent: MultiTaskSAC, episodes: Episodes, count: int, length: int,
             rng: np.random.Generator) -> np.ndarray:
    """Success rate per task over ``count`` episodes of the deterministic policy: an episode
    succeeds when ``info["success"]`` is set at any step (Meta-World's definition). The
    environments step together; one that has succeeded stops early (its episode's outcome
    is decided)."""
    successes = np.zeros(len(episodes.tasks))
    for _ in range(count):
        episodes.start(rng)
        assert episodes.observations is not None
        succeeded = np.zeros(len(episodes.tasks), dtype=bool)
        observations = episodes.observations
        for _ in range(length):
            running = np.flatnonzero(~succeeded)
            if running.size == 0:
                break
            actions = agent.act(with_task_ids(observations), deterministic=True)
            for i in running:
                observation, _, _, _, info = episodes.envs[i].step(actions[i])
                observations[i] = observation
                succeeded[i] |= float(info.get("success", 0.0)) > 0
        successes += succeeded
    return successes / count


class MT10(MetaWorld):
    name = "mt10"
    description = ("Meta-World MT10: 10 manipulation tasks, multi-task SAC, success rate "
                   "(CAGrad Table 3)")
    benchmark = MT10_TASKS


class MT50(MetaWorld):
    name = "mt50"
    description = ("Meta-World MT50: 50 manipulation tasks, multi-task SAC, success rate "
                   "(CAGrad Table 3)")
    benchmark = MT50_TASKS
    smoke_subset = ("reach", "push", "window-open")
