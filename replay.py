"""Prioritized replay memory with a uint8 frame store (numpy only: no networks, no environments). One concept
at ~750 lines: the tree, the frame ring, n-step windows and the demonstration part index the same slots.

Two pieces:

- `SumTree`: a binary sum tree over `capacity` leaves, updated and searched with one numpy operation per
  tree level for a whole batch, so a learn step never loops in python over its samples.
- `PrioritizedReplay`: proportional prioritized experience replay (Schaul et al. 2016) whose observations
  are stacks of `stack` grayscale frames. Each frame is stored once, as uint8, in a ring of single frames;
  a transition keeps only the absolute number `p` of its observation's newest frame, so

      obs stack      = frames p - stack + 1 .. p        obs car floats  = car[p]
      next-obs stack = frames p - stack + 2 .. p + 1    next car floats = car[p + 1]

  and a (stack, 64, 64) observation costs one new frame per step instead of `stack`. Episodes are fed with
  `start_episode` (the reset observation, all `stack` frames) followed by one `add` per env step (the newest
  frame of the next observation). Because every episode begins with its own `stack` reset frames, a stack
  never mixes frames of two episodes.

Capacity. Transitions live in a ring of `capacity` slots and frames in a ring of
`frame_capacity = capacity + capacity // 16 + 2 * stack` slots. An episode of L steps uses L + stack
frames, so when the average episode is shorter than ~16 * stack steps (64 for the pinned stack of 4) the
frame ring fills first: the oldest transitions are then evicted early and the effective capacity is about
`frame_capacity * L / (L + stack)` for an average episode length L, slightly below `capacity` for episodes a
little shorter than 64 steps (TrackMania episodes run to hundreds of steps: the pinned run keeps it all).

Sampled `indices` are absolute transition numbers (the slot is `index % capacity`). Handing them back to
`update_priorities` lets it recognise, exactly, a transition evicted since it was sampled: its number is
below the oldest live one, so a stale update cannot resurrect an evicted or reused slot.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tm_config import Config

STATE_VERSION = 1


class SumTree:
    """A binary sum tree over `capacity` non-negative leaves, stored as one float64 array.

    Node 1 is the root and node i has children 2i and 2i + 1. The leaves are padded up to a power of two
    with zero leaves that are never written, so every leaf sits at the same depth: a batch of updates or
    searches then moves through the tree together, one numpy operation per level. Internal nodes are
    always recomputed from their two children (never adjusted by a delta), so no rounding error
    accumulates: each internal node is exactly the float sum of its children, however long the run.

    Speed: a batch of 32 is small, so the cost is the number of numpy calls, not the arithmetic. An update
    recomputes the changed leaves' ancestors level by level only in the lower levels; the top
    `TOP_LEVELS` levels (1023 nodes) are recomputed whole, one slice operation per level, which is cheaper
    than finding their few changed nodes and gives the same sums.
    """

    TOP_LEVELS = 10

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"SumTree capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.leaf_offset = 1 << (self.capacity - 1).bit_length()  # first leaf's node number
        self.depth = self.leaf_offset.bit_length() - 1  # levels between the root and the leaves
        self._nodes = np.zeros(2 * self.leaf_offset, dtype=np.float64)  # node 0 is unused
        self._top_levels = min(self.depth, self.TOP_LEVELS)
        # Right shifts from a leaf's node number to its ancestors below the top levels, nearest first.
        self._lower_shifts = np.arange(1, self.depth - self._top_levels + 1, dtype=np.int64)[:, None]

    @property
    def total(self) -> float:
        return float(self._nodes[1])

    @property
    def nodes(self) -> np.ndarray:
        """Read-only view of the whole tree (node 0 unused, root at 1, leaves from `leaf_offset`)."""
        view = self._nodes.view()
        view.flags.writeable = False
        return view

    @property
    def leaf_priorities(self) -> np.ndarray:
        """Read-only view of the `capacity` leaves."""
        view = self._nodes[self.leaf_offset : self.leaf_offset + self.capacity]
        view.flags.writeable = False
        return view

    @property
    def nbytes(self) -> int:
        return int(self._nodes.nbytes)

    def update(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        """Set leaves `indices` to `priorities`; for a repeated index the last write wins."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        priorities = np.asarray(priorities, dtype=np.float64).reshape(-1)
        if indices.shape != priorities.shape:
            raise ValueError(f"{indices.size} indices but {priorities.size} priorities")
        if indices.size == 0:
            return
        if indices.min() < 0 or indices.max() >= self.capacity:
            raise ValueError(f"leaf index out of range [0, {self.capacity})")
        if not np.all(np.isfinite(priorities)) or priorities.min() < 0:
            raise ValueError("priorities must be finite and >= 0")
        if indices.size > 1:
            # numpy leaves the winner of a repeated fancy-index assignment unspecified, so deduplicate:
            # the first occurrence in the reversed batch is the last write.
            indices, first_in_reversed = np.unique(indices[::-1], return_index=True)
            priorities = priorities[::-1][first_in_reversed]
        tree = self._nodes
        leaves = indices + self.leaf_offset
        tree[leaves] = priorities
        # Lower levels: the ancestors of the changed leaves, level by level (a parent shared by several
        # leaves is computed more than once, from the same children: the same value each time).
        for parents in leaves >> self._lower_shifts:
            children = parents << 1
            tree[parents] = tree[children] + tree[children + 1]
        # Top levels: every node, bottom-up, one slice per level.
        for level in range(self._top_levels - 1, -1, -1):
            first = 1 << level
            np.add(
                tree[2 * first : 4 * first : 2],
                tree[2 * first + 1 : 4 * first : 2],
                out=tree[first : 2 * first],
            )

    def find(self, values: np.ndarray) -> np.ndarray:
        """Leaf index for each prefix-sum value: the first leaf i with leaves[0] + ... + leaves[i] > value.

        Values are clamped to [0, total). Rounding in the descent can still, at a segment edge, land on a
        zero leaf (or a padding leaf); those are re-mapped to the nearest non-zero leaf on their left (on
        their right if there is none), so a zero-priority leaf is never returned while any is non-zero.
        """
        tree = self._nodes
        total = tree[1]
        if not total > 0:
            raise ValueError("cannot search a sum tree whose total priority is 0")
        values = np.array(values, dtype=np.float64).reshape(-1)  # a copy: the descent works in place
        np.minimum(np.maximum(values, 0.0, out=values), np.nextafter(total, 0.0), out=values)
        nodes = np.ones(values.shape, dtype=np.int64)
        for _ in range(self.depth):
            nodes <<= 1  # left child
            left = tree[nodes]
            go_right = values >= left
            np.subtract(values, left, out=values, where=go_right)
            nodes += go_right
        leaves = nodes - self.leaf_offset
        bad = (leaves >= self.capacity) | (tree[nodes] <= 0)
        if bad.any():
            nonzero = np.flatnonzero(self.leaf_priorities > 0)
            position = np.searchsorted(nonzero, leaves[bad], side="right") - 1
            leaves[bad] = nonzero[np.maximum(position, 0)]
        return leaves


class PrioritizedReplay:
    """Proportional prioritized replay of frame-stacked transitions; see the module docstring for layout.

    Storage is allocated up front with np.zeros, so the operating system commits the frame ring's pages
    as they are first written rather than at construction.
    """

    def __init__(
        self,
        capacity: int,
        *,
        frame_shape: tuple[int, int] = (64, 64),
        stack: int = 4,
        car_dim: int = 3,
        alpha: float = 0.6,
        beta: float = 0.4,
        beta_increment: float = 0.001,
        priority_epsilon: float = 1e-6,
        prioritized: bool = True,
        discount_factor: float = 0.997,
        n_step: int = 1,
        seed: int = 0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        if stack < 1:
            raise ValueError(f"stack must be >= 1, got {stack}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if beta_increment < 0:
            raise ValueError(f"beta_increment must be >= 0, got {beta_increment}")
        if not 0.0 <= discount_factor < 1.0:
            raise ValueError(f"discount_factor must be in [0, 1), got {discount_factor}")
        if not priority_epsilon > 0:
            raise ValueError(
                f"priority_epsilon must be > 0 (keeps every transition drawable), got {priority_epsilon}"
            )
        self.capacity = int(capacity)
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.stack = int(stack)
        self.car_dim = int(car_dim)
        self.alpha = float(alpha)
        self.beta_increment = float(beta_increment)
        self.priority_epsilon = float(priority_epsilon)
        self.prioritized = bool(prioritized)
        self.discount_factor = float(discount_factor)
        if n_step < 1:
            raise ValueError(f"n_step must be >= 1, got {n_step}")
        self.n_step = int(n_step)
        # 1/16 spare frames absorb the `stack` reset frames of episodes >= 16 * stack steps long; 2 * stack
        # more keep the open episode's current observation and the frame being written clear of them.
        self.frame_capacity = self.capacity + self.capacity // 16 + 2 * self.stack
        self._stack_offsets = np.arange(1 - self.stack, 1)  # an observation's frames relative to its newest

        self.frames = np.zeros((self.frame_capacity, *self.frame_shape), dtype=np.uint8)
        self.car = np.zeros((self.frame_capacity, self.car_dim), dtype=np.float32)
        self.frame_index = np.zeros(
            self.capacity, dtype=np.int64
        )  # absolute number of the obs's newest frame
        self.actions = np.zeros(self.capacity, dtype=np.uint8)
        self.rewards = np.zeros(self.capacity, dtype=np.float32)
        self.terminated = np.zeros(self.capacity, dtype=bool)
        self.truncated = np.zeros(self.capacity, dtype=bool)  # kept for inspection; never bootstrapped on
        self.tree = SumTree(self.capacity)

        # Absolute (never wrapping) counters: slots are counter % ring size, so wrap-around is exact.
        self._next_transition = 0  # transitions ever added
        self._oldest_transition = 0  # oldest live transition; live ones are [oldest, next)
        self._next_frame = 0  # frames ever written
        self._episode_open = False
        self._beta = float(beta)
        self._max_priority = 1.0  # raw |td| + epsilon, before the alpha exponent
        self._rng = np.random.default_rng(seed)

    @classmethod
    def from_config(
        cls, config: Config, seed: int, capacity: int | None = None, priority_bonus: float = 0.0
    ) -> PrioritizedReplay:
        """The memory `config` describes (`capacity` and a priority bonus: the demonstration part's)."""
        return cls(
            config.max_buffer_size if capacity is None else capacity,
            frame_shape=(config.img_y, config.img_x),
            stack=config.conv_input,
            car_dim=config.state_floats,
            alpha=config.alpha,
            beta=config.beta,
            beta_increment=config.beta_increment,
            priority_epsilon=config.priority_epsilon + priority_bonus,
            prioritized=config.use_prioritized_replay,
            discount_factor=config.discount_factor,
            n_step=config.n_step,
            seed=seed,
        )

    # --- sizes and read-only state -----------------------------------------------------------------
    def __len__(self) -> int:
        return self._next_transition - self._oldest_transition

    @property
    def beta(self) -> float:
        return self._beta

    @property
    def max_priority(self) -> float:
        return self._max_priority

    @property
    def episode_open(self) -> bool:
        return self._episode_open

    @property
    def transitions_added(self) -> int:
        return self._next_transition

    @property
    def nbytes(self) -> int:
        arrays = (
            self.frames,
            self.car,
            self.frame_index,
            self.actions,
            self.rewards,
            self.terminated,
            self.truncated,
        )
        return sum(int(a.nbytes) for a in arrays) + self.tree.nbytes

    def bytes_per_transition(self) -> float:
        return self.nbytes / self.capacity

    # --- writing -----------------------------------------------------------------------------------
    def start_episode(self, frames: np.ndarray, car: np.ndarray) -> None:
        """Store the reset observation: all `stack` frames (oldest first) and its car floats."""
        frames = self._check_frames(frames, (self.stack, *self.frame_shape), "start_episode frames")
        car = self._check_car(car, "start_episode car")
        last = (self._next_transition - 1) % self.capacity
        ended = bool(self.terminated[last] or self.truncated[last])
        if self._episode_open and self._next_transition and not ended:
            # The previous episode was cut off (the run stopped mid-episode and resumed): its last step ends
            # it as a truncation, so no n-step return reaches into this episode.
            self.truncated[last] = True
        first = self._next_frame
        evicted = self._evict_for_frame(first + self.stack - 1)
        if evicted.size:
            self.tree.update(evicted, np.zeros(evicted.size))
        slots = np.arange(first, first + self.stack) % self.frame_capacity
        self.frames[slots] = frames
        self.car[slots] = car  # only the newest slot is ever read; filling all keeps the ring tidy
        self._next_frame += self.stack
        self._episode_open = True

    def add(
        self,
        action: int,
        reward: float,
        terminated: bool,
        truncated: bool,
        next_frame: np.ndarray,
        next_car: np.ndarray,
    ) -> None:
        """Store one env step: its transition fields and the newest frame and car floats of the next obs."""
        if not self._episode_open:
            raise RuntimeError(
                "add() called without an open episode: call start_episode() with the reset observation first "
                "(also after a terminated or truncated step)"
            )
        if not 0 <= int(action) <= np.iinfo(self.actions.dtype).max:
            raise ValueError(f"action {action} does not fit the stored uint8 action")
        next_frame = self._check_frames(next_frame, self.frame_shape, "add next_frame")
        next_car = self._check_car(next_car, "add next_car")

        frame = self._next_frame
        evicted = [self._evict_for_frame(frame)]
        if len(self) == self.capacity:
            evicted.append(np.array([self._evict_oldest()], dtype=np.int64))
        frame_slot = frame % self.frame_capacity
        self.frames[frame_slot] = next_frame
        self.car[frame_slot] = next_car
        self._next_frame += 1

        slot = self._next_transition % self.capacity
        self.frame_index[slot] = frame - 1  # frames are written in order, so the obs's newest is the last one
        self.actions[slot] = int(action)
        self.rewards[slot] = reward
        self.terminated[slot] = bool(terminated)
        self.truncated[slot] = bool(truncated)
        self._next_transition += 1
        # One tree update for the evictions and the new transition; the new one comes last, so it wins
        # when count-based eviction freed exactly its slot.
        indices = np.concatenate([*evicted, [slot]])
        priorities = np.zeros(indices.size)
        priorities[-1] = self._max_priority**self.alpha
        self.tree.update(indices, priorities)
        if terminated or truncated:
            self._episode_open = False

    def _evict_oldest(self) -> int:
        slot = self._oldest_transition % self.capacity
        self._oldest_transition += 1
        return slot

    def _evict_for_frame(self, frame: int) -> np.ndarray:
        """Evict the oldest transitions whose stacks reach `frame - frame_capacity`, about to be overwritten.

        Returns their slots; the caller zeroes their priorities. Live transitions' frame numbers increase
        with their age order, so the evicted ones are a prefix of the live range.
        """
        overwritten = frame - self.frame_capacity
        slots = []
        while (
            len(self)
            and self.frame_index[self._oldest_transition % self.capacity] - self.stack + 1 <= overwritten
        ):
            slots.append(self._evict_oldest())
        return np.asarray(slots, dtype=np.int64)

    def _check_frames(self, frames: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.shape != shape:
            raise ValueError(f"{what} must be uint8 of shape {shape}, got {frames.dtype} {frames.shape}")
        return frames

    def _check_car(self, car: np.ndarray, what: str) -> np.ndarray:
        car = np.asarray(car, dtype=np.float32)
        if car.shape != (self.car_dim,):
            raise ValueError(f"{what} must have shape ({self.car_dim},), got {car.shape}")
        return car

    # --- sampling ----------------------------------------------------------------------------------
    def locate(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The live transitions at prefix-sum `values` of the priority mass: (numbers, priorities)."""
        slots = self.tree.find(values)
        # Live transitions fill the `live` slots from the oldest one on, so a slot fixes its number.
        oldest_slot = self._oldest_transition % self.capacity
        indices = self._oldest_transition + (slots - oldest_slot) % self.capacity
        return indices, self.tree._nodes[slots + self.tree.leaf_offset]

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        """Draw a batch; `indices` are absolute transition numbers to hand back to `update_priorities`."""
        live = len(self)
        if live == 0:
            raise ValueError("cannot sample from an empty replay memory")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.prioritized:
            # Stratified: one uniform draw in each of batch_size equal slices of the total priority mass.
            total = self.tree.total
            values = (np.arange(batch_size) + self._rng.random(batch_size)) * (total / batch_size)
            indices, priorities = self.locate(values)
            weights = (live * priorities / total) ** -self._beta
            weights /= weights.max()
        else:
            indices = self._rng.integers(self._oldest_transition, self._next_transition, size=batch_size)
            weights = np.ones(batch_size)

        batch = self.transitions(indices)
        batch["weights"] = weights.astype(np.float32)
        return batch

    def transitions(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The stored transitions numbered `indices` (absolute, live), as a learn step sees them.

        With `n_step` n > 1 each sample looks ahead up to n - 1 more transitions of its episode: `reward` is
        sum_k gamma^k r_(t+k) over the m <= n steps up to the episode's end (or the newest stored step, for an
        episode still running), `next_*` is the state after step t + m - 1, and `discount` is gamma^m, or 0
        when that last step terminated the episode. A truncated episode bootstraps from the last state it
        reached. With n = 1 this is the plain transition and discount = gamma (1 - terminated).
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        oldest, end = self._oldest_transition, self._next_transition
        if indices.size and (indices.min() < oldest or indices.max() >= end):
            raise ValueError(
                f"transition numbers must be live, in [{self._oldest_transition}, {self._next_transition})"
            )
        slots = indices % self.capacity
        steps_ahead = np.arange(self.n_step)
        window = indices[:, None] + steps_ahead  # (B, n) absolute transition numbers t .. t + n - 1
        window_slots = window % self.capacity
        ended = self.terminated[window_slots] | self.truncated[window_slots]
        # Step k belongs to the return while it is stored and no earlier step of the window ended an episode.
        ended_before = (np.cumsum(ended, axis=1) - ended) > 0
        inside = (window < self._next_transition) & ~ended_before
        count = inside.sum(axis=1)  # m >= 1: step t itself is always stored
        gammas = self.discount_factor**steps_ahead
        returns = (np.where(inside, self.rewards[window_slots], 0.0) * gammas).sum(axis=1)
        last = window_slots[np.arange(len(indices)), count - 1]
        discount = np.where(self.terminated[last], 0.0, self.discount_factor**count)

        stack = self.frame_index[slots][:, None] + self._stack_offsets  # frame numbers p - stack + 1 .. p
        next_stack = (self.frame_index[last][:, None] + 1 + self._stack_offsets) % self.frame_capacity
        stack %= self.frame_capacity
        return {
            "frames": self.frames.take(stack, axis=0),
            "car": self.car[stack[:, -1]],  # the newest frame's car floats
            "action": self.actions[slots].astype(np.int64),
            "reward": returns.astype(np.float32),
            "next_frames": self.frames.take(next_stack, axis=0),
            "next_car": self.car[next_stack[:, -1]],
            "terminated": self.terminated[slots].astype(np.float32),
            "truncated": self.truncated[slots].astype(np.float32),
            # What the target multiplies the bootstrap state's value by: gamma^m, 0 after a termination.
            "discount": discount.astype(np.float32),
            "steps": count.astype(np.int64),
            "weights": np.ones(len(indices), np.float32),
            "indices": indices,
        }

    def advance_beta(self) -> None:
        """One learn step's worth of beta annealing toward 1 (the agent calls it for each applied step)."""
        self._beta = min(1.0, self._beta + self.beta_increment)

    def reseed(self, seed: int) -> None:
        """A new sampling stream (after a rollback, the restored stream would repeat the same draws)."""
        self._rng = np.random.default_rng(seed)

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        """Set priorities (|td| + epsilon) ** alpha for sampled `indices`; evicted ones are skipped."""
        if not self.prioritized:
            return
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        raw = np.abs(np.asarray(td_errors, dtype=np.float64).reshape(-1)) + self.priority_epsilon
        if indices.shape != raw.shape:
            raise ValueError(f"{indices.size} indices but {raw.size} td errors")
        if not np.all(np.isfinite(raw)):
            raise ValueError("td errors must be finite (a NaN or inf priority would poison the sum tree)")
        live = (indices >= self._oldest_transition) & (indices < self._next_transition)
        if not live.any():
            return
        raw = raw[live]
        self.tree.update(indices[live] % self.capacity, raw**self.alpha)
        self._max_priority = max(self._max_priority, float(raw.max()))

    # --- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly. The arrays are views of the live storage, not copies:
        serialise the dict before the next `add`, `sample` or `update_priorities`. Rings are written from
        slot 0 on, so until a ring wraps only its written rows are included (a young run's checkpoint is
        small; a full 100k memory is ~440 MB)."""
        frames_written = min(self._next_frame, self.frame_capacity)
        transitions_written = min(self._next_transition, self.capacity)
        return {
            "version": STATE_VERSION,
            "capacity": self.capacity,
            "frame_capacity": self.frame_capacity,
            "frame_shape": self.frame_shape,
            "stack": self.stack,
            "car_dim": self.car_dim,
            "alpha": self.alpha,
            "beta_increment": self.beta_increment,
            "priority_epsilon": self.priority_epsilon,
            "prioritized": self.prioritized,
            "frames": self.frames[:frames_written],
            "car": self.car[:frames_written],
            "frame_index": self.frame_index[:transitions_written],
            "actions": self.actions[:transitions_written],
            "rewards": self.rewards[:transitions_written],
            "terminated": self.terminated[:transitions_written],
            "truncated": self.truncated[:transitions_written],
            "tree": self.tree._nodes,
            "next_transition": self._next_transition,
            "oldest_transition": self._oldest_transition,
            "next_frame": self._next_frame,
            "episode_open": self._episode_open,
            "beta": self._beta,
            "max_priority": self._max_priority,
            "rng_state": copy.deepcopy(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output exactly (storage, counters, beta, max priority, generator).

        Raises ValueError if the state was saved by a memory of another shape. alpha must match too, since
        the stored priorities were raised to it; beta_increment and priority_epsilon come from this memory's
        own (current) settings. Call `check_consistency()` afterwards to verify the invariants.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"replay state version {state.get('version')!r} is not {STATE_VERSION}")
        missing = [key for key in self.state_dict() if key not in state]
        if missing:
            raise ValueError(f"replay state is missing {', '.join(missing)}")
        structure = {
            "capacity": self.capacity,
            "frame_capacity": self.frame_capacity,
            "frame_shape": self.frame_shape,
            "stack": self.stack,
            "car_dim": self.car_dim,
            "alpha": self.alpha,
        }
        for key, expected in structure.items():
            saved = tuple(state[key]) if key == "frame_shape" else state[key]
            if saved != expected:
                raise ValueError(f"replay state has {key}={saved!r} but this memory has {key}={expected!r}")
        arrays = {
            "frames": self.frames,
            "car": self.car,
            "frame_index": self.frame_index,
            "actions": self.actions,
            "rewards": self.rewards,
            "terminated": self.terminated,
            "truncated": self.truncated,
            "tree": self.tree._nodes,
        }
        for key, target in arrays.items():
            saved = np.asarray(state[key])
            # A ring that has not wrapped yet is saved up to its written rows (see state_dict).
            fits = saved.shape[1:] == target.shape[1:] and saved.shape[0] <= target.shape[0]
            if not fits or saved.dtype != target.dtype or (key == "tree" and saved.shape != target.shape):
                raise ValueError(
                    f"replay state array {key!r} is {saved.dtype}{saved.shape}, "
                    f"expected {target.dtype}{target.shape}"
                )
        for key, target in arrays.items():
            saved = np.asarray(state[key])
            target[: len(saved)] = saved
            target[len(saved) :] = 0
        self._next_transition = int(state["next_transition"])
        self._oldest_transition = int(state["oldest_transition"])
        self._next_frame = int(state["next_frame"])
        self._episode_open = bool(state["episode_open"])
        self._beta = float(state["beta"])
        self._max_priority = float(state["max_priority"])
        self._rng.bit_generator.state = copy.deepcopy(state["rng_state"])

    def check_consistency(self) -> None:
        """Raise ValueError (one line) if an internal invariant is broken, e.g. after loading a checkpoint."""
        oldest, added, live = self._oldest_transition, self._next_transition, len(self)
        if not 0 <= oldest <= added or live > self.capacity:
            raise ValueError(
                f"replay counters are broken: oldest={oldest}, added={added}, capacity={self.capacity}"
            )
        nodes = self.tree._nodes
        if not np.all(np.isfinite(nodes)) or nodes.min() < 0:
            raise ValueError("replay sum tree holds a negative or non-finite priority")
        parents = np.arange(1, self.tree.leaf_offset)
        if not np.array_equal(nodes[parents], nodes[2 * parents] + nodes[2 * parents + 1]):
            raise ValueError(
                "replay sum tree is inconsistent: an internal node differs from the sum of its children"
            )
        leaves = self.tree.leaf_priorities
        if nodes[self.tree.leaf_offset + self.capacity :].any():
            raise ValueError("replay sum tree has priority on a padding leaf")
        live_slots = np.arange(oldest, added) % self.capacity
        nonzero = int(np.count_nonzero(leaves))
        if nonzero != live or not np.all(leaves[live_slots] > 0):
            raise ValueError(f"replay has {live} live transitions but {nonzero} non-zero priorities")
        if live:
            newest = self.frame_index[live_slots]
            if np.any(np.diff(newest) <= 0):
                raise ValueError("replay frame references do not increase with transition age")
            if (
                newest[0] - self.stack + 1 < self._next_frame - self.frame_capacity
                or newest[-1] + 1 >= self._next_frame
            ):
                raise ValueError(
                    f"replay frame references [{newest[0] - self.stack + 1}, {newest[-1] + 1}] fall outside "
                    f"the stored frames [{self._next_frame - self.frame_capacity}, {self._next_frame - 1}]"
                )


class DemoReplay:
    """The agent's own replay memory beside a part that holds demonstrations (issue 17: DQfD's replay).

    The demonstration part is a PrioritizedReplay sized to hold every demonstration transition, filled once
    before training and never written again, so nothing in it is ever evicted. Sampling is proportional over
    both parts' priority mass (one stratified draw per batch slot); a demonstration's priority carries the
    bonus `demo_bonus` (|delta| + epsilon + bonus)^alpha, a fixed share DQfD found to keep them drawn. Each
    sample is tagged `is_demo`.

    Statistics that weight samples within a batch are computed within each source, never across the mixed
    batch (seed 002: expert-normalised weights starved the agent's own data): the importance weights
    (N P)^-beta, with N and P over the whole memory, are divided by the largest weight of their own source
    in the batch. Agent transitions keep their absolute numbers (>= 0); demonstration d is numbered -(d + 1).
    """

    def __init__(self, own: PrioritizedReplay, demos: PrioritizedReplay, seed: int = 0) -> None:
        if own.prioritized != demos.prioritized or own.n_step != demos.n_step:
            raise ValueError("the agent's and the demonstrations' memories must sample alike")
        self.own, self.demos = own, demos
        self.prioritized = own.prioritized
        self._beta = own.beta
        self.beta_increment = own.beta_increment
        self._rng = np.random.default_rng(seed)

    # the agent's part, as the loop and the learner see a plain memory -----------------------------------
    def __len__(self) -> int:
        return len(self.own)

    @property
    def transitions_added(self) -> int:
        return self.own.transitions_added

    @property
    def max_priority(self) -> float:
        return self.own.max_priority

    @property
    def rewards(self) -> np.ndarray:
        return self.own.rewards

    @property
    def beta(self) -> float:
        return self._beta

    @property
    def nbytes(self) -> int:
        return self.own.nbytes + self.demos.nbytes

    def start_episode(self, frames: np.ndarray, car: np.ndarray) -> None:
        self.own.start_episode(frames, car)

    def add(self, *transition: Any) -> None:
        self.own.add(*transition)

    def advance_beta(self) -> None:
        self._beta = min(1.0, self._beta + self.beta_increment)

    def reseed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    # both parts -----------------------------------------------------------------------------------------
    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        own_live, demo_live = len(self.own), len(self.demos)
        live = own_live + demo_live
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.prioritized:
            own_total = self.own.tree.total if own_live else 0.0
            total = own_total + self.demos.tree.total
            values = (np.arange(batch_size) + self._rng.random(batch_size)) * (total / batch_size)
            is_demo = values >= own_total
            indices = np.empty(batch_size, dtype=np.int64)
            priorities = np.empty(batch_size)
            if (~is_demo).any():
                indices[~is_demo], priorities[~is_demo] = self.own.locate(values[~is_demo])
            if is_demo.any():
                numbers, priorities[is_demo] = self.demos.locate(values[is_demo] - own_total)
                indices[is_demo] = -(numbers + 1)
            weights = (live * priorities / total) ** -self._beta
        else:
            draws = self._rng.integers(0, live, size=batch_size)
            is_demo = draws >= own_live
            indices = np.where(is_demo, -(draws - own_live + 1), self.own._oldest_transition + draws)
            weights = np.ones(batch_size)
        for source in (is_demo, ~is_demo):  # normalised within each source (class docstring)
            if source.any():
                weights[source] /= weights[source].max()
        batch = self.transitions(indices)
        batch["weights"] = weights.astype(np.float32)
        return batch

    def transitions(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        is_demo = indices < 0
        parts = []
        if (~is_demo).any():
            parts.append((~is_demo, self.own.transitions(indices[~is_demo])))
        if is_demo.any():
            parts.append((is_demo, self.demos.transitions(-indices[is_demo] - 1)))
        batch = {}
        for key, value in parts[0][1].items():
            batch[key] = np.empty((len(indices), *value.shape[1:]), dtype=value.dtype)
        for mask, part in parts:
            for key, value in part.items():
                batch[key][mask] = value
        batch["indices"] = indices
        batch["is_demo"] = is_demo.astype(np.float32)
        return batch

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        td_errors = np.asarray(td_errors, dtype=np.float64).reshape(-1)
        is_demo = indices < 0
        self.own.update_priorities(indices[~is_demo], td_errors[~is_demo])
        self.demos.update_priorities(-indices[is_demo] - 1, td_errors[is_demo])

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "kind": "with_demonstrations",
            "own": self.own.state_dict(),
            "demos": self.demos.state_dict(),
            "beta": self._beta,
            "rng_state": copy.deepcopy(self._rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "with_demonstrations":
            raise ValueError("the checkpoint's replay memory holds no demonstration part")
        self.own.load_state_dict(state["own"])
        self.demos.load_state_dict(state["demos"])
        self._beta = float(state["beta"])
        self._rng.bit_generator.state = copy.deepcopy(state["rng_state"])

    def check_consistency(self) -> None:
        self.own.check_consistency()
        self.demos.check_consistency()
