"""Typed configuration sections.

Each section is a dataclass with one docstring per field and its own validation, so an error
names the offending key (``loss.tau_neg must be > 0``). Defaults live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

LossName = Literal["sapo", "grpo", "gspo"]
Aggregation = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"]
KLEstimator = Literal["k1", "k3"]

LOSS_NAMES: tuple[str, ...] = ("sapo", "grpo", "gspo")
AGGREGATIONS: tuple[str, ...] = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k3")

# Published clipping ranges, used when eps_low / eps_high are left unset. GRPO ranges apply to
# token ratios (clip-higher 0.28); GSPO's apply to length-normalised sequence ratios, which sit
# much closer to 1, hence ranges three orders of magnitude smaller.
DEFAULT_CLIP_RANGES: dict[str, tuple[float, float]] = {
    "grpo": (0.2, 0.28),
    "gspo": (3e-4, 4e-4),
}


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


@dataclass
class LossConfig:
    """The policy-optimisation objective (paper eq. 10-14) and its regularisers."""

    name: LossName = "sapo"
    """Objective: "sapo" (soft gate), "grpo" (token hard clip) or "gspo" (sequence hard clip)."""
    tau_pos: float = 1.0
    """SAPO gate temperature for tokens with positive advantage."""
    tau_neg: float = 1.05
    """SAPO gate temperature for tokens with zero or negative advantage (paper: > tau_pos)."""
    eps_low: float | None = None
    """Lower clip range of GRPO/GSPO (ratio floor 1 - eps_low); None: the algorithm's default."""
    eps_high: float | None = None
    """Upper clip range of GRPO/GSPO (ratio ceiling 1 + eps_high); None: the algorithm's default."""
    dual_clip_c: float | None = None
    """Dual clip for negative advantages (loss capped at -c*A, c > 1); None disables it."""
    agg: Aggregation = "seq-mean-token-mean"
    """How token losses become a scalar: per-sequence token mean then mean over sequences
    (paper eq. 5), mean over all tokens, or per-sequence token sum then mean over sequences."""
    logratio_clamp: float = 20.0
    """|log r| is clamped to this before exp so extreme ratios stay finite."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference policy (0 disables it)."""
    kl_estimator: KLEstimator = "k3"
    """KL estimator: "k1" (log ratio) or "k3" (low-variance, always >= 0)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (0 disables it)."""

    def __post_init__(self) -> None:
        self.validate()
        low, high = DEFAULT_CLIP_RANGES.get(self.name, (None, None))
        if self.eps_low is None:
            self.eps_low = low
        if self.eps_high is None:
            self.eps_high = high

    def validate(self) -> None:
        _check_choice("loss.name", self.name, LOSS_NAMES)
        _check_choice("loss.agg", self.agg, AGGREGATIONS)
        _check_choice("loss.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        for key in ("tau_pos", "tau_neg", "logratio_clamp"):
            _check_positive(f"loss.{key}", getattr(self, key))
        for key in ("eps_low", "eps_high"):
            value = getattr(self, key)
            if value is not None:
                _check_positive(f"loss.{key}", value)
        if self.eps_low is not None and self.eps_low >= 1:
            raise ConfigError(f"loss.eps_low must be < 1 (the ratio floor is 1 - eps_low), got {self.eps_low}")
        if self.dual_clip_c is not None and not self.dual_clip_c > 1:
            raise ConfigError(f"loss.dual_clip_c must be > 1 or unset, got {self.dual_clip_c}")
        for key in ("kl_coef", "entropy_coef"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"loss.{key} must be a number >= 0, got {value!r}")

    def replace(self, **changes) -> "LossConfig":
        return dataclasses.replace(self, **changes)


def _check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key} must be a number > 0, got {value!r}")


@dataclass
class ParallelConfig:
    """How the model is split over ranks. Data parallelism takes the ranks that remain."""

    tp: int = 1
    """Tensor-parallel size (attention heads, MLP width and vocabulary are split)."""
    pp: int = 1
    """Pipeline-parallel size (layers are split into stages)."""
    ep: int = 1
    """Expert-parallel size (MoE experts are split)."""
    etp: int | None = None
    """Tensor-parallel size inside each expert; None: 1 when ep > 1, else tp."""
    sequence_parallel: bool | None = None
    """Split activations along the sequence between TP ranks; None: on whenever tp > 1
    (Megatron's MoE layers require it under TP)."""

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "ep"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{key} must be an integer >= 1, got {value!r}")
        if self.etp is None:
            self.etp = 1 if self.ep > 1 else self.tp
        elif isinstance(self.etp, bool) or not isinstance(self.etp, int) or self.etp < 1:
            raise ConfigError(f"parallel.etp must be an integer >= 1 or unset, got {self.etp!r}")
        if self.sequence_parallel is None:
            self.sequence_parallel = self.tp > 1
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1")

    def data_parallel_size(self, world_size: int) -> int:
        """Ranks left for data parallelism; errors name the sizes that do not divide."""
        model = self.tp * self.pp
        if world_size % model:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {model}")
        expert = self.etp * self.ep * self.pp
        if world_size % expert:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.etp * parallel.ep * parallel.pp = {expert}")
        return world_size // model


@dataclass
class RouterConfig:
    """MoE router settings. RL defaults: no auxiliary loss, no expert-bias updates, fp32 router,
    routing replay available (for R2/R3) with router fusion off (fusion bypasses replay)."""

    routing_replay: bool = True
    """Create Megatron RouterReplay hooks so routes can be recorded and replayed."""
    aux_loss_coeff: float = 0.0
    """Load-balancing auxiliary loss weight (0: off, the RL default)."""
    expert_bias: bool = False
    """Aux-loss-free balancing by a per-expert bias updated during training."""
    bias_update_rate: float = 1e-3
    """Update rate of that bias, when enabled."""
    dtype: Literal["fp32", "fp64"] = "fp32"
    """Precision of the router's logits and softmax."""

    def __post_init__(self) -> None:
        if not isinstance(self.aux_loss_coeff, (int, float)) or self.aux_loss_coeff < 0:
            raise ConfigError(f"router.aux_loss_coeff must be a number >= 0, got {self.aux_loss_coeff!r}")
        _check_positive("router.bias_update_rate", self.bias_update_rate)
        _check_choice("router.dtype", self.dtype, ("fp32", "fp64"))


LR_DECAY_STYLES: tuple[str, ...] = ("constant", "linear", "cosine")


@dataclass
class OptimizerConfig:
    """Adam with decoupled weight decay, gradient clipping and a learning-rate schedule."""

    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of a linear or cosine decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.999
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam denominator epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to ``lr``."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule after warm-up."""

    def __post_init__(self) -> None:
        _check_positive("optimizer.lr", self.lr)
        for key in ("min_lr", "weight_decay", "clip_grad", "adam_eps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"optimizer.{key} must be a number >= 0, got {value!r}")
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"optimizer.{key} must be in [0, 1), got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        _check_choice("optimizer.lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        if self.min_lr > self.lr:
            raise ConfigError(f"optimizer.min_lr ({self.min_lr}) must not exceed optimizer.lr ({self.lr})")
