"""rainbow.py against the math: loss, targets, noise, BatchNorm modes, schedules, checkpoints."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import fill_replay, small_config

from rainbow import (
    ACTION_VECTORS,
    CUDA_TORCH_INSTALL,
    DeviceError,
    IQNNetwork,
    NoisyLinear,
    RainbowAgent,
    action_vector,
    epsilon_at,
    quantile_huber_loss,
    resolve_device,
    unused_gpu_notice,
)
from replay import PrioritizedReplay
from tm_config import ACTIONS, Config


def make_agent(config: Config, transitions: int = 200, seed: int = 0) -> RainbowAgent:
    replay = PrioritizedReplay.from_config(config, seed=seed)
    fill_replay(replay, transitions, seed=seed)
    return RainbowAgent(config, replay, device="cpu", seed=seed)


def sample_inputs(batch: int = 3, n_taus: int = 5, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (batch, 4, 64, 64), dtype=torch.uint8, generator=generator)
    car = torch.tensor([[120.0, 3.0, 6000.0]] * batch)
    taus = torch.rand(batch, n_taus, generator=generator)
    return frames, car, taus


# --- loss --------------------------------------------------------------------------------------------
def test_quantile_huber_loss_matches_hand_computed_value():
    # quantiles 0 and 1 at taus 0.25 and 0.75; targets 0.5 and 3.0; kappa 1.
    # delta_ij = target_j - quantile_i: [[0.5, 3.0], [-0.5, 2.0]]
    # Huber: [[0.125, 2.5], [0.125, 1.5]];  |tau_i - 1{delta<0}|: [[0.25, 0.25], [0.25, 0.75]]
    # rho: [[0.03125, 0.625], [0.03125, 1.125]] -> sum over i: [0.0625, 1.75] -> mean over j: 0.90625
    loss, abs_delta = quantile_huber_loss(
        torch.tensor([[0.0, 1.0]]), torch.tensor([[0.25, 0.75]]), torch.tensor([[0.5, 3.0]]), kappa=1.0
    )
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(0.90625)
    assert abs_delta.mean().item() == pytest.approx((0.5 + 3.0 + 0.5 + 2.0) / 4)


def test_quantile_huber_loss_is_linear_beyond_kappa():
    # |delta| = 4 > kappa = 2: Huber = 2 * (4 - 1) = 6, divided by kappa = 3, weight |0.5 - 0| = 0.5 -> 1.5
    loss, _ = quantile_huber_loss(
        torch.tensor([[0.0]]), torch.tensor([[0.5]]), torch.tensor([[4.0]]), kappa=2.0
    )
    assert loss.item() == pytest.approx(1.5)


def test_loss_gradient_pushes_quantile_toward_its_tau():
    # For tau = 0.9 and a target above the quantile, the gradient must raise the quantile 9x harder than
    # a target equally far below lowers it: the asymmetry that makes it a quantile, not a mean.
    quantile = torch.tensor([[0.0]], requires_grad=True)
    above, _ = quantile_huber_loss(quantile, torch.tensor([[0.9]]), torch.tensor([[5.0]]), kappa=1.0)
    (grad_above,) = torch.autograd.grad(above.sum(), quantile)
    below, _ = quantile_huber_loss(quantile, torch.tensor([[0.9]]), torch.tensor([[-5.0]]), kappa=1.0)
    (grad_below,) = torch.autograd.grad(below.sum(), quantile)
    assert grad_above.item() == pytest.approx(-0.9)
    assert grad_below.item() == pytest.approx(0.1)


# --- network -----------------------------------------------------------------------------------------
def test_network_shapes_and_unbounded_dueling_head():
    net = IQNNetwork(Config())
    frames, car, taus = sample_inputs(batch=2, n_taus=8)
    out = net(frames, car, taus)
    assert out.shape == (2, 8, len(ACTIONS))
    # No tanh or other squashing after the heads (seed 000): shifting the value bias shifts Q exactly.
    with torch.no_grad():
        before = net(frames, car, taus)
        net.value_out.bias_mu += 1000.0
        after = net(frames, car, taus)
    torch.testing.assert_close(after - before, torch.full_like(before, 1000.0))


def test_dueling_aggregation_advantages_average_to_zero():
    net = IQNNetwork(Config())
    net.eval()
    frames, car, taus = sample_inputs()
    captured = {}
    net.value_out.register_forward_hook(lambda module, inputs, output: captured.update(value=output))
    q = net(frames, car, taus)
    # Q = V + A - mean(A)  =>  mean over actions of Q equals V.
    torch.testing.assert_close(q.mean(dim=-1, keepdim=True), captured["value"], rtol=1e-5, atol=1e-5)


def test_without_dueling_there_is_a_single_head():
    net = IQNNetwork(Config().with_overrides(use_dueling=False))
    assert not hasattr(net, "value_out")
    frames, car, taus = sample_inputs()
    assert net(frames, car, taus).shape == (3, 5, len(ACTIONS))


def test_no_output_layer_is_initialised_to_zero():
    net = IQNNetwork(Config())
    for name, param in net.named_parameters():
        if param.dim() >= 1 and name.endswith(("weight", "weight_mu")):
            assert param.abs().sum() > 0, f"{name} is all zeros: a dead layer cannot learn (seed 003)"
    frames, car, taus = sample_inputs()
    q = net(frames, car, taus).mean(dim=1)
    assert q.std(dim=1).min() > 0, "initial Q must already differ between actions"


def test_conv_stack_has_a_nonlinearity_between_every_pair_of_convs():
    layers = list(IQNNetwork(Config()).conv)
    conv_positions = [i for i, layer in enumerate(layers) if isinstance(layer, torch.nn.Conv2d)]
    assert len(conv_positions) == 4
    for start, end in zip(conv_positions, conv_positions[1:], strict=False):
        between = layers[start + 1 : end]
        assert any(isinstance(layer, torch.nn.ReLU) for layer in between), f"no activation after conv {start}"


def test_car_floats_are_divided_by_the_documented_scales():
    config = Config()
    net = IQNNetwork(config)
    seen = {}
    net.car.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    frames, car, taus = sample_inputs(batch=1)
    net(frames, car, taus)
    expected = car / torch.tensor([config.speed_scale, config.gear_scale, config.rpm_scale])
    torch.testing.assert_close(seen["x"], expected)
    assert seen["x"].abs().max() <= 1.0


def test_previous_actions_widen_the_car_input_and_pass_unscaled():
    config = small_config(previous_actions=2)
    net = IQNNetwork(config)
    assert net.car[0].in_features == 3 + 6, "speed, gear, rpm and two [gas, brake, steer] vectors"
    seen = {}
    net.car.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    frames, _, taus = sample_inputs(batch=1)
    car = torch.tensor([[120.0, 3.0, 6000.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.3]])
    net(frames, car, taus)
    expected = torch.tensor([[0.12, 0.5, 0.6, 1.0, 0.0, -1.0, 0.0, 1.0, 0.3]])
    torch.testing.assert_close(seen["x"], expected, msg="actions are fed as they are; car floats are scaled")


# --- noise ---------------------------------------------------------------------------------------
NOISE_WHY = (
    "(original-code.md defect 1: the reference's reset reached no NoisyLinear, so one noise draw was kept "
    "for the whole run and every hard copy gave the target the same frozen noise)"
)


def test_noise_changes_between_resets_and_is_off_when_disabled():
    torch.manual_seed(0)
    layer = NoisyLinear(6, 4, std_init=0.5)
    x = torch.randn(2, 6)
    first = layer(x)
    layer.reset_noise()
    second = layer(x)
    assert not torch.allclose(first, second), f"reset_noise() must draw new noise {NOISE_WHY}"
    # The noise is factorised: the weight perturbation is the outer product f(eps_out) f(eps_in)^T.
    eps = torch.outer(layer.epsilon_out, layer.epsilon_in)
    manual = (
        x @ (layer.weight_mu + layer.weight_sigma * eps).T
        + layer.bias_mu
        + layer.bias_sigma * layer.epsilon_out
    )
    torch.testing.assert_close(
        second, manual, msg="NoisyLinear must apply factorised noise mu + sigma * f(eps_out) f(eps_in)^T"
    )
    layer.noise_enabled = False
    quiet = layer(x)
    layer.reset_noise()
    torch.testing.assert_close(quiet, layer(x), msg="with noise off a reset must not change the output")
    torch.testing.assert_close(
        quiet, x @ layer.weight_mu.T + layer.bias_mu, msg="with noise off the layer is its mean weights"
    )


def test_every_learn_step_resamples_online_noise_and_target_noise():
    agent = make_agent(small_config())

    def noise(net):
        return [(layer.epsilon_in.clone(), layer.epsilon_out.clone()) for layer in net.noisy_layers()]

    online_before, target_before = noise(agent.online), noise(agent.target)
    agent.train()
    for (eps_in, eps_out), (new_in, new_out) in zip(online_before, noise(agent.online), strict=True):
        assert not torch.equal(eps_in, new_in) and not torch.equal(eps_out, new_out), (
            f"a learn step must redraw the online net's noise {NOISE_WHY}"
        )
    for (eps_in, eps_out), (new_in, new_out) in zip(target_before, noise(agent.target), strict=True):
        assert not torch.equal(eps_in, new_in) and not torch.equal(eps_out, new_out), (
            f"a learn step must redraw the target net's noise (a hard copy keeps one draw) {NOISE_WHY}"
        )


def test_set_noise_false_gives_a_deterministic_greedy_policy():
    agent = make_agent(small_config(n_tau_action=64))
    agent.online.set_noise(False)
    frames = np.full((4, 64, 64), 100, np.uint8)
    car = np.array([50.0, 2.0, 3000.0], np.float32)
    actions = set()
    for _ in range(5):
        agent.online.reset_noise()
        actions.add(agent.greedy_action(frames, car))
    assert len(actions) == 1, f"with noise off the greedy policy must not depend on noise draws: {actions}"


# --- BatchNorm modes -------------------------------------------------------------------------------
def test_acting_uses_running_statistics_and_does_not_update_them():
    agent = make_agent(small_config())
    bn = agent.online.conv[1]
    stats_before = bn.running_mean.clone()
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    agent.greedy_action(frames, np.zeros(3, np.float32))
    assert not agent.online.training, "acting must leave the online net in eval mode (original-code.md 3)"
    torch.testing.assert_close(
        bn.running_mean, stats_before, msg="acting updated BatchNorm statistics with a single frame"
    )


def test_target_net_statistics_stay_frozen_between_hard_copies():
    agent = make_agent(small_config())
    target_state = {k: v.clone() for k, v in agent.target.state_dict().items() if "running" in k}
    online_bn = agent.online.conv[1].running_mean.clone()
    for _ in range(5):
        agent.train()
    for key, value in target_state.items():
        torch.testing.assert_close(
            agent.target.state_dict()[key], value, msg=f"target BatchNorm {key} moved between hard copies"
        )
    assert not torch.equal(agent.online.conv[1].running_mean, online_bn), "online BatchNorm should learn"


# --- targets -------------------------------------------------------------------------------------
def _rigged_agent(use_double: bool) -> tuple[RainbowAgent, dict[str, torch.Tensor]]:
    """Online net prefers action 3 and target net prefers action 5 on every state (noise off, flat taus)."""
    config = small_config(use_doubleDQN=use_double, noisy_std=0.0)
    agent = make_agent(config)
    with torch.no_grad():
        agent.online.advantage_out.bias_mu[3] += 100.0
        agent.target.advantage_out.bias_mu[5] += 100.0
        agent.target.advantage_out.bias_mu[3] += 40.0
    batch = {
        k: torch.as_tensor(v) for k, v in agent.replay.sample(config.batch_size).items() if k != "indices"
    }
    return agent, batch


def test_double_dqn_target_uses_the_online_argmax_and_the_target_value():
    agent, batch = _rigged_agent(use_double=True)
    targets, next_action = agent.td_targets(batch)
    assert next_action.tolist() == [3] * len(next_action), "Double DQN: the online net chooses the action"
    # Recompute by hand: r + discount * Q_target(s', 3) at the same taus, discount = gamma (1 - terminated).
    agent.learn_generator.manual_seed(123)
    targets, _ = agent.td_targets(batch)
    agent.learn_generator.manual_seed(123)  # the learn step's own stream: the same draws again
    agent.target.reset_noise(agent.learn_generator)
    taus = torch.rand(len(next_action), agent.config.n_tau_train, generator=agent.learn_generator)
    q_next = agent.target(batch["next_frames"], batch["next_car"], taus)[:, :, 3]
    torch.testing.assert_close(batch["discount"], 0.997 * (1 - batch["terminated"]))
    expected = batch["reward"][:, None] + 0.997 * (1 - batch["terminated"][:, None]) * q_next
    torch.testing.assert_close(
        targets, expected, msg="target != r + gamma (1 - terminated) Q_target(s', a*): gamma applied once"
    )


def test_without_double_dqn_the_target_net_chooses():
    agent, batch = _rigged_agent(use_double=False)
    _, next_action = agent.td_targets(batch)
    assert next_action.tolist() == [5] * len(next_action), "without Double DQN the target net chooses"


def test_truncation_bootstraps_and_termination_does_not():
    # Four one-step episodes through the replay: terminated, truncated, terminated, truncated.
    config = small_config(noisy_std=0.0, batch_size=4, alpha=0.0)
    replay = PrioritizedReplay.from_config(config, seed=0)
    rng = np.random.default_rng(0)
    for reward, terminated in [(1.0, True), (1.0, False), (2.0, True), (2.0, False)]:
        replay.start_episode(rng.integers(0, 256, (4, 64, 64), dtype=np.uint8), np.zeros(3, np.float32))
        next_frame = rng.integers(0, 256, (64, 64), dtype=np.uint8)
        replay.add(0, reward, terminated, not terminated, next_frame, np.ones(3, np.float32))
    sampled = replay.sample(4)
    order = np.argsort(sampled["indices"])
    batch = {k: torch.as_tensor(v[order]) for k, v in sampled.items() if k != "indices"}
    assert batch["discount"].tolist() == pytest.approx([0.0, 0.997, 0.0, 0.997]), (
        "a terminated transition must not bootstrap, a truncated one (time limit) must"
    )
    agent = RainbowAgent(config, replay, seed=0)
    agent.learn_generator.manual_seed(7)
    targets, next_action = agent.td_targets(batch)
    agent.learn_generator.manual_seed(7)
    agent.target.reset_noise(agent.learn_generator)
    taus = torch.rand(4, config.n_tau_train, generator=agent.learn_generator)
    q_next = agent.target(batch["next_frames"], batch["next_car"], taus)
    q_next = q_next.gather(2, next_action.view(-1, 1, 1).expand(-1, config.n_tau_train, 1)).squeeze(2)
    torch.testing.assert_close(targets[0], torch.ones(config.n_tau_train))
    torch.testing.assert_close(targets[2], torch.full((config.n_tau_train,), 2.0))
    torch.testing.assert_close(targets[1], 1.0 + 0.997 * q_next[1])
    torch.testing.assert_close(targets[3], 2.0 + 0.997 * q_next[3])


# --- learning ------------------------------------------------------------------------------------
def test_train_returns_finite_metrics_and_updates_priorities():
    agent = make_agent(small_config())
    metrics = agent.train()
    expected_keys = {
        "loss", "grad_norm", "q_mean", "q_min", "q_max", "q_std", "target_q_mean", "target_q_max",
        "td_error_mean", "td_error_max", "max_priority", "beta", "learning_rate",
    }  # fmt: skip
    assert expected_keys <= metrics.keys()
    assert all(np.isfinite(metrics[k]) for k in expected_keys)
    assert metrics["grad_norm"] > 0, "the gradient norm is recorded, not discarded (seed 003)"
    assert metrics["q_min"] <= metrics["q_mean"] <= metrics["q_greedy"] <= metrics["q_max"]
    assert metrics["max_priority"] != 1.0, "priorities come from the TD errors"


def test_network_overfits_fixed_targets_with_an_unbounded_head():
    # Terminal transitions have targets equal to their rewards, so Q(s, a) must learn the rewards,
    # far outside any tanh range (seed 000).
    config = small_config(learning_rate=3e-3, batch_size=8, max_buffer_size=8, alpha=0.0, noisy_std=0.1)
    replay = PrioritizedReplay.from_config(config, seed=0)
    rng = np.random.default_rng(0)
    rewards = [5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0]
    for i, reward in enumerate(rewards):
        replay.start_episode(rng.integers(0, 256, (4, 64, 64), dtype=np.uint8), np.zeros(3, np.float32))
        next_frame = rng.integers(0, 256, (64, 64), dtype=np.uint8)
        replay.add(i % 11, reward, True, False, next_frame, np.ones(3, np.float32))
    agent = RainbowAgent(config, replay, seed=0)
    first = agent.train()["loss"]
    for _ in range(300):
        metrics = agent.train()
    assert metrics["loss"] < 0.1 * first
    assert metrics["q_max"] > 25.0


def test_non_finite_loss_is_skipped_and_never_reaches_the_weights():
    agent = make_agent(small_config())
    agent.train()
    weights = {k: v.detach().clone() for k, v in agent.online.named_parameters()}
    moments = {k: v["exp_avg"].clone() for k, v in agent.optimizer.state_dict()["state"].items()}
    original_sample = agent.replay.sample

    def poisoned(batch_size):
        batch = original_sample(batch_size)
        batch["reward"][0] = np.nan
        return batch

    agent.replay.sample = poisoned
    metrics = agent.train()
    assert metrics["skipped"] == 1.0 and agent.skipped_steps == 1 and agent.consecutive_skipped_steps == 1
    for key, value in agent.online.named_parameters():
        torch.testing.assert_close(value.detach(), weights[key], msg=f"{key} changed on a NaN step")
    for key, value in agent.optimizer.state_dict()["state"].items():
        torch.testing.assert_close(value["exp_avg"], moments[key])
    agent.replay.sample = original_sample
    assert agent.train()["skipped"] == 0.0 and agent.consecutive_skipped_steps == 0


# --- acting and schedules --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 1.0),
        (1_250_000, 0.505),
        (2_500_000, 0.01),
        (24_999_999, 0.01),
        (25_000_000, 0.0),
        (30_000_000, 0.0),
    ],
)
def test_epsilon_at_breakpoints(step, expected):
    assert epsilon_at(step, Config()) == pytest.approx(expected, abs=1e-12)


def test_epsilon_greedy_frequency_follows_epsilon():
    agent = make_agent(small_config())
    frames = np.zeros((4, 64, 64), np.uint8)
    car = np.zeros(3, np.float32)
    agent.online.set_noise(False)
    greedy = agent.greedy_action(frames, car)
    agent.config = small_config(n_tau_action=1)
    step = 1_250_000  # epsilon 0.505: random with p=0.505, and a random pick equals greedy 1/11 of the time
    n = 4000
    same = sum(agent.act(frames, car, step) == greedy for _ in range(n))
    expected = (1 - 0.505) + 0.505 / 11
    assert abs(same / n - expected) < 4 * np.sqrt(expected * (1 - expected) / n)
    assert agent.epsilon == pytest.approx(0.505)


def test_action_table_is_the_reference_table():
    assert ACTION_VECTORS.shape == (11, 3) and ACTION_VECTORS.dtype == np.float32
    assert action_vector(0).tolist() == [0, 0, 0]
    assert action_vector(3).tolist() == [1, 0, -1]
    assert action_vector(10).tolist() == [1, 1, 1]
    assert np.all(np.abs(ACTION_VECTORS) <= 1)


def test_device_resolution_and_one_line_device_errors(monkeypatch):
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(DeviceError, match="unknown --device 'tpu': use auto, cpu or cuda"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="--device mps .* is not supported: use --device cpu"):
        resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError) as error:
        resolve_device("cuda")
    message = str(error.value)
    assert "is a CPU build" in message and CUDA_TORCH_INSTALL in message and "\n" not in message
    # Forced: over torch 2.13.0+cpu, `pip install torch==2.13.0 --index-url ...` is "already satisfied".
    assert CUDA_TORCH_INSTALL.startswith("pip install --force-reinstall torch==2.13.0 --index-url https://")
    assert resolve_device("auto").type == "cpu"
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA build without a usable GPU: the driver
    with pytest.raises(DeviceError) as error:
        resolve_device("cuda")
    message = str(error.value)
    assert "(CUDA 12.8) finds no usable NVIDIA GPU/driver" in message and "NVIDIA driver" in message
    assert CUDA_TORCH_INSTALL not in message, "reinstalling the same CUDA build would not help"


def test_an_unused_nvidia_gpu_is_named_with_the_fix(monkeypatch):
    import shutil

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(
        shutil, "which", lambda name: "C:/Windows/System32/nvidia-smi.exe" if name == "nvidia-smi" else None
    )
    notice = unused_gpu_notice()
    assert notice is not None and "an NVIDIA GPU is present but torch" in notice and "a CPU build" in notice
    assert CUDA_TORCH_INSTALL in notice and "\n" not in notice
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    notice = unused_gpu_notice()
    assert "built for CUDA 12.8" in notice and "install or update the NVIDIA driver" in notice
    assert CUDA_TORCH_INSTALL not in notice
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert unused_gpu_notice() is None, "no NVIDIA driver: nothing to say"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(shutil, "which", lambda name: "nvidia-smi")
    assert unused_gpu_notice() is None, "torch uses the GPU: nothing to say"


# --- checkpoints -----------------------------------------------------------------------------------
def test_agent_checkpoint_round_trip_continues_identically():
    config = small_config()
    agent = make_agent(config)
    for _ in range(3):
        agent.train()
    agent.act(np.zeros((4, 64, 64), np.uint8), np.zeros(3, np.float32), step=1_000_000)
    # state_dict() holds live tensors, as torch's do: snapshot them as a file on disk would.
    state = copy.deepcopy(agent.state_dict())
    replay_state = copy.deepcopy(agent.replay.state_dict())
    frames = np.random.default_rng(1).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    car = np.array([80.0, 2.0, 4000.0], np.float32)
    original_actions = [agent.act(frames, car, 100) for _ in range(5)]
    original_metrics = agent.train()

    # A new process would start from other seeds: the checkpoint must restore every random stream.
    clone_replay = PrioritizedReplay.from_config(config, seed=99)
    clone_replay.load_state_dict(replay_state)
    clone = RainbowAgent(config, clone_replay, seed=99)
    clone.load_state_dict(state)

    assert clone.learn_steps == 3
    assert clone.epsilon == pytest.approx(epsilon_at(1_000_000, config))
    assert clone.replay.beta == pytest.approx(0.4 + 3 * 0.001)
    assert [clone.act(frames, car, 100) for _ in range(5)] == original_actions
    assert clone.train() == original_metrics
    for key, value in agent.online.state_dict().items():
        torch.testing.assert_close(clone.online.state_dict()[key], value)


def test_a_checkpoint_from_the_other_kind_of_device_restores_with_its_streams_reseeded_alike():
    """Issue 26: a CUDA checkpoint holds Philox stream states (16 bytes), which a CPU generator refuses
    (and the reverse): it once made every checkpoint of a GPU run impossible to resume on a CPU. The streams
    are seeded from the saved state instead: the same checkpoint gives the same draws after."""
    config = small_config()
    agent = make_agent(config)
    agent.train()
    state = copy.deepcopy(agent.state_dict())
    cuda_like = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
    state["learn_generator"] = state["act_generator"] = cuda_like  # seed 7, offset 64, as CUDA saves it
    frames = np.random.default_rng(1).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    car = np.array([80.0, 2.0, 4000.0], np.float32)
    draws = []
    for _ in range(2):
        clone = RainbowAgent(config, agent.replay, seed=99)
        clone.load_state_dict(state)
        draws.append(([clone.act(frames, car, 10**6) for _ in range(5)], clone._quantile_fractions(2, 3)))
    assert draws[0][0] == draws[1][0]
    torch.testing.assert_close(draws[0][1], draws[1][1], rtol=0, atol=0)
    assert not torch.equal(draws[0][1], RainbowAgent(config, agent.replay, seed=99)._quantile_fractions(2, 3))


# --- the IQN loss through train(), BatchNorm modes, the hard copy, skipped steps ---------------------
class FixedBatchReplay:
    """The replay API `RainbowAgent.train` uses, serving one fixed batch and recording what it is told."""

    def __init__(self, batch: dict[str, np.ndarray]) -> None:
        self.batch = batch
        self.updates: list[tuple[np.ndarray, np.ndarray]] = []
        self.beta, self.max_priority, self.beta_advances = 0.4, 1.0, 0

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        assert batch_size == len(self.batch["reward"])
        return {key: value.copy() for key, value in self.batch.items()}

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        self.updates.append((np.asarray(indices).copy(), np.asarray(td_errors).copy()))

    def advance_beta(self) -> None:
        self.beta_advances += 1


def terminal_batch(config: Config, weights: list[float], seed: int = 0) -> dict[str, np.ndarray]:
    """Terminal transitions: every target quantile is the reward itself, a point mass."""
    rng = np.random.default_rng(seed)
    n = len(weights)
    return {
        "frames": rng.integers(0, 256, (n, 4, 64, 64), dtype=np.uint8),
        "car": np.array([[100.0 + 10 * i, 2.0, 3000.0] for i in range(n)], np.float32),
        "action": np.arange(n, dtype=np.int64) % config.output_dim,
        "reward": np.linspace(-2.0, 3.0, n).astype(np.float32),
        "next_frames": rng.integers(0, 256, (n, 4, 64, 64), dtype=np.uint8),
        "next_car": np.ones((n, 3), np.float32),
        "terminated": np.ones(n, np.float32),
        "discount": np.zeros(n, np.float32),
        "weights": np.asarray(weights, np.float32),
        "indices": np.arange(n, dtype=np.int64),
    }


def test_train_weights_the_quantile_loss_by_the_online_taus_and_the_is_weights():
    """A point-mass target and fixed online taus: train()'s gradient must be the hand-written IQN loss,
    |tau_i - 1{r < q_i}| Huber(r - q_i) summed over the online taus, times each sample's IS weight."""
    config = small_config(batch_size=4)
    weights = [1.0, 0.25, 0.5, 0.75]
    replay = FixedBatchReplay(terminal_batch(config, weights))
    agent = RainbowAgent(config, replay, seed=0)
    online_taus = torch.tensor([[0.05, 0.2, 0.35, 0.5, 0.6, 0.75, 0.85, 0.97]]).repeat(4, 1)
    target_taus = torch.tensor([[0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.4]]).repeat(4, 1)
    draws = [target_taus, online_taus]  # train() draws the online taus, then the target's

    def fractions(rows: int, count: int) -> torch.Tensor:
        return draws.pop() if draws else torch.rand(rows, count)

    agent._quantile_fractions = fractions
    captured = {}
    real_step = agent.optimizer.step

    def capture_then_step():
        captured["grads"] = [p.grad.detach().clone() for p in agent.online.parameters()]
        batch = {k: torch.as_tensor(v) for k, v in replay.batch.items() if k != "indices"}
        quantiles = agent.online(batch["frames"], batch["car"], online_taus)  # same noise, train mode
        taken = quantiles.gather(2, batch["action"].view(-1, 1, 1).expand(-1, 8, 1)).squeeze(2)
        delta = batch["reward"][:, None] - taken  # (B, N): the point mass minus each online quantile
        huber = torch.where(delta.abs() <= 1.0, 0.5 * delta**2, delta.abs() - 0.5)
        rho = (online_taus - (delta.detach() < 0).float()).abs() * huber
        reference = (batch["weights"] * rho.sum(dim=1)).mean()
        captured["reference"] = torch.autograd.grad(reference, list(agent.online.parameters()))
        real_step()

    agent.optimizer.step = capture_then_step
    metrics = agent.train()
    assert metrics["grad_norm"] < config.gradient_clip_norm, "keep the test below the clip"
    for got, want in zip(captured["grads"], captured["reference"], strict=True):
        torch.testing.assert_close(
            got, want, rtol=1e-4, atol=1e-6,
            msg="train()'s gradient is not the IQN loss weighted by |online tau - 1{delta<0}| and the IS "
            "weights (the weight must use the online taus; IS weights must scale each sample)",
        )  # fmt: skip


def test_train_records_the_pre_clip_gradient_norm_and_sends_td_errors_as_priorities():
    config = small_config(batch_size=4, gradient_clip_norm=1e-3)  # a clip that always cuts
    replay = FixedBatchReplay(terminal_batch(config, [1.0, 1.0, 1.0, 1.0]))
    agent = RainbowAgent(config, replay, seed=0)
    captured = {}
    real_step = agent.optimizer.step

    def capture_then_step():
        captured["norm"] = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in agent.online.parameters()])
        ).item()
        real_step()

    agent.optimizer.step = capture_then_step
    metrics = agent.train()
    # After clipping the norm is 1e-3; the recorded one must be the norm before (seed 003: a norm that is
    # never recorded read 0.000 for a whole run).
    assert captured["norm"] == pytest.approx(1e-3, rel=1e-3), "the clip did not apply"
    assert metrics["grad_norm"] > 1e-2, "grad_norm must be the pre-clip norm, recorded (seed 003)"
    assert len(replay.updates) == 1, "every applied learn step hands its TD errors back to the replay"
    indices, td_errors = replay.updates[0]
    assert indices.tolist() == [0, 1, 2, 3] and np.all(td_errors > 0), "priorities come from |TD error|"
    assert metrics["td_error_mean"] == pytest.approx(float(td_errors.mean()))
    assert replay.beta_advances == 1, "beta advances once per applied learn step"


def test_no_gradient_ever_reaches_the_target_net():
    agent = make_agent(small_config())
    for _ in range(3):
        agent.train()
    assert all(p.grad is None for p in agent.target.parameters()), "the target net received gradients"
    assert not any(p.requires_grad for p in agent.target.parameters()), "the target net must be frozen"
    batch = {k: torch.as_tensor(v) for k, v in agent.replay.sample(4).items() if k != "indices"}
    targets, _ = agent.td_targets(batch)
    assert not targets.requires_grad, "TD targets must be constants (no gradient through the target)"


def test_batchnorm_mode_of_every_forward_pass():
    """Acting, the next-state argmax and the target use running statistics (eval mode); only the
    current-state batch of a learn step uses batch statistics and updates the running ones, once."""
    agent = make_agent(small_config())
    calls: list[tuple[str, bool, int]] = []
    for name, net in (("online", agent.online), ("target", agent.target)):
        net.register_forward_pre_hook(
            lambda module, inputs, name=name: calls.append((name, module.training, inputs[0].shape[0]))
        )
    tracked = {
        name: [m.num_batches_tracked.item() for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for name, net in (("online", agent.online), ("target", agent.target))
    }
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    agent.greedy_action(frames, np.zeros(3, np.float32))
    assert calls == [("online", False, 1)], f"acting must run in eval mode, got {calls}"
    calls.clear()
    agent.train()
    batch = agent.config.batch_size
    assert sorted(calls) == sorted(
        [("online", True, batch), ("target", False, batch), ("online", False, batch)]
    ), f"a learn step is current batch (train mode), target (eval), next-state argmax (eval): {calls}"
    after = {
        name: [m.num_batches_tracked.item() for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for name, net in (("online", agent.online), ("target", agent.target))
    }
    assert after["online"] == [n + 1 for n in tracked["online"]], (
        "the online running statistics must be updated exactly once per learn step (current states only)"
    )
    assert after["target"] == tracked["target"], "the target's BatchNorm statistics must stay frozen"


def test_the_hard_copy_includes_batchnorm_statistics():
    agent = make_agent(small_config())
    for _ in range(5):
        agent.train()  # the online running statistics move away from the target's
    online = agent.online.state_dict()
    assert any(not torch.equal(online[k], agent.target.state_dict()[k]) for k in online if "running" in k)
    agent.update_target_network()
    target = agent.target.state_dict()
    for key, value in online.items():
        if key.endswith(("epsilon_in", "epsilon_out")):
            continue  # the target's noise is redrawn right after the copy
        assert torch.equal(target[key], value), (
            f"hard copy left out {key}: the target must be an exact copy, BatchNorm buffers included "
            "(else it normalises with stale statistics)"
        )


def test_a_skipped_learn_step_moves_neither_the_target_clock_nor_beta():
    config = small_config(target_network_update_frequency=3)
    agent = make_agent(config)
    original_sample = agent.replay.sample
    poison = {"on": False}

    def sample(batch_size):
        batch = original_sample(batch_size)
        if poison["on"]:
            batch["reward"][0] = np.nan
        return batch

    agent.replay.sample = sample
    agent.train()
    agent.train()
    beta = agent.replay.beta
    poison["on"] = True
    for _ in range(4):
        assert agent.train()["skipped"] == 1.0
    assert agent.target_updates == 0, "skipped steps advanced the target-copy clock"
    assert agent.replay.beta == beta, "skipped steps advanced beta"
    assert (agent.learn_steps, agent.applied_steps) == (6, 2)
    poison["on"] = False
    agent.train()
    assert agent.target_updates == 1 and agent.applied_steps == 3, "the third applied step copies"


def test_adamw_weight_decay_is_the_pinned_value_on_every_parameter():
    agent = make_agent(small_config())
    assert Config().weight_decay == 0.01
    groups = agent.optimizer.param_groups
    assert {group["weight_decay"] for group in groups} == {0.01}, "weight decay is the pinned config value"
    assert sum(len(g["params"]) for g in groups) == len(list(agent.online.parameters()))
    other = make_agent(small_config(weight_decay=0.0))
    assert {group["weight_decay"] for group in other.optimizer.param_groups} == {0.0}, "and follows it"


# --- demonstrations beside the agent's data (issue 17) ------------------------------------------------
def mixed_batch(config: Config, demo_rows: list[int], seed: int = 0, demo_brightness: int = 0) -> dict:
    """A batch whose demonstrations differ systematically from the agent's own transitions (brighter
    frames, larger rewards)."""
    batch = terminal_batch(config, [1.0] * config.batch_size, seed=seed)
    is_demo = np.zeros(config.batch_size, np.float32)
    is_demo[demo_rows] = 1.0
    batch["is_demo"] = is_demo
    batch["frames"][demo_rows] = np.clip(batch["frames"][demo_rows].astype(int) + demo_brightness, 0, 255)
    batch["reward"][demo_rows] += 50.0
    return batch


def test_batchnorm_statistics_of_a_mixed_batch_are_computed_within_each_source():
    """Seed 002: the agent's own states must not be normalised by the demonstrations' statistics."""
    config = small_config(batch_size=8)
    agent = RainbowAgent(config, replay=None, seed=0)
    agent._online_mode(training=True)
    taus = torch.rand(8, config.n_tau_train)
    own = [0, 1, 2, 3, 4]
    results = []
    for brightness in (0, 120):  # the demonstrations change; the agent's own rows must not
        batch = {
            k: torch.as_tensor(v)
            for k, v in mixed_batch(config, [5, 6, 7], demo_brightness=brightness).items()
        }
        with torch.no_grad():
            results.append(agent.current_quantiles(batch, taus))
    torch.testing.assert_close(
        results[0][own], results[1][own], msg="the agent's quantiles moved with the demonstrations' frames"
    )
    assert not torch.allclose(results[0][5:], results[1][5:]), "the demonstrations' own rows do change"


def test_the_margin_loss_applies_to_demonstrations_only_and_matches_its_definition():
    config = small_config()
    agent = RainbowAgent(config, replay=None, seed=0)
    q = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.5, 4.0], [2.0, 1.0, 0.0]])
    action = torch.tensor([0, 2, 1])
    is_demo = torch.tensor([1.0, 1.0, 0.0])
    # row 0: max(1, 3 + .8, 2 + .8) - 1 = 2.8; row 1: max(.8, 1.3, 4) - 4 = 0; row 2 (the agent's): excluded
    margin = agent.demo_margin_loss(q, action, is_demo)
    assert margin.item() == pytest.approx((2.8 + 0.0) / 2), "mean over the demonstrations, not the batch"
    is_demo_all = torch.tensor([1.0, 1.0, 1.0])  # row 2: max(2.8, 1, .8) - 1 = 1.8
    assert agent.demo_margin_loss(q, action, is_demo_all).item() == pytest.approx((2.8 + 0.0 + 1.8) / 3)
    assert agent.demo_margin_loss(q, action, torch.zeros(3)).item() == 0.0


def test_train_reports_each_sources_statistics_and_the_demonstrations_share_of_the_loss():
    config = small_config(batch_size=8)
    batch = mixed_batch(config, [5, 6, 7])
    agent = RainbowAgent(config, FixedBatchReplay(batch), seed=0)
    metrics = agent.train()
    assert metrics["demo_share"] == pytest.approx(3 / 8)
    rewards = batch["reward"]
    assert metrics["demo_reward"] == pytest.approx(rewards[5:].mean()), "the demos' own reward mean"
    assert metrics["agent_reward"] == pytest.approx(rewards[:5].mean()), "the agent's own reward mean"
    assert metrics["agent_weight"] == 1.0 and metrics["demo_weight"] == 1.0
    for key in ("agent_td_error", "demo_td_error", "agent_q", "demo_q", "margin_loss"):
        assert np.isfinite(metrics[key]), key
    assert 0.0 < metrics["demo_loss_share"] < 1.0
    assert metrics["demo_td_error"] > metrics["agent_td_error"], "the demos' larger rewards: larger TD errors"
