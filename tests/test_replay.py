"""Replay memory tests: every check is against the math (brute force sums, exact expected frames,
hand-computed weights, a chi-square goodness of fit), never against the implementation's own output."""

from __future__ import annotations

import copy
import gc
import math
import pickle
from dataclasses import dataclass

import numpy as np
import pytest

from replay import PrioritizedReplay, SumTree
from tm_config import Config

# Upper 0.1% points of the chi-square distribution by degrees of freedom, from the NIST/SEMATECH
# e-Handbook of Statistics, section 1.3.6.7.4 "Critical Values of the Chi-Square Distribution" (column 0.001).
CHI2_CRITICAL_0_001 = {9: 27.877}


def chi_square(counts: np.ndarray, probabilities: np.ndarray) -> float:
    expected = counts.sum() * probabilities
    return float(((counts - expected) ** 2 / expected).sum())


# --- sum tree ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capacity", [1, 2, 5, 100, 1000])
def test_sum_tree_matches_brute_force(capacity: int) -> None:
    rng = np.random.default_rng(capacity)
    tree = SumTree(capacity)
    reference = np.zeros(capacity)
    for _ in range(50):
        # Few distinct indices per batch so duplicates are common; numpy alone would not promise a winner.
        indices = rng.integers(0, capacity, size=int(rng.integers(1, 40)))
        priorities = rng.random(indices.size) * rng.choice([0.0, 1.0, 1e-3, 1e3], size=indices.size)
        tree.update(indices, priorities)
        for index, priority in zip(indices, priorities, strict=True):  # last write wins
            reference[index] = priority
        np.testing.assert_array_equal(tree.leaf_priorities, reference)
        nodes, offset = tree.nodes, tree.leaf_offset
        parents = np.arange(1, offset)
        np.testing.assert_array_equal(nodes[parents], nodes[2 * parents] + nodes[2 * parents + 1])
        assert not nodes[offset + capacity :].any()  # padding leaves of a non-power-of-two capacity
        assert tree.total == pytest.approx(reference.sum(), rel=1e-12, abs=1e-300)


def test_sum_tree_prefix_sums_and_find_match_searchsorted() -> None:
    rng = np.random.default_rng(1)
    capacity = 777  # not a power of two
    # Integer priorities make every prefix sum, and every subtraction in the descent, exact in float64.
    priorities = rng.integers(0, 20, size=capacity).astype(np.float64)
    priorities[:3] = 0  # leading and trailing zero leaves
    priorities[-3:] = 0
    tree = SumTree(capacity)
    tree.update(np.arange(capacity), priorities)
    cumulative = np.cumsum(priorities)
    assert tree.total == cumulative[-1]
    values = np.concatenate([rng.uniform(0, tree.total, 20_000), cumulative[:-4], [0.0]])
    np.testing.assert_array_equal(tree.find(values), np.searchsorted(cumulative, values, side="right"))
    # Out-of-range values are clamped to the first and last non-zero leaf.
    nonzero = np.flatnonzero(priorities)
    np.testing.assert_array_equal(
        tree.find(np.array([-5.0, tree.total, 10 * tree.total])), nonzero[[0, -1, -1]]
    )


def test_sum_tree_find_never_returns_a_zero_leaf() -> None:
    rng = np.random.default_rng(2)
    capacity = 300
    priorities = rng.random(capacity) * (rng.random(capacity) < 0.3)  # ~70% zero leaves
    tree = SumTree(capacity)
    tree.update(np.arange(capacity), priorities)
    edges = np.cumsum(priorities)
    values = np.concatenate(
        [edges, np.nextafter(edges, 0), np.nextafter(edges, np.inf), rng.random(5000) * tree.total]
    )
    assert np.all(priorities[tree.find(values)] > 0)


def test_sum_tree_find_remaps_a_rounding_landing_on_a_zero_leaf() -> None:
    tree = SumTree(4)
    tree.update(np.array([0, 1]), np.array([1.0, 3.0]))
    # Simulate rounding at a segment edge: the root claims a little more than its children hold, so a
    # value just below the root's total descends past leaf 1 into the empty right half.
    tree._nodes[1] = 4.0 + 1e-9
    assert tree.find(np.array([4.0 + 5e-10]))[0] == 1


# --- feeding episodes whose frames encode (episode, k) --------------------------------------------------
def encoded_frame(episode: int, k: int, shape: tuple[int, int]) -> np.ndarray:
    frame = np.full(shape, (episode * 31 + k * 7 + 3) % 256, dtype=np.uint8)
    frame[0, 0], frame[0, 1], frame[0, 2] = episode % 256, k % 256, k // 256
    return frame


def encoded_car(episode: int, k: int) -> np.ndarray:
    return np.array([episode, k, 1000 * episode + k], dtype=np.float32)


def encoded_reward(episode: int, step: int) -> float:
    return float(1000 * episode + step)


def encoded_action(episode: int, step: int) -> int:
    return (episode + step) % 11


@dataclass
class Record:
    episode: int
    step: int  # 1-based step within the episode
    newest_frame: int  # absolute frame number p of the observation's newest frame
    terminated: bool
    truncated: bool


class Feeder:
    """Feeds episodes through the public API and keeps the reference record of every transition.

    Frame k of an episode: k < stack are the reset frames; step t adds frame stack - 1 + t. So step t's
    obs is frames t-1 .. t+stack-2 and its next obs frames t .. t+stack-1, all of its own episode.
    """

    def __init__(self, replay: PrioritizedReplay) -> None:
        self.replay = replay
        self.frames_written = 0
        self.records: list[Record] = []
        self.episodes = 0

    def episode(self, length: int, end: str | None = "terminated") -> None:
        episode, stack, shape = self.episodes, self.replay.stack, self.replay.frame_shape
        self.episodes += 1
        first = self.frames_written
        reset = np.stack([encoded_frame(episode, k, shape) for k in range(stack)])
        self.replay.start_episode(reset, encoded_car(episode, stack - 1))
        self.frames_written += stack
        for step in range(1, length + 1):
            k = stack - 1 + step
            terminated = step == length and end == "terminated"
            truncated = step == length and end == "truncated"
            self.replay.add(
                action=encoded_action(episode, step),
                reward=encoded_reward(episode, step),
                terminated=terminated,
                truncated=truncated,
                next_frame=encoded_frame(episode, k, shape),
                next_car=encoded_car(episode, k),
            )
            self.frames_written += 1
            self.records.append(Record(episode, step, first + k - 1, terminated, truncated))

    def expected_live(self) -> list[int]:
        """Transitions that must still be drawable: among the last `capacity`, and with every frame of
        their stacks not yet overwritten by the frame ring (the oldest kept frame is written - ring size)."""
        n, stack = len(self.records), self.replay.stack
        oldest_frame = self.frames_written - self.replay.frame_capacity
        return [
            i
            for i in range(max(0, n - self.replay.capacity), n)
            if self.records[i].newest_frame - stack + 1 >= oldest_frame
        ]


def assert_batch_matches_records(batch: dict[str, np.ndarray], feeder: Feeder) -> None:
    stack, shape = feeder.replay.stack, feeder.replay.frame_shape
    for row, index in enumerate(batch["indices"]):
        record = feeder.records[index]
        ep, t = record.episode, record.step
        obs = np.stack([encoded_frame(ep, k, shape) for k in range(t - 1, t - 1 + stack)])
        next_obs = np.stack([encoded_frame(ep, k, shape) for k in range(t, t + stack)])
        np.testing.assert_array_equal(batch["frames"][row], obs)
        np.testing.assert_array_equal(batch["next_frames"][row], next_obs)
        np.testing.assert_array_equal(batch["car"][row], encoded_car(ep, t + stack - 2))
        np.testing.assert_array_equal(batch["next_car"][row], encoded_car(ep, t + stack - 1))
        assert batch["reward"][row] == encoded_reward(ep, t)
        assert batch["action"][row] == encoded_action(ep, t)
        assert batch["terminated"][row] == float(record.terminated)


def assert_replay_matches_reference(feeder: Feeder) -> None:
    replay = feeder.replay
    replay.check_consistency()
    expected = feeder.expected_live()
    assert len(replay) == len(expected)
    # Every priority is still the initial max, so a stratified batch of len(replay) draws each live
    # transition exactly once: this reads back the whole live window, not a random part of it.
    batch = replay.sample(len(replay))
    assert sorted(batch["indices"].tolist()) == expected
    assert batch["frames"].dtype == np.uint8 and batch["frames"].shape == (
        len(replay),
        replay.stack,
        *replay.frame_shape,
    )
    assert_batch_matches_records(batch, feeder)


@pytest.mark.parametrize("stack", [1, 2, 4])
def test_frame_stacks_are_rebuilt_exactly_across_episodes_and_ring_wraps(stack: int) -> None:
    replay = PrioritizedReplay(64, stack=stack, seed=stack)
    feeder = Feeder(replay)
    rng = np.random.default_rng(stack)
    # Short episodes make the frame ring evict early; long ones (> capacity) evict by count.
    lengths = [1, 2, 3, 5, 1, 40, 130, 1, 1, 2, 90, 3, 70, 1, 4, *rng.integers(1, 150, size=15).tolist()]
    for number, length in enumerate(lengths):
        feeder.episode(length, end="terminated" if number % 2 else "truncated")
        assert_replay_matches_reference(feeder)
    feeder.episode(7, end=None)  # an episode still open
    assert_replay_matches_reference(feeder)
    assert feeder.frames_written > 10 * replay.frame_capacity  # the ring wrapped many times
    # Long episodes keep the memory full; the first steps of episodes (stacks of reset frames) were drawn.
    feeder.episode(200)
    assert len(replay) == replay.capacity
    assert_replay_matches_reference(feeder)


def test_short_episodes_lower_the_effective_capacity_as_documented() -> None:
    replay = PrioritizedReplay(160, stack=4, frame_shape=(8, 8))
    feeder = Feeder(replay)
    length = 16
    for _ in range(40):
        feeder.episode(length)
    # Each episode spends length + stack frames, so the frame ring holds about this many transitions.
    assert abs(len(replay) - replay.frame_capacity * length / (length + replay.stack)) <= replay.stack + 1
    assert len(replay) < replay.capacity
    assert_replay_matches_reference(feeder)


def test_terminated_and_truncated_are_stored_apart() -> None:
    replay = PrioritizedReplay(32, frame_shape=(8, 8))
    feeder = Feeder(replay)
    feeder.episode(3, end="terminated")
    feeder.episode(4, end="truncated")
    slots = np.arange(len(feeder.records)) % replay.capacity
    np.testing.assert_array_equal(replay.terminated[slots], [r.terminated for r in feeder.records])
    np.testing.assert_array_equal(replay.truncated[slots], [r.truncated for r in feeder.records])
    assert replay.terminated[2] and not replay.truncated[2]
    assert replay.truncated[6] and not replay.terminated[6]  # truncation is not terminal: it bootstraps
    assert_replay_matches_reference(feeder)


def test_add_without_an_open_episode_raises() -> None:
    replay = PrioritizedReplay(8, frame_shape=(8, 8))
    step = {"action": 0, "reward": 0.0, "next_frame": np.zeros((8, 8), np.uint8), "next_car": np.zeros(3)}
    with pytest.raises(RuntimeError, match="start_episode"):
        replay.add(terminated=False, truncated=False, **step)
    for end in ({"terminated": True, "truncated": False}, {"terminated": False, "truncated": True}):
        replay.start_episode(np.zeros((4, 8, 8), np.uint8), np.zeros(3))
        replay.add(**end, **step)
        assert not replay.episode_open
        with pytest.raises(RuntimeError, match="start_episode"):
            replay.add(terminated=False, truncated=False, **step)
    with pytest.raises(ValueError, match="uint8"):
        replay.start_episode(np.zeros((4, 8, 8), np.float32), np.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        replay.start_episode(np.zeros((3, 8, 8), np.uint8), np.zeros(3))


# --- priorities and sampling ---------------------------------------------------------------------------
def small_replay(capacity: int, transitions: int, **kwargs: object) -> PrioritizedReplay:
    """One long episode of tiny blank frames: for tests that only look at priorities and indices."""
    replay = PrioritizedReplay(capacity, frame_shape=(2, 2), stack=1, **kwargs)
    replay.start_episode(np.zeros((1, 2, 2), np.uint8), np.zeros(3))
    for _ in range(transitions):
        replay.add(0, 0.0, False, False, np.zeros((2, 2), np.uint8), np.zeros(3))
    return replay


def test_sampling_proportions_fit_priorities_chi_square() -> None:
    replay = small_replay(10, 14, alpha=0.6, seed=3)  # 4 evicted by count: slots were reused
    live = np.arange(4, 14)
    # No category tiny enough to expect fewer than 5 draws, so the chi-square approximation holds.
    td = np.array([0.05, 0.1, 0.5, 1.0, 2.0, 3.0, 5.0, 0.2, 0.7, 4.0])
    replay.update_priorities(live, td)
    probabilities = (td + 1e-6) ** 0.6 / ((td + 1e-6) ** 0.6).sum()
    # Batches of 1 are plain proportional draws, independent of each other, as the chi-square test needs.
    draws = np.array([replay.sample(1)["indices"][0] for _ in range(8000)])
    counts = np.bincount(draws - 4, minlength=10)
    assert counts.sum() == draws.size  # nothing outside the live range
    assert chi_square(counts, probabilities) < CHI2_CRITICAL_0_001[9]


def test_zero_priority_slots_are_never_drawn() -> None:
    # Length-1 episodes use 5 frames each, so the frame ring evicts and leaves zero-priority slots.
    replay = PrioritizedReplay(32, frame_shape=(4, 4), stack=4, seed=4)
    feeder = Feeder(replay)
    for _ in range(25):
        feeder.episode(1)
    assert 0 < len(replay) < replay.capacity
    oldest = replay.transitions_added - len(replay)
    for _ in range(200):
        indices = replay.sample(64)["indices"]
        assert indices.min() >= oldest and indices.max() < replay.transitions_added
        assert np.all(replay.tree.leaf_priorities[indices % replay.capacity] > 0)


def test_sampling_is_stratified_one_draw_per_segment() -> None:
    replay = small_replay(64, 64, seed=5)
    for _ in range(20):  # equal priorities: segment k holds exactly leaves 4k .. 4k+3
        np.testing.assert_array_equal(replay.sample(16)["indices"] // 4, np.arange(16))
    replay.update_priorities(np.arange(64), np.random.default_rng(5).random(64) * 3)
    cumulative = np.cumsum(replay.tree.leaf_priorities)
    segment = cumulative[-1] / 16
    lower = np.concatenate([[0.0], cumulative[:-1]])
    for _ in range(20):
        drawn = replay.sample(16)["indices"]
        # The leaf drawn for segment k covers part of [k * segment, (k + 1) * segment).
        k = np.arange(16)
        assert np.all(lower[drawn] < (k + 1) * segment) and np.all(cumulative[drawn] > k * segment)


def test_new_transition_gets_the_max_priority() -> None:
    replay = small_replay(8, 3, alpha=0.5)
    np.testing.assert_array_equal(replay.tree.leaf_priorities[:3], 1.0)  # initial max is 1
    replay.update_priorities(np.array([0, 1]), np.array([8.0, -15.0]))  # |td| counts
    replay.update_priorities(np.array([2]), np.array([0.5]))  # smaller: max stays
    replay.update_priorities(np.array([1]), np.array([0.0]))  # epsilon keeps a zero td drawable
    assert replay.tree.leaf_priorities[1] == pytest.approx(1e-6**0.5)
    replay.update_priorities(np.array([1]), np.array([-15.0]))
    assert replay.max_priority == pytest.approx(15.0 + 1e-6, rel=1e-12)
    replay.add(0, 0.0, False, False, np.zeros((2, 2), np.uint8), np.zeros(3))
    assert replay.tree.leaf_priorities[3] == pytest.approx((15.0 + 1e-6) ** 0.5, rel=1e-12)
    assert replay.tree.leaf_priorities[2] == pytest.approx((0.5 + 1e-6) ** 0.5, rel=1e-12)


def test_update_priorities_changes_sampling_and_last_duplicate_wins() -> None:
    replay = small_replay(8, 8, alpha=1.0, seed=6)
    # Index 5 appears twice: its last td (9) wins over the first (0).
    replay.update_priorities(np.array([0, 1, 2, 3, 4, 5, 6, 7, 5]), np.array([1, 1, 1, 1, 1, 0, 1, 1, 9.0]))
    assert replay.tree.leaf_priorities[5] == pytest.approx(9.0 + 1e-6)
    draws = np.concatenate([replay.sample(32)["indices"] for _ in range(200)])
    assert np.mean(draws == 5) == pytest.approx(9 / 16, abs=0.02)


def test_stale_update_on_an_evicted_transition_is_ignored() -> None:
    # Count eviction: transition 0's slot is reused by transition 4 before the update comes back.
    replay = small_replay(4, 4, alpha=1.0)
    indices = replay.sample(4)["indices"]
    assert 0 in indices
    replay.add(0, 0.0, False, False, np.zeros((2, 2), np.uint8), np.zeros(3))
    replay.update_priorities(indices, np.full(4, 50.0))
    assert replay.tree.leaf_priorities[0] == 1.0  # transition 4 kept the priority it was written with
    replay.check_consistency()

    # Frame eviction: the evicted slot is empty (priority 0) and must stay so.
    replay = PrioritizedReplay(8, frame_shape=(4, 4), stack=2)
    feeder = Feeder(replay)
    for _ in range(3):
        feeder.episode(1)
    stale = int(replay.sample(8)["indices"].min())
    while replay.transitions_added - len(replay) <= stale:
        feeder.episode(1)
    assert replay.transitions_added < stale + replay.capacity  # its slot has not been reused yet
    live_before, max_before = len(replay), replay.max_priority
    replay.update_priorities(np.array([stale]), np.array([100.0]))
    assert replay.tree.leaf_priorities[stale % replay.capacity] == 0.0
    assert len(replay) == live_before and replay.max_priority == max_before
    replay.check_consistency()


def test_importance_weights_match_hand_computation() -> None:
    replay = small_replay(4, 4, alpha=1.0, beta=0.5, beta_increment=0.0, priority_epsilon=1e-6)
    replay.update_priorities(np.arange(4), np.array([1.0, 1.0, 2.0, 4.0]) - 1e-6)  # priorities 1, 1, 2, 4
    batch = replay.sample(4)
    # Total 8, four segments of mass 2: [0,2) falls in leaf 0 or 1, [2,4) in leaf 2, [4,8) twice in leaf 3.
    assert batch["indices"][0] in (0, 1)
    np.testing.assert_array_equal(batch["indices"][1:], [2, 3, 3])
    # P = 1/8, 2/8, 4/8 with N = 4: (N P)^-0.5 = sqrt(2), 1, 1/sqrt(2); divided by the batch max sqrt(2).
    np.testing.assert_allclose(batch["weights"], [1.0, 1 / math.sqrt(2), 0.5, 0.5], rtol=1e-6)
    assert batch["weights"].dtype == np.float32


def test_beta_anneals_per_applied_learn_step_and_caps_at_one() -> None:
    replay = small_replay(4, 4, alpha=1.0, beta=0.4, beta_increment=0.25)
    replay.update_priorities(np.arange(4), np.array([1.0, 2.0, 3.0, 4.0]))
    leaves = np.array(replay.tree.leaf_priorities)
    for beta_before in (0.4, 0.65, 0.9, 1.0, 1.0):
        assert replay.beta == pytest.approx(beta_before), "beta moves by beta_increment per learn step"
        batch = replay.sample(8)
        assert replay.beta == pytest.approx(beta_before), "sampling alone must not move beta"
        raw = (4 * leaves[batch["indices"]] / leaves.sum()) ** -beta_before
        np.testing.assert_allclose(batch["weights"], raw / raw.max(), rtol=1e-6)
        replay.advance_beta()  # what the agent does after a learn step it applied
    assert replay.beta == 1.0, "beta is capped at 1"

    pinned = PrioritizedReplay.from_config(Config(), seed=0)  # lazily allocated: cheap until written
    for _ in range(600):
        pinned.advance_beta()
    assert pinned.beta == pytest.approx(1.0, abs=1e-9), "pinned: 0.4 + 600 * 0.001 (original-code.md 7)"
    pinned.advance_beta()
    assert pinned.beta == 1.0
    del pinned
    gc.collect()


def test_uniform_mode_when_not_prioritized() -> None:
    replay = small_replay(10, 25, prioritized=False, seed=7)  # transitions 15 .. 24 live
    leaves = np.array(replay.tree.leaf_priorities)
    replay.update_priorities(np.arange(15, 25), np.full(10, 7.0))  # a no-op
    np.testing.assert_array_equal(replay.tree.leaf_priorities, leaves)
    assert replay.max_priority == 1.0
    batch = replay.sample(20_000)
    np.testing.assert_array_equal(batch["weights"], 1.0)
    replay.advance_beta()
    assert replay.beta == pytest.approx(0.4 + 0.001)  # still annealed and reported
    counts = np.bincount(batch["indices"] - 15, minlength=10)
    assert counts.sum() == 20_000  # nothing evicted drawn
    assert chi_square(counts, np.full(10, 0.1)) < CHI2_CRITICAL_0_001[9]


def test_from_config_reads_the_pinned_field_names() -> None:
    config = Config().with_overrides(
        max_buffer_size=48,
        conv_input=2,
        alpha=0.7,
        beta=0.5,
        beta_increment=0.01,
        use_prioritized_replay=False,
    )
    replay = PrioritizedReplay.from_config(config, seed=1)
    assert (replay.capacity, replay.stack, replay.car_dim, replay.frame_shape) == (48, 2, 3, (64, 64))
    assert (replay.alpha, replay.beta, replay.beta_increment, replay.prioritized) == (0.7, 0.5, 0.01, False)
    assert replay.priority_epsilon == config.priority_epsilon


# --- memory --------------------------------------------------------------------------------------------
def test_bytes_per_transition_at_the_pinned_capacity() -> None:
    config = Config()
    replay = PrioritizedReplay.from_config(config, seed=0)
    capacity, stack = config.max_buffer_size, config.conv_input
    assert replay.capacity == capacity == 100_000
    frame_capacity = capacity + capacity // 16 + 2 * stack
    tree_nodes = 2 * 2 ** math.ceil(math.log2(capacity))
    expected = (
        frame_capacity * config.img_x * config.img_y  # uint8 frames
        + frame_capacity * config.input_car_dim * 4  # float32 car floats per frame
        + capacity * (8 + 1 + 4 + 1 + 1)  # frame index, action, reward, terminated, truncated
        + tree_nodes * 8  # float64 sum tree
    )
    assert replay.nbytes == expected
    per_transition = replay.bytes_per_transition()
    print(
        f"replay bytes per transition at capacity {capacity}: {per_transition:.1f} ({replay.nbytes:,} bytes)"
    )
    assert per_transition <= 4608
    del replay
    gc.collect()


# --- checkpointing -------------------------------------------------------------------------------------
def test_state_dict_round_trip_resumes_the_same_sample_sequence() -> None:
    original = PrioritizedReplay(48, frame_shape=(8, 8), seed=11)
    feeder = Feeder(original)
    for length in (30, 3, 25, 4):
        feeder.episode(length)
    for _ in range(3):  # move the generator, beta and priorities away from their initial values
        batch = original.sample(8)
        original.update_priorities(batch["indices"], np.random.default_rng(0).normal(size=8))
    feeder.episode(5, end=None)
    state = pickle.loads(pickle.dumps(original.state_dict()))  # as a checkpoint file would

    resumed = PrioritizedReplay(48, frame_shape=(8, 8), seed=999)
    resumed.load_state_dict(state)
    resumed.check_consistency()
    assert (len(resumed), resumed.beta, resumed.max_priority) == (
        len(original),
        original.beta,
        original.max_priority,
    )
    assert resumed.episode_open
    rng = np.random.default_rng(1)
    for step in range(6):
        a, b = original.sample(8), resumed.sample(8)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        td = rng.normal(size=8)
        original.update_priorities(a["indices"], td)
        resumed.update_priorities(b["indices"], td)
        frame, car = encoded_frame(99, step, (8, 8)), encoded_car(99, step)
        original.add(1, 0.5, False, False, frame, car)
        resumed.add(1, 0.5, False, False, frame, car)


def test_load_into_a_different_memory_raises_a_one_line_value_error() -> None:
    state = small_replay(16, 5).state_dict()
    for other in (
        PrioritizedReplay(32, frame_shape=(2, 2), stack=1),
        PrioritizedReplay(16, frame_shape=(4, 4), stack=1),
        PrioritizedReplay(16, frame_shape=(2, 2), stack=2),
    ):
        with pytest.raises(ValueError) as error:
            other.load_state_dict(state)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="missing rng_state"):
        small_replay(16, 0).load_state_dict({k: v for k, v in state.items() if k != "rng_state"})
    with pytest.raises(ValueError, match="capacity=16.*capacity=32"):
        PrioritizedReplay(32, frame_shape=(2, 2), stack=1).load_state_dict(state)


def test_check_consistency_catches_broken_invariants() -> None:
    def corrupted(change: str) -> PrioritizedReplay:
        source = PrioritizedReplay(16, frame_shape=(4, 4), stack=2)
        feeder = Feeder(source)
        for _ in range(6):
            feeder.episode(3)
        state = pickle.loads(pickle.dumps(source.state_dict()))
        if change == "leaf":
            state["tree"][state["tree"].size // 2 + 3] += 0.5  # a leaf no longer adds up to its parents
        elif change == "evicted leaf":
            oldest_slot = (state["oldest_transition"] - 1) % 16
            tree = SumTree(16)
            leaves = state["tree"][16:32].copy()
            leaves[oldest_slot] = 1.0  # a consistent tree, but an evicted slot is drawable again
            tree.update(np.arange(16), leaves)
            state["tree"] = np.array(tree.nodes)
        elif change == "frame reference":
            state["frame_index"][state["oldest_transition"] % 16] -= 40  # points at overwritten frames
        elif change == "counters":
            state["oldest_transition"] = state["next_transition"] + 1
        target = PrioritizedReplay(16, frame_shape=(4, 4), stack=2)
        target.load_state_dict(state)
        return target

    corrupted("none").check_consistency()
    for change in ("leaf", "evicted leaf", "frame reference", "counters"):
        with pytest.raises(ValueError) as error:
            corrupted(change).check_consistency()
        assert "\n" not in str(error.value), change


def test_a_young_memory_saves_only_its_written_rows_and_restores_exactly() -> None:
    rng = np.random.default_rng(5)
    memory = PrioritizedReplay(1000, seed=1)
    memory.start_episode(rng.integers(0, 256, (4, 64, 64), dtype=np.uint8), np.zeros(3, np.float32))
    for step in range(50):
        memory.add(
            step % 11,
            float(step),
            False,
            False,
            rng.integers(0, 256, (64, 64), dtype=np.uint8),
            np.ones(3, np.float32),
        )
    state = memory.state_dict()
    assert state["frames"].shape == (54, 64, 64) and state["rewards"].shape == (50,)
    restored = PrioritizedReplay(1000, seed=2)
    restored.load_state_dict(pickle.loads(pickle.dumps(state)))
    restored.check_consistency()
    first, second = memory.sample(16), restored.sample(16)
    for key in first:
        assert np.array_equal(first[key], second[key]), key
    too_long = {**state, "rewards": np.zeros(1001, np.float32)}
    with pytest.raises(ValueError, match="'rewards' is float32"):
        PrioritizedReplay(1000).load_state_dict(too_long)


# --- n-step returns -----------------------------------------------------------------------------------
def test_n_step_returns_match_a_hand_computed_sum_across_episode_ends() -> None:
    """n = 3, gamma = 0.5. Episode A (5 steps) terminates, B (4 steps) is truncated, C (2 steps) runs on.
    A terminated window does not bootstrap; a truncated one bootstraps from the last state it reached; an
    open episode's window stops at the newest stored step. Car float 0 names each observation."""
    replay = PrioritizedReplay(16, stack=2, alpha=0.0, discount_factor=0.5, n_step=3)
    observation = iter(range(100))

    def car() -> np.ndarray:
        return np.array([next(observation), 0.0, 0.0], np.float32)

    def frame() -> np.ndarray:
        return np.zeros((64, 64), np.uint8)

    ids = []  # the id of each transition's next observation
    episodes = [([1, 2, 3, 4, 5], "terminated"), ([10, 20, 30, 40], "truncated"), ([100, 200], None)]
    for rewards, end in episodes:
        replay.start_episode(np.zeros((2, 64, 64), np.uint8), car())
        for k, reward in enumerate(rewards):
            last = k == len(rewards) - 1
            next_car = car()
            ids.append(int(next_car[0]))
            terminated, truncated = last and end == "terminated", last and end == "truncated"
            replay.add(0, float(reward), terminated, truncated, frame(), next_car)
    batch = replay.transitions(np.arange(11))
    expected = {  # transition: (discounted return, discount, id of the bootstrap state)
        0: (1 + 0.5 * 2 + 0.25 * 3, 0.125, ids[2]),
        1: (2 + 0.5 * 3 + 0.25 * 4, 0.125, ids[3]),
        2: (3 + 0.5 * 4 + 0.25 * 5, 0.0, ids[4]),  # the window ends in A's termination: no bootstrap
        3: (4 + 0.5 * 5, 0.0, ids[4]),
        4: (5.0, 0.0, ids[4]),
        5: (10 + 0.5 * 20 + 0.25 * 30, 0.125, ids[7]),
        6: (20 + 0.5 * 30 + 0.25 * 40, 0.125, ids[8]),  # truncated: bootstraps from the last state reached
        7: (30 + 0.5 * 40, 0.25, ids[8]),
        8: (40.0, 0.5, ids[8]),
        9: (100 + 0.5 * 200, 0.25, ids[10]),  # C is still running: the newest step ends the window
        10: (200.0, 0.5, ids[10]),
    }
    for t, (total, discount, bootstrap) in expected.items():
        assert batch["reward"][t] == pytest.approx(total), f"transition {t}: n-step return"
        assert batch["discount"][t] == pytest.approx(discount), f"transition {t}: gamma^m (0 if terminated)"
        assert batch["next_car"][t, 0] == bootstrap, f"transition {t}: bootstraps from the wrong state"
    assert batch["steps"].tolist() == [3, 3, 3, 2, 1, 3, 3, 2, 1, 2, 1]
    # With n = 1 the same memory gives the plain transitions.
    replay.n_step = 1
    plain = replay.transitions(np.arange(11))
    assert plain["reward"].tolist() == [1, 2, 3, 4, 5, 10, 20, 30, 40, 100, 200]
    assert plain["discount"].tolist() == [0.5, 0.5, 0.5, 0.5, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert plain["next_car"][:, 0].tolist() == ids


def test_an_episode_cut_off_by_a_stop_ends_before_the_next_one_starts() -> None:
    """A run stopped mid-episode and resumed: the cut episode's last step has neither flag, and the next
    episode's steps follow it in the memory. No n-step return may reach across: the cut ends as a truncation
    (bootstrapping from the last state it reached)."""
    replay = PrioritizedReplay(16, stack=2, alpha=0.0, discount_factor=0.5, n_step=3)
    cars = iter(range(100))
    for rewards in ([1.0, 2.0, 4.0], [100.0, 200.0, 400.0]):  # the first episode is never ended
        replay.start_episode(np.zeros((2, 64, 64), np.uint8), np.array([next(cars), 0, 0], np.float32))
        for reward in rewards:
            car = np.array([next(cars), 0, 0], np.float32)
            replay.add(0, reward, False, False, np.zeros((64, 64), np.uint8), car)
    batch = replay.transitions(np.arange(6))
    expected = [1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4.0]
    assert batch["reward"][:3].tolist() == expected, "an n-step return crossed the cut"
    assert batch["discount"][:3].tolist() == [0.125, 0.25, 0.5]
    assert batch["next_car"][:3, 0].tolist() == [3.0, 3.0, 3.0], "the cut bootstraps from its own last state"
    assert replay.truncated[:6].tolist() == [False, False, True, False, False, False]
    # Stopped during the reset that followed a terminated episode: the open episode has no step, and the
    # terminated one is not marked truncated when the run resumes.
    replay.add(0, 1.0, True, False, np.zeros((64, 64), np.uint8), np.array([50, 0, 0], np.float32))
    for _ in range(2):
        replay.start_episode(np.zeros((2, 64, 64), np.uint8), np.array([60, 0, 0], np.float32))
    assert (bool(replay.terminated[6]), bool(replay.truncated[6])) == (True, False)


# --- the demonstration part (issue 17) -----------------------------------------------------------------
def demo_memory(own_transitions: int = 40, demo_transitions: int = 12, bonus: float = 1.0, **kwargs):
    from replay import DemoReplay

    options = dict(alpha=1.0, beta=0.4, priority_epsilon=1e-6, **kwargs)
    own = PrioritizedReplay(32, seed=1, **options)
    demos = PrioritizedReplay(demo_transitions + 4, seed=2, **{**options, "priority_epsilon": 1e-6 + bonus})
    rng = np.random.default_rng(0)
    for memory, count, reward in ((own, own_transitions, 0.0), (demos, demo_transitions, 10.0)):
        memory.start_episode(rng.integers(0, 256, (4, 64, 64), dtype=np.uint8), np.zeros(3, np.float32))
        for t in range(count):
            car = np.array([t, 0, 0], np.float32)
            memory.add(t % 11, reward, False, False, rng.integers(0, 256, (64, 64), dtype=np.uint8), car)
    return DemoReplay(own, demos, seed=3)


def test_demonstrations_are_never_evicted_and_carry_their_source_and_negative_numbers() -> None:
    memory = demo_memory(own_transitions=200)  # the agent's ring (32) wrapped many times over
    assert len(memory) == 32 and memory.transitions_added == 200 and len(memory.demos) == 12
    batch = memory.sample(64)
    demo = batch["is_demo"] > 0.5
    assert demo.any() and (~demo).any()
    assert (batch["indices"][demo] < 0).all() and (batch["indices"][~demo] >= 168).all()
    assert (batch["reward"][demo] == 10.0).all() and (batch["reward"][~demo] == 0.0).all(), (
        "tags match the data"
    )
    memory.check_consistency()


def test_sampling_is_proportional_over_both_parts_with_the_demonstration_bonus() -> None:
    memory = demo_memory(own_transitions=20, demo_transitions=10, bonus=1.0)
    # Every priority is (|td| + eps)^1: 1.0 for the agent's (after an update with |td| = 1 - eps), and
    # 1 + bonus = 2.0 for a demonstration (same |td|): demos hold 20 of the 40 units of mass.
    memory.update_priorities(np.arange(20), np.full(20, 1.0 - 1e-6))
    memory.update_priorities(-np.arange(1, 11), np.full(10, 1.0 - 1e-6))
    assert memory.demos.tree.total == pytest.approx(20.0) and memory.own.tree.total == pytest.approx(20.0)
    draws = np.concatenate([memory.sample(40)["is_demo"] for _ in range(200)])
    assert draws.mean() == pytest.approx(0.5, abs=0.03), "half the mass, half the draws"


def test_importance_weights_are_normalised_within_each_source() -> None:
    """Seed 002: one source's systematically larger or smaller priorities must not scale the other's
    weights. Whichever source holds the rarer (larger-weight) samples, each source's largest weight is 1."""
    for demo_td in (50.0, 0.05):  # the demonstrations drawn far more often, then far less often
        memory = demo_memory(own_transitions=20, demo_transitions=10)
        memory.update_priorities(np.arange(20), np.linspace(0.5, 2.0, 20))
        memory.update_priorities(-np.arange(1, 11), np.full(10, demo_td))
        batch = memory.sample(64)
        demo = batch["is_demo"] > 0.5
        assert demo.any() and (~demo).any()
        assert batch["weights"][~demo].max() == pytest.approx(1.0), "the agent's weights against its own max"
        assert batch["weights"][demo].max() == pytest.approx(1.0), "the demos' weights against their own max"
        # Within a source the weights keep their ratios: (N P)^-beta.
        own = ~demo
        priorities = memory.own.tree.leaf_priorities[batch["indices"][own] % memory.own.capacity]
        raw = priorities**-memory.beta
        np.testing.assert_allclose(batch["weights"][own], raw / raw.max(), rtol=1e-5)


def test_a_memory_with_demonstrations_round_trips_exactly() -> None:
    memory = demo_memory()
    memory.update_priorities(np.arange(8, 40), np.linspace(0.1, 3.0, 32))
    memory.advance_beta()
    state = copy.deepcopy(memory.state_dict())
    expected = memory.sample(16)
    clone = demo_memory(own_transitions=0, demo_transitions=12)
    clone.load_state_dict(state)
    clone.check_consistency()
    again = clone.sample(16)
    for key, value in expected.items():
        assert np.array_equal(again[key], value), f"{key} differs after a round trip"
    with pytest.raises(ValueError, match="holds no demonstration part"):
        clone.load_state_dict(memory.own.state_dict())
