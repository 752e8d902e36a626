"""A plain, straightforward PyTorch Rainbow-IQN: the benchmark baseline for rainbow.py.

The same network, noise, loss, Double-DQN targets, optimiser and gradient clip as rainbow.py, written the
obvious way: one module per layer (value and advantage heads apart), eager fp32, default AdamW and
clip_grad_norm_, a `.item()` per metric. No fusion, no layout or thread tricks.

Parameter names match rainbow.IQNNetwork, so `load_state_dict` moves weights between the two, and the
random draws come in the same order (online noise, online taus, target noise, target taus, Double-DQN
taus), so from the same weights and seed both compute the same loss: bench_agent.py checks that before it
times anything.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from torch import nn

from tm_config import Config


class NaiveNoisyLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, std_init: float) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.weight_sigma = nn.Parameter(torch.full((out_features, in_features), std_init * bound))
        self.bias_mu = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        self.bias_sigma = nn.Parameter(torch.full((out_features,), std_init * bound))
        self.register_buffer("epsilon_in", torch.zeros(in_features))
        self.register_buffer("epsilon_out", torch.zeros(out_features))
        self.reset_noise()

    def reset_noise(self) -> None:
        def scaled(size: int) -> torch.Tensor:
            x = torch.randn(size, device=self.epsilon_in.device)
            return x.sign() * x.abs().sqrt()

        self.epsilon_in = scaled(self.in_features)
        self.epsilon_out = scaled(self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_mu + self.weight_sigma * torch.outer(self.epsilon_out, self.epsilon_in)
        bias = self.bias_mu + self.bias_sigma * self.epsilon_out
        return F.linear(x, weight, bias)


class NaiveIQN(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        c1, c2 = config.conv_channels_1, config.conv_channels_2
        self.conv = nn.Sequential(
            nn.Conv2d(config.conv_input, c1, 3, stride=2, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.Conv2d(c2, c2, 3, stride=2, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.Conv2d(c2, c2, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        hidden_car = config.car_feature_hidden_dim
        self.car = nn.Sequential(
            nn.Linear(config.input_car_dim, hidden_car),
            nn.LeakyReLU(),
            nn.Linear(hidden_car, hidden_car),
            nn.LeakyReLU(),
        )
        state_dim = c2 * config.conv_hidden_image_variable**2 + hidden_car
        self.register_buffer(
            "car_scale", torch.tensor([config.speed_scale, config.gear_scale, config.rpm_scale])
        )
        self.register_buffer(
            "cosine_multipliers", math.pi * torch.arange(config.cosine_dim, dtype=torch.float32)
        )
        self.tau_embedding = nn.Linear(config.cosine_dim, state_dim)
        std, hidden, n_actions = config.noisy_std, config.hidden_dim, config.output_dim
        self.advantage_hidden = NaiveNoisyLinear(state_dim, hidden, std)
        self.advantage_out = NaiveNoisyLinear(hidden, n_actions, std)
        self.value_hidden = NaiveNoisyLinear(state_dim, hidden, std)
        self.value_out = NaiveNoisyLinear(hidden, 1, std)

    def reset_noise(self) -> None:
        for layer in (self.advantage_hidden, self.advantage_out, self.value_hidden, self.value_out):
            layer.reset_noise()

    def forward(self, frames: torch.Tensor, car: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        image = self.conv(frames.float() / 255.0)
        car_features = self.car(car / self.car_scale)
        state = torch.cat([image, car_features], dim=1)
        cosines = torch.cos(taus.unsqueeze(-1) * self.cosine_multipliers)
        embedded = state.unsqueeze(1) * F.relu(self.tau_embedding(cosines))
        advantage = self.advantage_out(F.relu(self.advantage_hidden(embedded)))
        value = self.value_out(F.relu(self.value_hidden(embedded)))
        return value + advantage - advantage.mean(dim=-1, keepdim=True)


def naive_quantile_huber_loss(
    quantiles: torch.Tensor, taus: torch.Tensor, targets: torch.Tensor, kappa: float
) -> tuple[torch.Tensor, torch.Tensor]:
    delta = targets.unsqueeze(1) - quantiles.unsqueeze(2)
    abs_delta = delta.abs()
    huber = torch.where(abs_delta <= kappa, 0.5 * delta.pow(2), kappa * (abs_delta - 0.5 * kappa))
    weight = (taus.unsqueeze(2) - (delta.detach() < 0).float()).abs()
    return (weight * huber / kappa).sum(dim=1).mean(dim=1), abs_delta.detach()


class NaiveAgent:
    """Greedy acting and one learn step per `train()`, on a replay with PrioritizedReplay's API."""

    def __init__(self, config: Config, replay: Any, device: torch.device, seed: int = 0) -> None:
        self.config, self.replay, self.device = config, replay, device
        torch.manual_seed(seed)
        self.online = NaiveIQN(config).to(device)
        self.target = NaiveIQN(config).to(device)
        self.target.load_state_dict(self.online.state_dict())
        self.target.eval()
        for p in self.target.parameters():
            p.requires_grad = False
        self.optimizer = torch.optim.AdamW(self.online.parameters(), lr=config.learning_rate)

    def greedy_action(self, frames: np.ndarray, car: np.ndarray) -> int:
        with torch.no_grad():
            self.online.eval()
            frames_t = torch.tensor(frames).unsqueeze(0).to(self.device)
            car_t = torch.tensor(car, dtype=torch.float32).unsqueeze(0).to(self.device)
            taus = torch.rand(1, self.config.n_tau_action, device=self.device)
            q = self.online(frames_t, car_t, taus).mean(dim=1)
            return q.argmax(dim=1).item()

    def train(self) -> dict[str, float]:
        cfg = self.config
        batch_np = self.replay.sample(cfg.batch_size)
        batch = {k: torch.tensor(v).to(self.device) for k, v in batch_np.items() if k != "indices"}
        n = cfg.batch_size

        self.online.train()
        self.online.reset_noise()
        taus = torch.rand(n, cfg.n_tau_train, device=self.device)
        quantiles = self.online(batch["frames"], batch["car"], taus)
        action_index = batch["action"].view(-1, 1, 1).expand(-1, cfg.n_tau_train, 1)
        taken = quantiles.gather(2, action_index).squeeze(2)

        with torch.no_grad():
            self.target.reset_noise()
            next_taus = torch.rand(n, cfg.n_tau_train, device=self.device)
            next_quantiles = self.target(batch["next_frames"], batch["next_car"], next_taus)
            self.online.eval()
            action_taus = torch.rand(n, cfg.n_tau_action, device=self.device)
            next_q = self.online(batch["next_frames"], batch["next_car"], action_taus).mean(dim=1)
            next_action = next_q.argmax(dim=1)
            self.online.train()
            next_index = next_action.view(-1, 1, 1).expand(-1, cfg.n_tau_train, 1)
            next_value = next_quantiles.gather(2, next_index).squeeze(2)
            not_done = 1.0 - batch["terminated"].unsqueeze(1)
            targets = batch["reward"].unsqueeze(1) + cfg.discount_factor * not_done * next_value

        per_sample, abs_delta = naive_quantile_huber_loss(taken, taus, targets, cfg.huber_kappa)
        loss = (batch["weights"] * per_sample).mean()
        self.optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.online.parameters(), cfg.gradient_clip_norm)
        self.optimizer.step()

        td_error = abs_delta.mean(dim=(1, 2)).cpu().numpy()
        self.replay.update_priorities(batch_np["indices"], td_error)
        q_mean = quantiles.detach().mean(dim=1)
        return {
            "loss": loss.item(),
            "grad_norm": grad_norm.item(),
            "q_mean": q_mean.mean().item(),
            "q_max": q_mean.max().item(),
            "target_q_mean": targets.mean().item(),
            "td_error_mean": float(td_error.mean()),
        }
