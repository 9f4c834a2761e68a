"""Agents on toy bandits with learning thresholds (SB3-style), masks, state round trips and bad hyper-parameters."""

import json

import numpy as np
import pytest

from agents import AGENTS, make_agent

MEANS = np.array([0.2, 0.5, 0.8, 0.4, 0.3])
LEARNERS = ["ucb", "thompson", "epsilon_greedy", "exp3", "sw_ucb", "d_ucb", "cusum_ucb", "lin_ucb"]
HYPER = {"exp3": {"gamma": 0.05, "reward_min": -0.5, "reward_max": 1.5}, "sw_ucb": {"window": 200},
         "thompson": {"sigma": 0.2}, "d_ucb": {"discount": 0.99}}


def arm(index: int, candidate: str, depth: int, num_layers: int, criterion: str = "none", **extra) -> dict:
    """An arm as helios.policy/v1 writes it (helios.arms.Arm.to_dict), written out by hand."""
    return {"index": index, "label": f"{candidate}@{depth}", "candidate": candidate, "depth": depth,
            "num_layers": num_layers, "exit": criterion, "criterion": criterion, "threshold": 0.9,
            "exit_points": [1] if criterion != "none" else [], "weight_bytes": 1, "kv_bytes_per_seq": 1,
            "batch_size": 4, "feasible": True, **extra}


def toy_arm_table(n_arms: int) -> list[dict]:
    return [arm(i, f"m{i % 2}", 2 + i // 2, 2 + (n_arms - 1) // 2) for i in range(n_arms)]


class BanditSimulator:
    """What agents/mpc.py plans through (ModelDepthEnv's planning interface), for a stateless bandit: arm a earns
    0.1 x a every epoch, on every draw. The generic tests below never step it, so its episode stays at epoch 0."""

    backend_kind = "replay"
    episode_epochs = 4
    episode_variant = 0

    class backend:  # noqa: N801 (the env's backend attribute)
        variants = 8

    def __init__(self) -> None:
        self.epoch = 0
        self.unwrapped = self

    def planning(self, variant: int):
        import contextlib

        saved = self.epoch

        @contextlib.contextmanager
        def fork():
            try:
                yield
            finally:
                self.epoch = saved

        return fork()

    def step(self, action: int):
        self.epoch += 1
        return None, 0.1 * action, False, False, {}

    def simulate(self, actions, variant: int) -> np.ndarray:
        with self.planning(variant):
            return np.array([self.step(a)[1] for a in actions[: self.episode_epochs - self.epoch]])


def build(name: str, n_arms: int, seed: int = 0, **hyper):
    # The toy observations are 2-vectors; an agent that reads entries by name (q_load) reads them as these two, and
    # seasonal_q reads its clock from the second.
    if name == "seasonal_q":
        hyper.setdefault("clock_index", 1)
    agent = make_agent(name, n_arms, seed=seed, arm_table=toy_arm_table(n_arms),
                       observation_names=["arrival_ratio", "queue_ratio"], **hyper)
    if name == "mpc":
        agent.bind(BanditSimulator())
    return agent


def run(agent, means_at, steps: int, noise: float = 0.2, seed: int = 0, context=None):
    rng = np.random.default_rng(seed)
    actions, rewards = [], []
    for t in range(steps):
        obs = context(t) if context else np.zeros(2)
        action = agent.select(obs)
        reward = float(means_at(t, obs)[action] + noise * rng.normal())
        agent.update(action, reward, obs)
        actions.append(action)
        rewards.append(reward)
    return np.array(actions), np.array(rewards)


@pytest.mark.parametrize("name", LEARNERS)
def test_stationary_bandit_finds_best_arm(name) -> None:
    agent = make_agent(name, 5, seed=1, **HYPER.get(name, {}))
    actions, _ = run(agent, lambda t, obs: MEANS, 3000)
    best_fraction = np.mean(actions[-1000:] == 2)
    # Windowed/discounted agents keep exploring by design (the price of tracking drift): a lower bar, still far
    # above the 0.2 of chance.
    threshold = {"exp3": 0.6, "sw_ucb": 0.65, "d_ucb": 0.65}.get(name, 0.8)
    assert best_fraction >= threshold, best_fraction


@pytest.mark.parametrize("name", ["sw_ucb", "d_ucb", "cusum_ucb"])
@pytest.mark.parametrize("seed", [0, 1])
def test_non_stationary_agents_track_a_change_point(name, seed) -> None:
    """The textbook failure of UCB1: after 2000 steps the heavily pulled best arm (2) degrades from 0.8 to 0.4 and
    arm 1 becomes best (0.6). UCB1's mean of arm 2 moves by 1/n per pull, so it lags for ~n steps; drift-aware
    agents forget or detect the change and follow within the next 1000 steps."""
    after = np.array([0.2, 0.6, 0.4, 0.3, 0.3])

    def means_at(t, obs):
        return MEANS if t < 2000 else after

    hyper = {"sw_ucb": {"window": 200}, "d_ucb": {"discount": 0.98}, "cusum_ucb": {}}[name]
    adaptive, _ = run(make_agent(name, 5, seed=seed, **hyper), means_at, 4000, noise=0.1, seed=seed)
    ucb, _ = run(make_agent("ucb", 5, seed=seed), means_at, 4000, noise=0.1, seed=seed)
    adaptive_follow, ucb_follow = np.mean(adaptive[2000:3000] == 1), np.mean(ucb[2000:3000] == 1)
    assert ucb_follow < 0.4, "the scenario must actually defeat UCB1, or it tests nothing"
    assert adaptive_follow >= ucb_follow + 0.12, (adaptive_follow, ucb_follow)


def test_lin_ucb_uses_context() -> None:
    """Reward of arm a = x[a]: the best arm depends on the context, which no context-free agent can follow."""
    contexts = np.random.default_rng(7).random((3000, 3))
    agent = make_agent("lin_ucb", 3, seed=0, alpha=0.3)
    actions, rewards = run(agent, lambda t, x: x, 3000, noise=0.05, context=lambda t: contexts[t])
    best = contexts.argmax(1)
    assert np.mean(actions[-1000:] == best[-1000:]) >= 0.85
    _, ucb_rewards = run(make_agent("ucb", 3, seed=0), lambda t, x: x, 3000, noise=0.05, context=lambda t: contexts[t])
    assert rewards[-1000:].mean() > ucb_rewards[-1000:].mean() + 0.1


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_masked_arms_are_never_selected(name) -> None:
    agent = build(name, 6, seed=0, **({"arm": 4} if name == "static" else HYPER.get(name, {})))
    rng = np.random.default_rng(0)
    for _ in range(300):
        mask = rng.random(6) < 0.6
        mask[4] = True
        action = agent.select(np.ones(3), mask)
        assert mask[action]
        agent.update(action, float(rng.random()), np.ones(3))
    with pytest.raises(ValueError, match="every arm is masked"):
        agent.select(np.ones(3), np.zeros(6, dtype=bool))


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_state_dict_round_trip_through_json(name) -> None:
    """A restored agent makes the same choices as the original from the same point on (resume without drift)."""
    hyper = {"arm": 1} if name == "static" else HYPER.get(name, {})
    original = build(name, 4, seed=5, **hyper)
    run(original, lambda t, obs: MEANS[:4], 200, context=lambda t: np.array([t % 3, 1.0]))
    restored = build(name, 4, seed=99, **hyper)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    a, _ = run(original, lambda t, obs: MEANS[:4], 100, seed=11, context=lambda t: np.array([t % 3, 1.0]))
    b, _ = run(restored, lambda t, obs: MEANS[:4], 100, seed=11, context=lambda t: np.array([t % 3, 1.0]))
    np.testing.assert_array_equal(a, b)
    assert json.loads(json.dumps(original.export()))["agent"] == name


def test_ucb1_index_by_hand() -> None:
    agent = make_agent("ucb", 2, c=1.0)
    for action, reward in [(0, 1.0), (1, 0.0), (1, 1.0)]:
        agent.update(action, reward)
    # arm 0: 1 + sqrt(2 ln 3 / 1) = 2.482; arm 1: 0.5 + sqrt(2 ln 3 / 2) = 1.548 -> arm 0
    assert agent.select() == 0
    agent.update(0, -3.0)  # arm 0 mean -1: -1 + sqrt(2 ln 4 / 2) = 0.177 < 0.5 + 1.177 -> arm 1
    assert agent.select() == 1


@pytest.mark.parametrize(
    "name,hyper,match",
    [
        ("sw_ucb", {"window": -5}, "window"),
        ("sw_ucb", {"window": 0}, "window"),
        ("epsilon_greedy", {"epsilon": 1.5}, r"epsilon must be in \[0.0, 1.0\]"),
        ("epsilon_greedy", {"epsilon": -0.1}, "epsilon"),
        ("d_ucb", {"discount": 0.0}, r"discount must be in \(0.0, 1.0\]"),
        ("d_ucb", {"discount": 1.2}, "discount"),
        ("exp3", {"gamma": 0.0}, "gamma"),
        ("static", {"arm": 9}, r"\[0, 3\]"),
    ],
)
def test_invalid_hyperparameters(name, hyper, match) -> None:
    with pytest.raises(ValueError, match=match):
        make_agent(name, 4, **hyper)


def test_unknown_agent_lists_choices() -> None:
    with pytest.raises(ValueError, match="ucb"):
        make_agent("ucb2", 3)


def test_helios_controller_profiles_then_loads_the_covering_depth() -> None:
    """Two candidates of 8 layers, depths 4/6/8, exits on. Profiled histograms (4 buckets of 2 layers):
    A = [0.5, 0.3, 0.1, 0.1] -> 80% of tokens exit within 4 layers -> load 4; B = [0.1, 0.2, 0.5, 0.2] -> 80% by
    layer 6 -> load 6. Accuracy ties (within tolerance), A served better when profiled -> A at depth 4."""
    table = [arm(i, c, d, 8, "max_prob") for i, (c, d) in enumerate((c, d) for c in "AB" for d in (4, 6, 8))]
    agent = make_agent("helios", 6, arm_table=table, profile_epochs=1, coverage=0.74, patience=2, reassess_every=50)
    histograms = {"A": [0.5, 0.3, 0.1, 0.1], "B": [0.1, 0.2, 0.5, 0.2]}
    profiled = []
    for _ in range(2):
        action = agent.select()
        profiled.append(table[action]["label"])
        candidate = table[action]["candidate"]
        agent.update(action, 1.0 if candidate == "A" else 0.5,
                     info={"exit_histogram": histograms[candidate], "metrics": {"accuracy": 0.8}})
    assert profiled == ["A@8", "B@8"]  # the deepest arm of each candidate
    assert table[agent.select()]["label"] == "A@4"
    # A confidence breach (force-exited share 0.9 > 0.5 in depth 4's bucket) for `patience` epochs re-profiles.
    for _ in range(2):
        action = agent.select()
        agent.update(action, 1.0, info={"exit_histogram": [0.05, 0.9, 0.05, 0.0], "metrics": {"accuracy": 0.8}})
    assert table[agent.select()]["label"] == "A@8"


def test_helios_controller_breaches_only_on_a_violated_constraint() -> None:
    """The env's info lists every constraint with its penalty (0.0 when it holds, as helios.slo reports it): a
    satisfied SLO must not count as a breach, a positive penalty must."""
    table = [arm(i, "A", d, 8) for i, d in enumerate((4, 8))]
    agent = make_agent("helios", 2, arm_table=table, profile_epochs=1, patience=2, reassess_every=50)
    action = agent.select()
    agent.update(action, 1.0, info={"exit_histogram": [1.0, 0, 0, 0], "metrics": {"accuracy": 0.8}})
    served = agent.select()
    held = {"accuracy>=0.9xref": 0.0, "latency_p95_s<=2xref": 0.0}
    for _ in range(5):
        agent.update(served, 1.0, info={"exit_histogram": [1.0, 0, 0, 0], "metrics": {"accuracy": 0.8},
                                        "penalties": held})
        assert agent.select() == served and agent.mode == "serve"
    for _ in range(2):  # `patience` epochs of a violated floor: re-profile
        agent.update(served, -4.0, info={"exit_histogram": [1.0, 0, 0, 0], "metrics": {"accuracy": 0.1},
                                         "penalties": {**held, "accuracy>=0.9xref": 4.5}})
    assert agent.mode == "start"


def test_helios_controller_full_depth_tokens_are_not_force_exited() -> None:
    """At full depth the last histogram bucket holds tokens that ran every layer: not a confidence breach."""
    table = [arm(0, "A", 8, 8, "max_prob")]
    agent = make_agent("helios", 1, arm_table=table, profile_epochs=1, patience=2, reassess_every=50)
    late = [0.0, 0.0, 0.1, 0.9]
    agent.update(agent.select(), 1.0, info={"exit_histogram": late, "metrics": {"accuracy": 0.8}})
    agent.select()
    for _ in range(5):
        agent.update(0, 1.0, info={"exit_histogram": late, "metrics": {"accuracy": 0.8}})
        agent.select()
        assert agent.mode == "serve"


def test_static_default_is_the_reference_arm_looked_up_in_the_table() -> None:
    """conf/agent/static.yaml's default arm is the reference run, found by lookup, not by index. Table (helios.arms,
    config order): A@2 none, A@2 max_prob (exit point round(0.5 x 2) = 1), A@8 none, A@8 max_prob, B@4 none,
    B@4 max_prob; with B as the reference candidate its full-depth arm without exits is index 4."""
    from omegaconf import OmegaConf

    from helios.arms import CandidateSpec, ExitSpec, MemoryBudget, MemoryInfo, build_arms

    memory = {"A": MemoryInfo(8, {2: 10, 8: 40}, 1), "B": MemoryInfo(4, {4: 20}, 1)}
    arms = build_arms((CandidateSpec("A", (2, 8)), CandidateSpec("B", (4,))),
                      (ExitSpec(), ExitSpec("max_prob", 0.9, (0.5,))), memory, MemoryBudget(1000, 8, 4), "B")
    table = [a.to_dict() for a in arms]
    hyper = OmegaConf.to_container(OmegaConf.load("conf/agent/static.yaml"))
    agent = make_agent(hyper.pop("name"), len(table), arm_table=table, **hyper)
    assert agent.select(None, np.ones(6, bool)) == 4
    assert make_agent("static", 6, arm=2, arm_table=table).select() == 2  # an explicit index still works
    exported = agent.export()
    assert "arm_table" not in exported["hyperparameters"]  # the export document carries the table
    without_reference = [{**row, "reference": False} for row in table]
    with pytest.raises(ValueError, match="no reference arm"):
        make_agent("static", 6, arm_table=without_reference)
    with pytest.raises(ValueError, match="'reference' or an index"):
        make_agent("static", 6, arm="full", arm_table=table)
    with pytest.raises(ValueError, match="looked up in the env's arm table"):
        make_agent("static", 6).select()  # no table: nothing to look the reference up in


def test_lin_ucb_regresses_the_reward_on_the_context_it_chose_in() -> None:
    """Contexts alternate A, B, A, ...; arm 0 pays 1 in A, arm 1 pays 1 in B, else 0. The loop hands update() the
    NEXT observation (what the epoch left behind), which is always the other context: regressing on it would learn
    the swapped rule. After training, LinUCB must pick arm 0 in A and arm 1 in B (hand-made oracle)."""
    from agents import make_agent

    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    agent = make_agent("lin_ucb", 2, seed=0, alpha=0.1)
    obs = a
    for t in range(200):
        action = agent.select(obs, np.ones(2, dtype=bool))
        reward = 1.0 if (action == 0) == (obs is a) else 0.0
        obs = b if obs is a else a
        agent.update(action, reward, obs)
    agent.alpha = 0.0
    assert agent.select(a, np.ones(2, dtype=bool)) == 0 and agent.select(b, np.ones(2, dtype=bool)) == 1


def test_lin_ucb_reads_the_named_context_entries_and_rejects_unknown_names() -> None:
    from agents import make_agent

    names = ["queue_ratio", "arrival_ratio", "noise"]
    agent = make_agent("lin_ucb", 2, seed=0, context=["arrival_ratio"], observation_names=names)
    assert agent.feature_indices == [1] and agent.hyperparameters()["feature_indices"] == [1]
    agent.select(np.array([5.0, 0.3, 9.0]), np.ones(2, dtype=bool))
    assert agent.features == 1  # one named entry (+ bias)
    rebuilt = make_agent("lin_ucb", 2, seed=0, feature_indices=[1])  # what an export rebuilds from
    assert rebuilt.feature_indices == [1]
    with pytest.raises(ValueError, match="unknown context feature.*'nope'.*valid"):
        make_agent("lin_ucb", 2, context=["nope"], observation_names=names)


def test_q_load_update_by_hand() -> None:
    """States from bins of (arrival_ratio, queue_ratio); one Q-learning step computed by hand."""
    from agents import make_agent

    names = ["queue_ratio", "arrival_ratio"]
    agent = make_agent("q_load", 2, seed=0, observation_names=names, features=["arrival_ratio", "queue_ratio"],
                       edges=[[1.0], [0.5]], alpha=0.5, gamma=0.5, epsilon=0.0)
    busy, quiet = np.array([0.9, 2.0]), np.array([0.0, 0.2])  # states (1, 1) and (0, 0)
    assert agent.state(busy) == (1, 1) and agent.state(quiet) == (0, 0)
    agent.q[0, 0, 1] = 2.0  # the best next value from `quiet`
    action = agent.select(busy, np.ones(2, dtype=bool))  # all zeros in (1, 1): a tie, either arm
    agent.update(action, -4.0, quiet)
    # Q((1,1), a) = 0 + 0.5 * (-4 + 0.5 * max(0, 2) - 0) = -1.5
    assert agent.q[1, 1, action] == pytest.approx(-1.5)
    assert agent.select(busy, np.ones(2, dtype=bool)) == 1 - action  # the untried arm (0 > -1.5)
    with pytest.raises(ValueError, match="unknown feature.*valid"):
        make_agent("q_load", 2, observation_names=names, features=["nope"], edges=[[1.0]])


def test_seasonal_q_forecasts_each_slot_by_its_past_arrivals() -> None:
    """The state's arrival entry is the mean arrival ratio the coming epoch's slot showed in earlier episodes (by
    hand), the last epoch's before a slot is seen; the forecast bin decides the state; Q updates as q_load's."""
    from agents import make_agent

    names = ["arrival_ratio", "queue_ratio", "episode_progress"]
    agent = make_agent("seasonal_q", 2, seed=0, observation_names=names, edges=[[1.0], [0.5]], alpha=0.5,
                       gamma=0.0, epsilon=0.0, initial_q=-4.0)
    mask = np.ones(2, dtype=bool)

    def obs(arrival: float, slot: int, queue: float = 0.0) -> np.ndarray:
        return np.array([arrival, queue, slot / 4])  # 4-epoch episodes: progress 0, 0.25, 0.5, 0.75

    # Episode 1: slot 1 (the second epoch) is a burst (arrival 3), the others quiet (0.5).
    arrivals = [0.5, 3.0, 0.5, 0.5]
    last = obs(0.0, 0)
    assert agent.state(last) == (0, 0)  # naive forecast: the last epoch's arrival ratio (0 at the start)
    for slot, arrival in enumerate(arrivals):
        agent.update(agent.select(last, mask), -1.0, after := obs(arrival, slot + 1))
        last = after
    assert agent.forecast(obs(0.0, 1)) == pytest.approx(3.0)  # slot 1 showed 3
    assert agent.state(obs(0.0, 1)) == (1, 0)  # a burst is expected before it arrives: forecast bin 1
    assert agent.state(obs(2.0, 2)) == (0, 0)  # slot 2 showed 0.5: quiet, whatever the last epoch was
    # Episode 2: slot 1 shows 1.0 this time: the forecast is the mean over episodes, (3 + 1) / 2.
    # By hand, gamma 0, alpha 0.5: in episode 1 state (1, 0) was met once, at slot 2 (naive forecast 3.0, slot 2 not
    # yet seen): one arm b went -4 -> -4 + 0.5 (-1 + 4) = -2.5. Now slot 1's forecast 3.0 puts the agent in (1, 0),
    # greedy picks b, and reward -2 moves it to -2.5 + 0.5 (-2 + 2.5) = -2.25; the other arm stays -4.
    action = agent.select(obs(0.0, 1), mask)
    agent.update(action, -2.0, obs(1.0, 2))
    assert agent.forecast(obs(0.0, 1)) == pytest.approx(2.0)
    assert sorted(agent.q[1, 0]) == pytest.approx([-4.0, -2.25])
    assert agent.q[0, 0].max() == pytest.approx(-1.375)  # slots 0, 1, 3 of episode 1: -4 -> -2.5 -> -1.75 -> -1.375
    state = agent.state_dict()
    rebuilt = make_agent("seasonal_q", 2, seed=0, observation_names=names, edges=[[1.0], [0.5]])
    rebuilt.load_state_dict(state)
    assert rebuilt.forecast(obs(0.0, 1)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="episode_progress"):
        make_agent("seasonal_q", 2, observation_names=["arrival_ratio", "queue_ratio"])


def test_greedy_is_the_learned_choice_without_exploration() -> None:
    """Frozen evaluation plays Agent.greedy: the best mean among tried arms (UCB's bonus would pick the untried
    arm), LinUCB's prediction without its width, q_load's argmax Q with epsilon 1."""
    from agents import make_agent

    ucb = make_agent("ucb", 3, seed=0)
    ucb.counts[:] = [10, 1, 0]
    ucb.sums[:] = [5.0, 0.9, 0.0]  # means 0.5, 0.9; arm 2 untried
    assert ucb.select(None) == 2 and ucb.greedy(None) == 1
    lin = make_agent("lin_ucb", 2, seed=0, alpha=100.0, context=None)
    x = np.array([1.0])
    for _ in range(20):
        lin.select(x)
        lin.update(0, 1.0, x)
    assert lin.select(x) == 1  # the untried arm's width wins at alpha 100
    assert lin.greedy(x) == 0  # predicted 1.0 vs 0.0
    q = make_agent("q_load", 2, seed=0, observation_names=["arrival_ratio", "queue_ratio"], edges=[[1.0], [0.5]],
                   epsilon=1.0)
    q.q[0, 0] = [-1.0, -3.0]
    assert {q.greedy(np.zeros(2)) for _ in range(20)} == {0}
