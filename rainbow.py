"""The Rainbow-IQN network and agent, read top to bottom.

Network (the reference's shape, with its defects fixed; see shared/reference/original-code.md):
    4x64x64 uint8 frames -> 4 stride-2 convs (ReLU between every pair, BatchNorm after the first three)
                          -> 16x4x4 = 256 image features
    speed, gear, rpm      -> divided by fixed scales -> Linear(3,256) LeakyReLU Linear(256,256) LeakyReLU
    state = [image, car] (512) * relu(Linear(cos(pi * i * tau), i = 0..63))     one row per quantile tau
    dueling NoisyLinear heads: V(512 -> 128 -> 1), A(512 -> 128 -> 11), Q_tau = V + A - mean(A)

Agent: IQN quantile Huber loss (kappa 1) on 1-step Double-DQN targets, weighted by PER importance
weights; AdamW with a constant learning rate; gradient-norm clip 100 (the norm is recorded);
hard copy of the online net into the target net every 1500 learn steps; epsilon-greedy acting whose
epsilon is a pure function of the global environment step.

BatchNorm: the online net learns in train mode (batch statistics, running statistics updated by the
current-state batch only). Acting, the Double-DQN argmax over next states and the target net all use
eval mode (running statistics), so a single-frame batch never normalises by its own statistics and the
target net's statistics stay frozen between hard copies.

Noise: the online net draws new factorised-Gaussian noise at every learn step; the target net draws new
noise at every target evaluation; every action draws new noise for the online net (NoisyNet's exploration).
`set_noise(False)` switches noise off for a deterministic, evaluation-only greedy policy.

Random streams: one seed spawns (numpy.random.SeedSequence) independent streams: the learn steps' noise and
quantile fractions, the actions' noise and quantile fractions, and the epsilon draws. The actor beside a
learner and the learner each use only their own, so no acting draw ever repeats a learning draw (issue 25:
a shared seed made the two processes draw the same numbers), and the inline agent uses the same two
streams, so that inline and a lockstep learner beside the actor act and learn alike, bit for bit.
"""

from __future__ import annotations

import copy
import math
import zlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from torch import nn

from tm_config import ACTIONS, Config, epsilon_at  # noqa: F401 - epsilon_at is part of the agent's API

ACTION_VECTORS = np.array([vector for _, vector in ACTIONS], dtype=np.float32)  # (11, 3) [gas, brake, steer]


def action_vector(action_index: int) -> np.ndarray:
    """The tmrl [gas, brake, steer] vector of a discrete action (a copy the caller may modify)."""
    return ACTION_VECTORS[action_index].copy()


class DeviceError(RuntimeError):
    """A --device that cannot be used here; the message is one line with the fix."""


# pytorch.org's CUDA 12.x wheels of the torch version the project is tested on (README: Windows). Forced:
# over an installed CPU build (2.13.0+cpu) pip would answer "Requirement already satisfied" to ==2.13.0.
CUDA_TORCH_INSTALL = (
    "pip install --force-reinstall torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
)
# A CUDA build of torch that finds no GPU: the driver is missing or too old for the build's CUDA.
DRIVER_FIX = (
    "install or update the NVIDIA driver (`nvidia-smi` must list the GPU, with a CUDA version at least "
    "the build's)"
)


def _cuda_fix() -> str:
    """What makes this torch use an NVIDIA GPU: the CUDA build for a CPU build, else the driver."""
    if torch.version.cuda is None:
        return f"install the CUDA build with `{CUDA_TORCH_INSTALL}`"
    return f"torch is already a CUDA {torch.version.cuda} build: {DRIVER_FIX}"


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when torch can use it; anything that cannot run here is a one-line DeviceError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            build = (
                f"this torch ({torch.__version__}) is a CPU build"
                if torch.version.cuda is None
                else (
                    f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable NVIDIA GPU/driver"
                )
            )
            raise DeviceError(f"--device cuda: {build}; {_cuda_fix()}, or use --device auto or cpu")
        return torch.device("cuda")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        raise DeviceError("--device mps (Apple GPUs) is not supported: use --device cpu")
    raise DeviceError(f"unknown --device {name!r}: use auto, cpu or cuda")


def unused_gpu_notice() -> str | None:
    """One line when an NVIDIA GPU is present but this torch cannot use it (a CPU build installed over
    or instead of the CUDA one), else None."""
    import shutil

    if torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        return None
    build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return (
        f"an NVIDIA GPU is present but torch {torch.__version__} ({build}) cannot use it, so training runs "
        f"on the CPU: {_cuda_fix()} (README: Windows)"
    )


# --- network ---------------------------------------------------------------------------------------
# NoisyLinear calls without autograd on at most this many rows (acting: n_tau_action rows) use the
# factorised form, cheaper than building the noisy weight; learning always builds it (bit-identical).
FACTORISED_MAX_ROWS = 32


class NoisyLinear(nn.Module):
    """Linear layer with factorised Gaussian noise on weights and biases (Fortunato et al., 2018)."""

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
        self.noise_enabled = True
        self.reset_noise()

    @torch.no_grad()
    def reset_noise(self, generator: torch.Generator | None = None) -> None:
        """New noise f(x) = sign(x) sqrt(|x|), x ~ N(0, 1): epsilon_in first, then epsilon_out, drawn from
        `generator` (torch's global stream when None)."""
        # Drawn in place: the same normal_ draws as a fresh torch.randn, and copysign gives exactly
        # sign(x) * sqrt(|x|), in 4 kernels instead of 6 and without temporaries of the layer's size.
        for buffer in (self.epsilon_in, self.epsilon_out):
            buffer.normal_(generator=generator)
            torch.copysign(buffer.abs().sqrt_(), buffer, out=buffer)

    def noisy_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias this layer applies now (mu alone when noise is off)."""
        if not self.noise_enabled:
            return self.weight_mu, self.bias_mu
        weight = self.weight_mu + self.weight_sigma * torch.outer(self.epsilon_out, self.epsilon_in)
        bias = self.bias_mu + self.bias_sigma * self.epsilon_out
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.noise_enabled
            and not torch.is_grad_enabled()
            and x.numel() <= FACTORISED_MAX_ROWS * x.shape[-1]
        ):
            # A few rows without autograd (acting): x W^T with W = mu + sigma * (eps_out eps_in^T) is
            # x mu^T + eps_out * ((x * eps_in) sigma^T), the same sum without building W (3 passes over
            # out x in elements, most of an action's cost); equal to the built form up to float rounding.
            noisy = F.linear(x * self.epsilon_in, self.weight_sigma, self.bias_sigma) * self.epsilon_out
            return F.linear(x, self.weight_mu, self.bias_mu) + noisy
        return F.linear(x, *self.noisy_weight_and_bias())


class IQNNetwork(nn.Module):
    """Maps (frames, car floats, taus) to quantile values of shape (batch, n_taus, n_actions)."""

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
        image_features = c2 * config.conv_hidden_image_variable**2
        self.car = nn.Sequential(
            nn.Linear(config.state_floats, config.car_feature_hidden_dim),
            nn.LeakyReLU(),
            nn.Linear(config.car_feature_hidden_dim, config.car_feature_hidden_dim),
            nn.LeakyReLU(),
        )
        state_dim = image_features + config.car_feature_hidden_dim
        # The car floats divided by fixed scales; previous actions are [gas, brake, steer] in [-1, 1].
        scales = [config.speed_scale, config.gear_scale, config.rpm_scale]
        scales += [1.0] * 3 * config.previous_actions
        self.register_buffer("car_scale", torch.tensor(scales))
        self.register_buffer(
            "cosine_multipliers", math.pi * torch.arange(config.cosine_dim, dtype=torch.float32)
        )
        self.tau_embedding = nn.Linear(config.cosine_dim, state_dim)
        self.use_dueling = config.use_dueling
        std, hidden, n_actions = config.noisy_std, config.hidden_dim, config.output_dim
        self.advantage_hidden = NoisyLinear(state_dim, hidden, std)
        self.advantage_out = NoisyLinear(hidden, n_actions, std)
        if self.use_dueling:
            self.value_hidden = NoisyLinear(state_dim, hidden, std)
            self.value_out = NoisyLinear(hidden, 1, std)

    def noisy_layers(self) -> list[NoisyLinear]:
        return [m for m in self.modules() if isinstance(m, NoisyLinear)]

    def reset_noise(self, generator: torch.Generator | None = None) -> None:
        for layer in self.noisy_layers():
            layer.reset_noise(generator)

    def set_noise(self, enabled: bool) -> None:
        for layer in self.noisy_layers():
            layer.noise_enabled = enabled

    def forward(self, frames: torch.Tensor, car: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        """frames uint8 (B,4,64,64), car raw floats (B,3), taus (B,N) in (0,1) -> (B,N,n_actions)."""
        pixels = frames.float().div_(255.0)  # in place on the fresh float copy: one buffer, not two
        image = self.conv(pixels) if self.training else self._conv_eval(pixels)
        state = torch.cat([image, self.car(car / self.car_scale)], dim=1)  # (B, 512)
        cosines = torch.cos(taus.unsqueeze(-1) * self.cosine_multipliers)  # (B, N, cosine_dim)
        embedded = state.unsqueeze(1) * F.relu(self.tau_embedding(cosines))  # (B, N, 512)
        advantage = self.advantage_out(F.relu(self.advantage_hidden(embedded)))
        if not self.use_dueling:
            return advantage
        value = self.value_out(F.relu(self.value_hidden(embedded)))
        return value + advantage - advantage.mean(dim=-1, keepdim=True)

    def _conv_eval(self, x: torch.Tensor) -> torch.Tensor:
        """self.conv(x) in eval mode, as the same ATen calls its layers make, minus ~13 module calls."""
        for layer in self.conv:
            if isinstance(layer, nn.Conv2d):
                x = F.conv2d(
                    x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
                )
            elif isinstance(layer, nn.BatchNorm2d):
                x = F.batch_norm(
                    x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
                )
            elif isinstance(layer, nn.ReLU):
                x = F.relu(x)
            else:
                x = layer(x)
        return x


def _adamw(
    params: list[nn.Parameter], lr: float, weight_decay: float
) -> tuple[torch.optim.AdamW, dict[str, Any]]:
    """AdamW with its fused kernel (one kernel for all parameters) where torch has one for the device,
    else the multi-tensor (foreach) one; the update is AdamW's either way. Returns the optimizer and the
    implementation flags, which `RainbowAgent.load_state_dict` re-applies over a checkpoint's.

    The weight decay is the pinned config value, applied to every parameter (noisy sigmas and BatchNorm
    included), as the reference's `AdamW(params, lr)` did with torch's default of 0.01."""
    options = {"lr": lr, "weight_decay": weight_decay}
    try:
        return torch.optim.AdamW(params, **options, fused=True), {"fused": True, "foreach": None}
    except (RuntimeError, TypeError, ValueError):  # e.g. torch < 2.4 has no fused AdamW on the CPU
        return torch.optim.AdamW(params, **options, foreach=True), {"fused": None, "foreach": True}


# --- loss ------------------------------------------------------------------------------------------
def quantile_huber_loss(
    quantiles: torch.Tensor, taus: torch.Tensor, target_quantiles: torch.Tensor, kappa: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """IQN loss per sample. quantiles (B,N) at `taus` (B,N); target_quantiles (B,N').

    rho(delta) = |tau - 1{delta < 0}| * Huber_kappa(delta) / kappa, with delta_ij = target_j - quantile_i,
    summed over the online taus i and averaged over the target taus j. Returns (loss (B,), |delta| (B,N,N')).
    """
    delta = target_quantiles.unsqueeze(1) - quantiles.unsqueeze(2)  # (B, N, N')
    abs_delta = delta.abs()
    huber = torch.where(abs_delta <= kappa, 0.5 * delta.pow(2), kappa * (abs_delta - 0.5 * kappa))
    weight = (taus.unsqueeze(2) - (delta.detach() < 0).float()).abs()
    return (weight * huber / kappa).sum(dim=1).mean(dim=1), abs_delta.detach()


def load_generator_state(generator: torch.Generator, state: torch.Tensor) -> None:
    """Restore a saved torch stream. A CPU stream (Mersenne Twister, 5,056 bytes) and a CUDA one (Philox,
    16 bytes) cannot take each other's state: a checkpoint resumed on the other kind of device gets its
    stream seeded from the saved state's bytes instead (the same checkpoint, the same draws after)."""
    try:
        generator.set_state(state)
    except RuntimeError:
        generator.manual_seed(zlib.crc32(state.numpy().tobytes()))


# --- agent -----------------------------------------------------------------------------------------
class RainbowAgent:
    """Acts epsilon-greedily and learns from a `replay.PrioritizedReplay` (any object with its API)."""

    def __init__(self, config: Config, replay: Any = None, device: str | torch.device = "cpu", seed: int = 0):
        self.config = config
        self.replay = replay
        self.device = resolve_device(device) if isinstance(device, str) else device
        torch.manual_seed(seed)  # the initial weights: the same seed gives the same net in every process
        self.online = IQNNetwork(config).to(self.device)
        self.target = copy.deepcopy(self.online)
        self.target.eval()
        self.target.requires_grad_(False)
        self._online_modules = tuple(self.online.modules())
        # Constant learning rate by design (seed 004): no scheduler exists anywhere in this project.
        self.optimizer, self._optimizer_impl = _adamw(
            list(self.online.parameters()), config.learning_rate, config.weight_decay
        )
        self.learn_generator = torch.Generator(device=self.device)
        self.act_generator = torch.Generator(device=self.device)
        self.reseed(seed)
        self.learn_steps = 0  # learn steps run, skipped ones included (the replay ratio counts these)
        self.applied_steps = 0  # gradient updates applied: the clock of the hard target copy
        self.target_updates = 0
        self.skipped_steps = 0  # learn steps whose loss or gradients were not finite
        self.consecutive_skipped_steps = 0
        self.epsilon = epsilon_at(0, config)

    def reseed(self, seed: int) -> None:
        """Independent random streams from one seed (module docstring): learning's, acting's and epsilon's.
        A rollback calls it with a new seed, so that the restored run does not replay the same draws."""
        learn, act, explore = (int(s) for s in np.random.SeedSequence(seed).generate_state(3))
        self.learn_generator.manual_seed(learn)
        self.act_generator.manual_seed(act)
        self.rng = np.random.default_rng(explore)

    # acting ---------------------------------------------------------------------------------------
    def act(self, frames: np.ndarray, car: np.ndarray, step: int) -> int:
        """Epsilon-greedy action index at global environment step `step`, with fresh noise from the acting
        stream for the online net (NoisyNet's exploration)."""
        self.epsilon = epsilon_at(step, self.config)
        self.online.reset_noise(self.act_generator)
        if self.rng.random() < self.epsilon:
            return int(self.rng.integers(self.config.output_dim))
        return self.greedy_action(frames, car)

    @torch.inference_mode()
    def greedy_action(
        self, frames: np.ndarray, car: np.ndarray, generator: torch.Generator | None = None
    ) -> int:
        """argmax over the mean of `n_tau_action` quantiles (drawn from `generator`, by default the acting
        stream), BatchNorm in eval mode."""
        self._online_mode(training=False)
        frames_t = torch.as_tensor(frames, device=self.device).unsqueeze(0)
        car_t = torch.as_tensor(car, dtype=torch.float32, device=self.device).unsqueeze(0)
        taus = torch.rand(
            1, self.config.n_tau_action, device=self.device, generator=generator or self.act_generator
        )
        q = self.online(frames_t, car_t, taus).mean(dim=1)
        return int(q.argmax(dim=1).item())

    def _online_mode(self, training: bool) -> None:
        """self.online.train(training), without Module.train's recursive walk (~0.1 ms per call on a
        small CPU, several calls per env step): the same flag set on the same modules."""
        for module in self._online_modules:
            module.__dict__["training"] = training  # a plain attribute: skip Module.__setattr__'s checks

    def _quantile_fractions(self, rows: int, count: int) -> torch.Tensor:
        """A learn step's quantile fractions tau ~ U(0, 1), (rows, count), from the learning stream."""
        return torch.rand(rows, count, device=self.device, generator=self.learn_generator)

    # learning -------------------------------------------------------------------------------------
    def _batch_to_device(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {key: torch.as_tensor(value, device=self.device) for key, value in batch.items()}

    def train(self) -> dict[str, float]:
        """One learn step on a prioritized batch; returns the step's metrics."""
        cfg = self.config
        batch_np = self.replay.sample(cfg.batch_size)
        batch = self._batch_to_device({k: v for k, v in batch_np.items() if k != "indices"})
        n_batch = cfg.batch_size

        self._online_mode(training=True)
        self.online.reset_noise(self.learn_generator)
        taus = self._quantile_fractions(n_batch, cfg.n_tau_train)  # the online quantile fractions
        target_taus = self._quantile_fractions(n_batch, cfg.n_tau_train)  # where the target is read
        quantiles = self.current_quantiles(batch, taus)  # (B, N, A)
        taken = quantiles.gather(2, batch["action"].view(-1, 1, 1).expand(-1, cfg.n_tau_train, 1)).squeeze(2)

        target_quantiles, _ = self.td_targets(batch, target_taus)

        per_sample, abs_delta = quantile_huber_loss(taken, taus, target_quantiles, cfg.huber_kappa)
        weighted = batch["weights"] * per_sample
        loss = weighted.mean()
        margin_loss = None
        if (
            "is_demo" in batch
        ):  # DQfD: the large-margin loss on demonstrations (the mean over their quantiles)
            margin_loss = self.demo_margin_loss(quantiles.mean(dim=1), batch["action"], batch["is_demo"])
            loss = loss + cfg.demo_margin_weight * margin_loss

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.online.parameters(), cfg.gradient_clip_norm)

        td_error = abs_delta.mean(dim=(1, 2))  # PER priority: mean |delta| over the N x N' pairs
        q_mean_over_taus = quantiles.detach().mean(dim=1)
        summary = torch.stack(
            [
                loss.detach(),
                grad_norm,
                q_mean_over_taus.mean(),
                q_mean_over_taus.min(),
                q_mean_over_taus.max(),
                q_mean_over_taus.std(),
                q_mean_over_taus.max(dim=1).values.mean(),
                target_quantiles.mean(),
                target_quantiles.max(),
            ]
        ).cpu()  # the one device sync of the step: metrics and priorities are needed on the host
        td_error_np = td_error.cpu().numpy()
        loss_v, grad_norm_v, q_mean, q_min, q_max, q_std, q_greedy, target_mean, target_max = summary.tolist()
        by_source = (
            self._per_source_metrics(batch, q_mean_over_taus, td_error, weighted.detach(), margin_loss)
            if "is_demo" in batch
            else {}
        )

        finite = math.isfinite(loss_v) and math.isfinite(grad_norm_v) and bool(np.isfinite(td_error_np).all())
        self.learn_steps += 1
        if finite:
            self.optimizer.step()
            self.replay.update_priorities(batch_np["indices"], td_error_np)
            self.replay.advance_beta()
            self.consecutive_skipped_steps = 0
            self.applied_steps += 1
            if self.applied_steps % cfg.target_network_update_frequency == 0:
                self.update_target_network()
        else:
            # Never let NaN/inf reach the weights or the optimizer's moments: drop this step's gradients.
            # A skipped step changed nothing, so it moves neither the target-copy clock nor beta either.
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.consecutive_skipped_steps += 1

        return {
            "loss": loss_v,
            "grad_norm": grad_norm_v,
            "q_mean": q_mean,
            "q_min": q_min,
            "q_max": q_max,
            "q_std": q_std,
            "q_greedy": q_greedy,  # mean over the batch of max_a Q(s, a): the reference run's "mean greedy Q"
            "target_q_mean": target_mean,
            "target_q_max": target_max,
            "td_error_mean": float(td_error_np.mean()),
            "td_error_max": float(td_error_np.max()),
            "max_priority": float(self.replay.max_priority),
            "beta": float(self.replay.beta),
            "learning_rate": self.optimizer.param_groups[0]["lr"],
            "learn_step": self.learn_steps,
            "applied_steps": self.applied_steps,
            "skipped": 0.0 if finite else 1.0,
            "skipped_total": self.skipped_steps,
            **by_source,
        }

    def current_quantiles(self, batch: dict[str, torch.Tensor], taus: torch.Tensor) -> torch.Tensor:
        """The online net's quantiles of the batch's states, BatchNorm in train mode. A batch that mixes
        demonstrations with the agent's own transitions is normalised within each source (seed 002: a
        statistic over the mixed batch lets the expert's data set the scale of the agent's)."""
        demo = batch["is_demo"] > 0.5 if "is_demo" in batch else None
        if demo is None or bool(demo.all()) or not bool(demo.any()):
            return self.online(batch["frames"], batch["car"], taus)
        order = torch.cat([torch.nonzero(~demo).squeeze(1), torch.nonzero(demo).squeeze(1)])
        own = int((~demo).sum())
        parts = [
            self.online(batch["frames"][rows], batch["car"][rows], taus[rows])
            for rows in (order[:own], order[own:])
        ]
        return torch.cat(parts)[torch.argsort(order)]

    def demo_margin_loss(self, q: torch.Tensor, action: torch.Tensor, is_demo: torch.Tensor) -> torch.Tensor:
        """max_a [Q(s, a) + margin * 1{a != a_E}] - Q(s, a_E), averaged over the demonstrations in the batch
        (within their source); 0 when the batch holds none. `q` (B, A) is the mean over the quantiles."""
        demo = is_demo > 0.5
        if not bool(demo.any()):
            return q.sum() * 0.0
        margins = torch.full_like(q, self.config.demo_margin)
        margins.scatter_(1, action.view(-1, 1), 0.0)
        expert = q.gather(1, action.view(-1, 1)).squeeze(1)
        return ((q + margins).max(dim=1).values - expert)[demo].mean()

    def _per_source_metrics(
        self,
        batch: dict[str, torch.Tensor],
        q: torch.Tensor,
        td_error: torch.Tensor,
        weighted: torch.Tensor,
        margin_loss: torch.Tensor | None,
    ) -> dict[str, float]:
        """Batch share, TD error, greedy Q, reward and importance weight of each source, and the demos' share
        of the loss (issue 17: the agent's own data must keep its voice)."""
        demo = (batch["is_demo"] > 0.5).cpu()
        td, greedy = td_error.detach().cpu(), q.max(dim=1).values.cpu()
        rewards, weights, losses = batch["reward"].cpu(), batch["weights"].cpu(), weighted.cpu()
        metrics: dict[str, float] = {"demo_share": float(demo.float().mean())}
        for name, rows in (("agent", ~demo), ("demo", demo)):
            present = bool(rows.any())
            for key, values in (("td_error", td), ("q", greedy), ("reward", rewards), ("weight", weights)):
                metrics[f"{name}_{key}"] = float(values[rows].mean()) if present else math.nan
        margin_value = float(margin_loss.detach()) if margin_loss is not None else math.nan
        margin = margin_value * self.config.demo_margin_weight if margin_loss is not None else 0.0
        demo_part = float(losses[demo].sum()) / len(losses) + margin
        total = float(losses.mean()) + margin
        metrics["demo_loss_share"] = demo_part / total if total > 0 else math.nan
        metrics["margin_loss"] = margin_value
        return metrics

    @torch.no_grad()
    def td_targets(
        self, batch: dict[str, torch.Tensor], target_taus: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Target quantiles (B, n_tau_train) at `target_taus` (drawn here if None), and the next action.

        target = reward + discount * Z_target(next state, next action), where the replay gives `reward`
        (the discounted return over the sampled steps) and `discount` (gamma ** steps, 0 after a
        termination: a truncated episode keeps its future)."""
        cfg = self.config
        n_batch = batch["reward"].shape[0]
        self.target.reset_noise(self.learn_generator)
        if target_taus is None:
            target_taus = self._quantile_fractions(n_batch, cfg.n_tau_train)
        next_target = self.target(batch["next_frames"], batch["next_car"], target_taus)  # (B, N', A)
        if cfg.use_doubleDQN:
            # Double DQN: the online net chooses the next action, the target net evaluates it.
            was_training = self.online.training
            self._online_mode(training=False)
            action_taus = self._quantile_fractions(n_batch, cfg.n_tau_action)
            next_action = self.online(batch["next_frames"], batch["next_car"], action_taus).mean(1).argmax(1)
            self._online_mode(training=was_training)
        else:
            next_action = next_target.mean(dim=1).argmax(dim=1)
        next_value = next_target.gather(2, next_action.view(-1, 1, 1).expand(-1, cfg.n_tau_train, 1)).squeeze(
            2
        )
        return batch["reward"].unsqueeze(1) + batch["discount"].unsqueeze(1) * next_value, next_action

    def update_target_network(self) -> None:
        """Hard copy: the target becomes the online net (weights and BatchNorm statistics), then frozen."""
        self.target.load_state_dict(self.online.state_dict())
        self.target.reset_noise(self.learn_generator)
        self.target_updates += 1

    # checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "learn_steps": self.learn_steps,
            "applied_steps": self.applied_steps,
            "target_updates": self.target_updates,
            "skipped_steps": self.skipped_steps,
            "epsilon": self.epsilon,
            **self.acting_streams(),
            "learn_generator": self.learn_generator.get_state(),
        }

    def acting_streams(self) -> dict[str, Any]:
        """The acting side's random streams (an actor beside its learner saves these alone). Generator
        states are CPU tensors whatever the device: saving them never touches another device."""
        return {"agent_rng": self.rng.bit_generator.state, "act_generator": self.act_generator.get_state()}

    def load_acting_streams(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["agent_rng"]
        if "act_generator" in state:  # checkpoints before issue 25 shared torch's global stream: reseeded
            load_generator_state(self.act_generator, state["act_generator"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        # A checkpoint's param groups carry the implementation flags it was saved with: keep ours.
        for group in self.optimizer.param_groups:
            group.update(self._optimizer_impl)
        self.learn_steps = int(state["learn_steps"])
        self.applied_steps = int(state["applied_steps"])
        self.target_updates = int(state["target_updates"])
        self.skipped_steps = int(state["skipped_steps"])
        self.epsilon = float(state["epsilon"])
        self.load_acting_streams(state)
        if "learn_generator" in state:
            load_generator_state(self.learn_generator, state["learn_generator"])
