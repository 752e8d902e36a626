"""learner.py: the engine's pinned schedule, its checkpoints, the inline driver, on the CPU and the GPU (the
engine in a process of its own: test_beside.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_config

from learner import InlineDriver, LearnerSpec
from tm_config import Config

SCHEDULE_WHY = "the pinned replay ratio: one learn step per stored environment step, never ahead of the data"


def spec_for(tmp_path: Path, config: Config, **changes: object) -> LearnerSpec:
    values = dict(
        config=config.to_dict(),
        overrides=[],
        run_dir=str(tmp_path / "run"),
        resume=False,
        require_checkpoint=False,
        seed=0,
        device="cpu",
        threads=1,
    )
    values.update(changes)
    return LearnerSpec(**values)


def frames_and_car(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, (4, 64, 64), dtype=np.uint8), rng.random(3).astype(np.float32) * 100


def steps(rng: np.random.Generator, count: int, episode_length: int = 25):
    """(message kind, payload) of `count` environment steps in episodes of `episode_length`."""
    for t in range(count):
        if t % episode_length == 0:
            yield ("episode", *frames_and_car(rng))
        frame = rng.integers(0, 256, (64, 64), dtype=np.uint8)
        ends = (t + 1) % episode_length == 0
        yield (
            "step",
            int(rng.integers(11)),
            float(rng.random()),
            False,
            ends,
            frame,
            rng.random(3).astype(np.float32),
        )


def hand_over(learner, messages) -> None:
    """Give the learner each (kind, payload) of `steps` as the actor's loop would."""
    for message in messages:
        if message[0] == "episode":
            learner.start_episode(*message[1:])
        else:
            learner.add(*message[1:])


def test_the_engine_learns_one_step_per_stored_step_and_never_ahead(tmp_path):
    config = small_config()
    driver = InlineDriver(spec_for(tmp_path, config))
    driver.open()
    engine = driver.engine
    stored, metrics = 0, []
    rng = np.random.default_rng(0)
    for message in steps(rng, 120):
        hand_over(driver, [message])
        if message[0] != "step":
            continue
        stored += 1
        metrics += driver.learn()
        assert engine.agent.learn_steps == max(0, stored - config.batch_size + 1), SCHEDULE_WHY
        assert not driver.learn(), f"learned ahead of the data at stored step {stored}: {SCHEDULE_WHY}"
    # Steps that arrive in bulk (as beside the actor) are learned one per step as well, and no more.
    hand_over(driver, steps(rng, 60))
    metrics += driver.sync()
    assert engine.agent.learn_steps == 180 - config.batch_size + 1, SCHEDULE_WHY
    assert [m["learn_step"] for m in metrics] == list(range(1, 180 - config.batch_size + 2))
    assert [m["env_step"] for m in metrics] == [
        k + config.batch_size - 1 for k in range(1, len(metrics) + 1)
    ], "each learn step names the environment step it belongs to (where the inline loop runs it)"


def test_the_inline_driver_is_the_same_engine_without_a_process(tmp_path):
    config = small_config()
    driver = InlineDriver(spec_for(tmp_path, config))
    driver.open()
    assert driver.actor.agent is driver.engine.agent, "inline, the actor is the engine's own agent"
    for message in steps(np.random.default_rng(4), 40):
        hand_over(driver, [message])
        if message[0] == "step":
            driver.learn()
    assert driver.lag == 0 and driver.engine.agent.learn_steps == 40 - config.batch_size + 1


def test_demonstrations_sit_beside_the_agents_data_with_their_bonus_and_never_leave(tmp_path):
    """A learner with demonstrations: a part of its own, filled once, drawn with DQfD's bonus; pretraining
    steps first, then one learn step per environment step as ever."""
    from test_demos import episode

    from demos import DemoWriter

    writer = DemoWriter(tmp_path / "demos" / "laps", "embedded", "scripted")
    for seed in range(2):
        writer.write(episode(30, seed=seed))
    config = small_config(demos="laps", demo_pretrain_steps=10, max_buffer_size=64)
    driver = InlineDriver(spec_for(tmp_path, config, demo_root=str(tmp_path / "demos")))
    info = driver.open()
    assert "demonstrations: 2 episodes, 60 transitions from laps" in " ".join(info["notes"])
    engine = driver.engine
    replay = engine.replay
    assert replay.demos.priority_epsilon == pytest.approx(
        config.priority_epsilon + config.demo_priority_bonus
    ), "a demonstration's priority carries the DQfD bonus"
    assert replay.own.priority_epsilon == config.priority_epsilon, (
        "the agent's own transitions must not get the demonstrations' bonus (issue 25)"
    )
    assert engine.learn_target == 10, "pretraining steps are due before any environment step"
    pretraining = driver.sync()
    assert engine.agent.learn_steps == 10
    assert all(m["demo_share"] == 1.0 for m in pretraining), "pretraining draws demonstrations only"
    later = []
    for message in steps(np.random.default_rng(5), 300):  # the agent's 64-slot ring wraps many times
        hand_over(driver, [message])
        later += driver.learn()
    assert engine.agent.learn_steps == 10 + 300 - config.batch_size + 1, SCHEDULE_WHY
    assert len(replay.demos) == 60 and len(replay) == 64, "demonstrations are never evicted"
    replay.check_consistency()
    assert 0 < np.mean([m["demo_share"] for m in later]) < 1, "both sources are drawn"
    newest = replay.own.transitions_added - 1
    replay.own.update_priorities(np.array([newest]), np.array([0.5]))
    leaf = replay.own.tree.leaf_priorities[newest % replay.own.capacity]
    assert leaf == pytest.approx((0.5 + config.priority_epsilon) ** config.alpha), "own priority: no bonus"


# --- the learner on the GPU (run where CUDA is; skipped elsewhere) ---------------------------------------
GPU = os.environ.get("RAINBOW_TM_TEST_GPU", "cuda")  # "cpu" runs these against the CPU, to check the tests
needs_gpu = pytest.mark.skipif(
    GPU == "cuda" and not torch.cuda.is_available(),
    reason="no CUDA device here (bench/gpu_check.py on a GPU)",
)


def draw_noise_on_the_cpu(agent, seed: int) -> None:
    """Make an agent's noise and quantile fractions come from one CPU stream, whatever its device: CPU and
    CUDA generators give different numbers from one seed, and the comparison is of the arithmetic."""
    generator = torch.Generator().manual_seed(seed)

    def noise(net, _generator=None):
        for module in net.modules():
            if hasattr(module, "epsilon_in"):
                for buffer in (module.epsilon_in, module.epsilon_out):
                    x = torch.randn(buffer.shape, generator=generator)
                    buffer.copy_(torch.copysign(x.abs().sqrt(), x))

    for net in (agent.online, agent.target):
        net.reset_noise = lambda _generator=None, net=net: noise(net)
    agent._quantile_fractions = lambda rows, count: torch.rand(rows, count, generator=generator).to(
        agent.device
    )


@needs_gpu
def test_on_the_gpu_learn_steps_agree_with_the_cpus_from_the_same_state():
    """20 learn steps from the same weights, batches and draws: the losses agree within 2% and the weights
    within 1e-3 (cuDNN's TF32 convolutions round differently from the CPU's float32)."""
    from conftest import fill_replay

    from rainbow import RainbowAgent
    from replay import PrioritizedReplay

    config = small_config()
    agents = []
    for device in ("cpu", GPU):
        replay = PrioritizedReplay.from_config(config, seed=0)
        fill_replay(replay, 200, seed=0)
        agents.append(RainbowAgent(config, replay, device=device, seed=0))
        draw_noise_on_the_cpu(agents[-1], seed=1)
    cpu, gpu = agents
    gpu.online.load_state_dict(cpu.online.state_dict())
    gpu.target.load_state_dict(cpu.target.state_dict())
    for step in range(20):
        cpu_loss, gpu_loss = cpu.train()["loss"], gpu.train()["loss"]
        assert gpu_loss == pytest.approx(cpu_loss, rel=0.02, abs=1e-4), f"learn step {step}"
    for name, value in cpu.online.state_dict().items():
        torch.testing.assert_close(gpu.online.state_dict()[name].cpu(), value, rtol=1e-2, atol=1e-3, msg=name)


@needs_gpu
def test_a_checkpoint_made_on_the_gpu_resumes_on_the_cpu_and_back(tmp_path):
    config = small_config()
    rng = np.random.default_rng(5)
    run = {"step": 0, "episode": 0, "best_interval_reward": 0.0, "python_rng": None, "numpy_rng": None}
    for round_, device in enumerate((GPU, "cpu", GPU)):
        learner = InlineDriver(spec_for(tmp_path, config, device=device, resume=round_ > 0))
        info = learner.open()
        assert (info["run"] or {}).get("step", 0) == run["step"], f"round {round_} on {device}"
        assert learner.engine.agent.learn_steps == max(0, run["step"] - config.batch_size + 1)
        for message in steps(rng, 50):
            if message[0] == "episode":
                learner.start_episode(*message[1:])
            else:
                learner.add(*message[1:])
                assert all(np.isfinite(m["loss"]) for m in learner.learn())
        run = {**run, "step": run["step"] + 50, "episode": run["episode"] + 2}
        assert learner.save(run, periodic=False, is_best=False)[0]
