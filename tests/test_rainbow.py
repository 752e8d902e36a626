"""rainbow.py against the math: loss, targets, noise, BatchNorm modes, schedules, checkpoints."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import fill_replay, small_config

from rainbow import (
    ACTION_VECTORS,
    IQNNetwork,
    NoisyLinear,
    RainbowAgent,
    action_vector,
    epsilon_at,
    quantile_huber_loss,
    resolve_device,
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


# --- noise ---------------------------------------------------------------------------------------
def test_noise_changes_between_resets_and_is_off_when_disabled():
    torch.manual_seed(0)
    layer = NoisyLinear(6, 4, std_init=0.5)
    x = torch.randn(2, 6)
    first = layer(x)
    layer.reset_noise()
    second = layer(x)
    assert not torch.allclose(first, second), "a reset must draw new noise"
    # The noise is factorised: the weight perturbation is the outer product f(eps_out) f(eps_in)^T.
    eps = torch.outer(layer.epsilon_out, layer.epsilon_in)
    manual = (
        x @ (layer.weight_mu + layer.weight_sigma * eps).T
        + layer.bias_mu
        + layer.bias_sigma * layer.epsilon_out
    )
    torch.testing.assert_close(second, manual)
    layer.noise_enabled = False
    quiet = layer(x)
    layer.reset_noise()
    torch.testing.assert_close(quiet, layer(x))
    torch.testing.assert_close(quiet, x @ layer.weight_mu.T + layer.bias_mu)


def test_every_learn_step_resamples_online_noise_and_target_noise():
    agent = make_agent(small_config())

    def noise(net):
        return [(layer.epsilon_in.clone(), layer.epsilon_out.clone()) for layer in net.noisy_layers()]

    online_before, target_before = noise(agent.online), noise(agent.target)
    agent.train()
    for (eps_in, eps_out), (new_in, new_out) in zip(online_before, noise(agent.online), strict=True):
        assert not torch.equal(eps_in, new_in) and not torch.equal(eps_out, new_out)
    for (eps_in, eps_out), (new_in, new_out) in zip(target_before, noise(agent.target), strict=True):
        assert not torch.equal(eps_in, new_in) and not torch.equal(eps_out, new_out)


def test_set_noise_false_gives_a_deterministic_greedy_policy():
    agent = make_agent(small_config(n_tau_action=64))
    agent.online.set_noise(False)
    frames = np.full((4, 64, 64), 100, np.uint8)
    car = np.array([50.0, 2.0, 3000.0], np.float32)
    actions = set()
    for _ in range(5):
        agent.online.reset_noise()
        actions.add(agent.greedy_action(frames, car))
    assert len(actions) == 1


# --- BatchNorm modes -------------------------------------------------------------------------------
def test_acting_uses_running_statistics_and_does_not_update_them():
    agent = make_agent(small_config())
    bn = agent.online.conv[1]
    stats_before = bn.running_mean.clone()
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    agent.greedy_action(frames, np.zeros(3, np.float32))
    assert not agent.online.training
    torch.testing.assert_close(bn.running_mean, stats_before)


def test_target_net_statistics_stay_frozen_between_hard_copies():
    agent = make_agent(small_config())
    target_state = {k: v.clone() for k, v in agent.target.state_dict().items() if "running" in k}
    online_bn = agent.online.conv[1].running_mean.clone()
    for _ in range(5):
        agent.train()
    for key, value in target_state.items():
        torch.testing.assert_close(agent.target.state_dict()[key], value)
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
    assert next_action.tolist() == [3] * len(next_action)
    # Recompute by hand: r + gamma * (1 - terminated) * Q_target(s', 3) at the same taus.
    torch.manual_seed(123)
    targets, _ = agent.td_targets(batch)
    torch.manual_seed(123)
    agent.target.reset_noise()
    taus = torch.rand(len(next_action), agent.config.n_tau_train)
    q_next = agent.target(batch["next_frames"], batch["next_car"], taus)[:, :, 3]
    expected = batch["reward"][:, None] + 0.997 * (1 - batch["terminated"][:, None]) * q_next
    torch.testing.assert_close(targets, expected)


def test_without_double_dqn_the_target_net_chooses():
    agent, batch = _rigged_agent(use_double=False)
    _, next_action = agent.td_targets(batch)
    assert next_action.tolist() == [5] * len(next_action)


def test_truncation_bootstraps_and_termination_does_not():
    agent, batch = _rigged_agent(use_double=True)
    batch["reward"] = torch.tensor([1.0, 1.0, 2.0, 2.0])
    batch["terminated"] = torch.tensor([1.0, 0.0, 1.0, 0.0])  # rows 1 and 3: truncated or running
    torch.manual_seed(7)
    targets, _ = agent.td_targets(batch)
    torch.manual_seed(7)
    agent.target.reset_noise()
    taus = torch.rand(4, agent.config.n_tau_train)
    q_next = agent.target(batch["next_frames"], batch["next_car"], taus)[:, :, 3]
    torch.testing.assert_close(targets[0], torch.ones(agent.config.n_tau_train))
    torch.testing.assert_close(targets[2], torch.full((agent.config.n_tau_train,), 2.0))
    torch.testing.assert_close(targets[1], 1.0 + 0.997 * q_next[1])
    torch.testing.assert_close(targets[3], 2.0 + 0.997 * q_next[3])


# --- learning ------------------------------------------------------------------------------------
def test_train_returns_finite_metrics_and_updates_priorities():
    agent = make_agent(small_config())
    metrics = agent.train()
    expected_keys = {
        "loss", "grad_norm", "q_mean", "q_min", "q_max", "q_std", "target_q_mean", "target_q_max",
        "td_error_mean", "td_error_max", "max_priority", "beta", "epsilon", "learning_rate",
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


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")


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
