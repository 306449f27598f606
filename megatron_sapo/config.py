"""Typed configuration sections of a training run.

Each section is a dataclass with one docstring per field and its own validation, so an error
names the offending key (``loss.tau_neg must be > 0``). Defaults live here and nowhere else.
``RunConfig`` gathers the sections of one run (TOML tables of the same names) and checks what
involves several of them; :mod:`megatron_sapo.config_file` reads and writes the TOML file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

from megatron_sapo.errors import InputError


LossName = Literal["sapo", "grpo", "gspo"]
Aggregation = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"]
KLEstimator = Literal["k1", "k3"]
BehaviorLogprobs = Literal["recompute", "rollout"]
RolloutCorrection = Literal["none", "tis", "mis", "icepop"]

LOSS_NAMES: tuple[str, ...] = get_args(LossName)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
BEHAVIOR_LOGPROBS: tuple[str, ...] = get_args(BehaviorLogprobs)
ROLLOUT_CORRECTIONS: tuple[str, ...] = get_args(RolloutCorrection)

# Published clipping ranges, used when eps_low / eps_high are left unset. GRPO ranges apply to
# token ratios (clip-higher 0.28); GSPO's apply to length-normalised sequence ratios, which sit
# much closer to 1, hence ranges three orders of magnitude smaller.
DEFAULT_CLIP_RANGES: dict[str, tuple[float, float]] = {
    "grpo": (0.2, 0.28),
    "gspo": (3e-4, 4e-4),
}


class ConfigError(InputError):
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
    behavior_logprobs: BehaviorLogprobs = "recompute"
    """The behaviour policy's log-probs (the ratio's denominator): "recompute" runs the trainer's
    forward over the step's rows before the updates; "rollout" takes the log-probs the servers
    returned and skips that pass (no rollout correction then: it compares the two)."""
    rollout_correction: RolloutCorrection = "none"
    """Correction for the servers sampling from a different policy than the trainer's (kernels,
    precision, stale weights), from ``rho = exp(old - rollout)`` per token: "tis" truncated
    importance weights min(rho, high); "mis" masks whole sequences whose geometric-mean
    ratio leaves [low, high] and weights the rest by it; "icepop" masks tokens whose rho leaves
    [low, high] and weights the rest by rho (``algo/correction.py``)."""
    rollout_correction_low: float = 0.5
    """Lower end of the band of "mis" and "icepop" (>= 0)."""
    rollout_correction_high: float = 2.0
    """Upper end of their band, and the truncation of "tis" (> rollout_correction_low)."""
    mask_truncated: bool = False
    """Responses cut at ``rollout.max_new_tokens`` (finish reason "length") leave the loss and its
    normaliser: an unfinished answer's reward says little about its tokens."""

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
        for key in ("kl_coef", "entropy_coef", "rollout_correction_low"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"loss.{key} must be a number >= 0, got {value!r}")
        _check_bool("loss.mask_truncated", self.mask_truncated)
        _check_choice("loss.behavior_logprobs", self.behavior_logprobs, BEHAVIOR_LOGPROBS)
        _check_choice("loss.rollout_correction", self.rollout_correction, ROLLOUT_CORRECTIONS)
        _check_positive("loss.rollout_correction_high", self.rollout_correction_high)
        if not self.rollout_correction_low < self.rollout_correction_high:
            raise ConfigError(f"loss.rollout_correction_low = {self.rollout_correction_low} must be below "
                              f"loss.rollout_correction_high = {self.rollout_correction_high}")
        if self.behavior_logprobs == "rollout" and self.rollout_correction != "none":
            raise ConfigError(f'loss.rollout_correction = "{self.rollout_correction}" compares the trainer\'s '
                              'log-probs with the servers\', which loss.behavior_logprobs = "rollout" does not compute; '
                              'use "recompute" or rollout_correction = "none"')

    def replace(self, **changes) -> "LossConfig":
        return dataclasses.replace(self, **changes)


def _check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key} must be a number > 0, got {value!r}")


RecomputeMode = Literal["none", "selective", "full"]
RECOMPUTE_MODES: tuple[str, ...] = get_args(RecomputeMode)
RecomputeMethod = Literal["uniform", "block"]
RECOMPUTE_METHODS: tuple[str, ...] = get_args(RecomputeMethod)


@dataclass
class ParallelConfig:
    """How the model is split over ranks, and which activations are recomputed rather than
    kept. Data parallelism takes the ranks that remain."""

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
    recompute: RecomputeMode = "none"
    """Activation recompute, trading backward compute for memory: "none" keeps every
    activation; "selective" recomputes the core attention (Megatron's default selective module:
    it drops the score matrix of the local spec's unfused attention; TransformerEngine's fused
    attention keeps none, so there it saves little); "full" keeps only the inputs of chunks of
    layers and recomputes the layers in backward (see recompute_method)."""
    recompute_method: RecomputeMethod = "uniform"
    """With recompute = "full": "uniform" splits each pipeline stage's layers into chunks of
    recompute_num_layers layers, each recomputed; "block" recomputes the first recompute_num_layers
    layers of each stage and keeps the other layers' activations."""
    recompute_num_layers: int = 1
    """With recompute = "full": layers per recomputed chunk ("uniform"; must divide the layers
    of a stage) or layers recomputed per stage ("block"; at most the layers of a stage)."""

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
        _check_choice("parallel.recompute", self.recompute, RECOMPUTE_MODES)
        _check_choice("parallel.recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        _check_int("parallel.recompute_num_layers", self.recompute_num_layers, 1)

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


LRDecayStyle = Literal["constant", "linear", "cosine"]
LR_DECAY_STYLES: tuple[str, ...] = get_args(LRDecayStyle)


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
    lr_decay_style: LRDecayStyle = "constant"
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


# ----------------------------------------------------------------------------------------------
# The sections of a training run, and the TOML file that holds them.
# ----------------------------------------------------------------------------------------------

# Models built from a config with no download (megatron_sapo.models.tiny); kept here as names so
# that loading a config does not import torch.
BuiltinModel = Literal["tiny-qwen3-moe", "tiny-qwen3-vl-moe"]
BUILTIN_MODELS: tuple[str, ...] = get_args(BuiltinModel)
VISION_BUILTIN_MODELS: tuple[str, ...] = ("tiny-qwen3-vl-moe",)
"""The built-in models that read images."""
ParamsDtype = Literal["fp32", "bf16"]
PARAMS_DTYPES: tuple[str, ...] = get_args(ParamsDtype)
SERVED_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
"""SGLang's ``--dtype`` for each ``model.params_dtype``: servers hold the weights as trained."""
TransformerImpl = Literal["auto", "local", "transformer_engine"]
TRANSFORMER_IMPLS: tuple[str, ...] = get_args(TransformerImpl)
RolloutMode = Literal["colocated", "disaggregated"]
ROLLOUT_MODES: tuple[str, ...] = get_args(RolloutMode)
PartialRollout = Literal["wait", "abort", "continue"]
PARTIAL_ROLLOUTS: tuple[str, ...] = get_args(PartialRollout)
GroupFilter = Literal["none", "nonzero_std"]
GROUP_FILTERS: tuple[str, ...] = get_args(GroupFilter)
WeightSyncMethod = Literal["tensor", "distributed", "disk"]
WEIGHT_SYNC_METHODS: tuple[str, ...] = get_args(WeightSyncMethod)
RoutingReplayMode = Literal["none", "r2", "r3"]
ROUTING_REPLAY_MODES: tuple[str, ...] = get_args(RoutingReplayMode)


def _check_int(key: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _check_optional_int(key: str, value: object, minimum: int) -> None:
    if value is not None:
        _check_int(key, value, minimum)


def _check_bool(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


def _check_text(key: str, value: object, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a non-empty string, got {value!r}")


def _check_server_address(key: str, value: object) -> None:
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"{key} must be \"host:port\" with a port in 1..65535, got {value!r}")


@dataclass
class BuiltinModelConfig:
    """Changes to the built-in text model's config.json (``[model.builtin_config]``, or
    ``--set 'model.builtin_config={num_experts = 16}'``): a wider MoE whose routes flip more
    easily between the rollout and the update. Unset fields keep the built-in model's values
    (``models/tiny.py``: 4 layers, 4 experts, top-2)."""

    num_experts: int | None = None
    """Routed experts per MoE layer (>= 2)."""
    num_experts_per_tok: int | None = None
    """Experts each token is routed to (top-k; at most num_experts)."""
    num_hidden_layers: int | None = None
    """Decoder layers (>= 1)."""

    def __post_init__(self) -> None:
        _check_optional_int("model.builtin_config.num_experts", self.num_experts, 2)
        _check_optional_int("model.builtin_config.num_experts_per_tok", self.num_experts_per_tok, 1)
        _check_optional_int("model.builtin_config.num_hidden_layers", self.num_hidden_layers, 1)
        if None not in (self.num_experts, self.num_experts_per_tok) and self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"model.builtin_config.num_experts_per_tok = {self.num_experts_per_tok} exceeds "
                              f"model.builtin_config.num_experts = {self.num_experts}")

    def overrides(self) -> dict[str, int]:
        """The fields that are set, as config.json keys and values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass
class ModelConfig:
    """The policy model: a Hugging Face checkpoint folder, or a built-in model made from a config."""

    hf_dir: str | None = None
    """Hugging Face checkpoint folder (config.json, safetensors, tokenizer)."""
    builtin: BuiltinModel | None = None
    """Name of a model built from a config with no download ("tiny-qwen3-moe", or the
    vision-language "tiny-qwen3-vl-moe"); it is saved, with the tiny character tokenizer (and
    the image processor), into the run's output folder."""
    builtin_config: BuiltinModelConfig | None = None
    """Changes to the config of the built-in text model ("tiny-qwen3-moe"), e.g. more experts;
    unset: the model as it is. The run's ``start_model/config.json`` holds the result."""
    params_dtype: ParamsDtype = "bf16"
    """Precision of the trained parameters ("fp32" for CPU demos, "bf16" on GPUs)."""
    transformer_impl: TransformerImpl = "auto"
    """Megatron layer spec: "transformer_engine" (fused kernels, grouped expert GEMM; needs a
    CUDA device and the transformer_engine package, an error where either is missing), "local"
    (plain torch modules, runs anywhere), or "auto": TransformerEngine where both are present,
    else local. Megatron checkpoints are written with the spec's keys; load them with the same."""

    def __post_init__(self) -> None:
        if (self.hf_dir is None) == (self.builtin is None):
            raise ConfigError("model needs exactly one of model.hf_dir and model.builtin")
        _check_text("model.hf_dir", self.hf_dir, optional=True)
        if self.builtin is not None:
            _check_choice("model.builtin", self.builtin, BUILTIN_MODELS)
        if self.builtin_config is not None:
            if not isinstance(self.builtin_config, BuiltinModelConfig):
                raise ConfigError(f"model.builtin_config must be a table, got {self.builtin_config!r}")
            if self.builtin is None or self.builtin in VISION_BUILTIN_MODELS:
                raise ConfigError(f"model.builtin_config changes the built-in text model; it needs model.builtin = "
                                  f"\"tiny-qwen3-moe\", not {self.builtin or self.hf_dir!r}")
        _check_choice("model.params_dtype", self.params_dtype, PARAMS_DTYPES)
        _check_choice("model.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)

    @property
    def builtin_overrides(self) -> dict[str, int]:
        """The config.json fields ``builtin_config`` sets ({} without one)."""
        return self.builtin_config.overrides() if self.builtin_config else {}


@dataclass
class RolloutConfig:
    """How responses are sampled: SGLang servers, sampling parameters, weight synchronisation."""

    mode: RolloutMode = "colocated"
    """"colocated": the trainer starts its own SGLang servers on the training machines;
    "disaggregated": servers already run elsewhere, listed in ``servers``."""
    servers: list[str] = dataclasses.field(default_factory=list)
    """Addresses ("host:port") of running SGLang servers; required iff mode is "disaggregated"."""
    num_servers: int = 1
    """SGLang servers the trainer starts in colocated mode."""
    server_tp: int = 1
    """Tensor-parallel size of each colocated SGLang server."""
    group_size: int = 8
    """G: responses sampled per prompt; advantages are normalised within these groups."""
    prompts_per_step: int = 32
    """Prompts per RL step (the rollout batch holds prompts_per_step * group_size responses)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: the full distribution, as the policy gradient assumes)."""
    max_new_tokens: int = 1024
    """Longest response; longer ones are cut and finish with reason "length"."""
    sampling_seed: int | None = None
    """Base seed of sampling; each response's seed is derived from it, the step and the sample's
    index, so a rerun samples the same responses. Unset: unseeded sampling."""
    weight_sync: WeightSyncMethod = "tensor"
    """How new weights reach the servers: serialised tensors over HTTP ("tensor"), a broadcast
    in a process group shared with the servers ("distributed"), or a saved checkpoint ("disk")."""
    bucket_mb: int = 512
    """Size of each weight-sync bucket in MiB (larger: fewer requests, more memory)."""
    server_args: list[str] = dataclasses.field(default_factory=list)
    """Extra command-line arguments for colocated SGLang servers (e.g. ["--mem-fraction-static", "0.5"])."""
    startup_timeout_s: float = 600.0
    """Seconds to wait for a server to become healthy: at start, and for a disaggregated server
    that stopped answering to come back (its node's supervisor restarts it)."""
    request_timeout_s: float = 600.0
    """Seconds before one generate or weight-update request is abandoned."""
    max_retries: int = 3
    """Retries of a failed request before the step fails."""
    release_memory_during_train: bool = False
    """Colocated on GPUs: have SGLang release its KV cache and weights while the trainer runs
    (SGLang ``--enable-memory-saver``), resume the weights before the sync and the cache after."""
    filter_groups: GroupFilter = "none"
    """Dynamic sampling (DAPO): "nonzero_std" drops the groups whose rewards are all equal (their
    advantages are all 0) and samples more prompts, up to ``max_sampling_rounds`` rounds of
    ``prompts_per_step``, until ``prompts_per_step`` groups are left to train on; if the rounds
    run out, dropped groups fill the batch and leave the loss."""
    max_sampling_rounds: int = 3
    """Rounds of ``prompts_per_step`` prompts one step may sample under ``filter_groups``."""
    overlong_buffer: int = 0
    """DAPO's soft overlong penalty: a response longer than ``max_new_tokens - overlong_buffer``
    loses ``overlong_penalty`` x (its excess / overlong_buffer) of its reward, up to the whole
    penalty at ``max_new_tokens`` (0: off)."""
    overlong_penalty: float = 1.0
    """The largest penalty of the overlong buffer (subtracted from the reward)."""
    max_staleness: int = 0
    """k: the servers may generate the groups of step n with the weights of step n - 1 - k at
    the oldest, so with k >= 1 they generate the next steps' groups while the trainer trains
    (0: generate, then train, strictly in turn). See ``rollout/pipeline.py``."""
    partial: PartialRollout = "wait"
    """What a weight sync does to generation in flight (k >= 1): "wait" lets it finish first
    (each step's groups come from one defined weight version: runs are reproducible); "abort"
    pauses the servers, drops the requests in flight and samples them again under the new
    weights; "continue" pauses, syncs and continues them from their prefix, each token keeping
    the version and log-prob it was sampled with. Neither of the last two waits, and neither is
    reproducible (which requests the sync interrupts depends on timing)."""

    def __post_init__(self) -> None:
        _check_choice("rollout.mode", self.mode, ROLLOUT_MODES)
        if not isinstance(self.servers, list):
            raise ConfigError(f"rollout.servers must be a list of \"host:port\" strings, got {self.servers!r}")
        for i, address in enumerate(self.servers):
            _check_server_address(f"rollout.servers[{i}]", address)
        if self.mode == "disaggregated" and not self.servers:
            raise ConfigError(
                'rollout.servers must list at least one "host:port" when rollout.mode is "disaggregated"')
        if self.mode == "colocated" and self.servers:
            raise ConfigError('rollout.servers is only used when rollout.mode is "disaggregated"')
        for key, minimum in (("num_servers", 1), ("server_tp", 1), ("group_size", 2), ("prompts_per_step", 1),
                             ("max_new_tokens", 1), ("bucket_mb", 1), ("max_retries", 0)):
            _check_int(f"rollout.{key}", getattr(self, key), minimum)
        _check_optional_int("rollout.sampling_seed", self.sampling_seed, 0)
        for key in ("temperature", "startup_timeout_s", "request_timeout_s"):
            _check_positive(f"rollout.{key}", getattr(self, key))
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p!r}")
        _check_choice("rollout.weight_sync", self.weight_sync, WEIGHT_SYNC_METHODS)
        if not isinstance(self.server_args, list) or not all(isinstance(a, str) for a in self.server_args):
            raise ConfigError(f"rollout.server_args must be a list of strings, got {self.server_args!r}")
        if not isinstance(self.release_memory_during_train, bool):
            raise ConfigError(f"rollout.release_memory_during_train must be true or false, "
                              f"got {self.release_memory_during_train!r}")
        if self.release_memory_during_train and self.mode != "colocated":
            raise ConfigError('rollout.release_memory_during_train needs rollout.mode = "colocated"')
        _check_int("rollout.max_staleness", self.max_staleness, 0)
        _check_choice("rollout.filter_groups", self.filter_groups, GROUP_FILTERS)
        _check_int("rollout.max_sampling_rounds", self.max_sampling_rounds, 1)
        _check_int("rollout.overlong_buffer", self.overlong_buffer, 0)
        _check_positive("rollout.overlong_penalty", self.overlong_penalty)
        if self.overlong_buffer >= self.max_new_tokens:
            raise ConfigError(f"rollout.overlong_buffer = {self.overlong_buffer} must be below rollout.max_new_tokens "
                              f"= {self.max_new_tokens} (the penalty starts at max_new_tokens - overlong_buffer)")
        _check_choice("rollout.partial", self.partial, PARTIAL_ROLLOUTS)
        if self.max_staleness and self.release_memory_during_train:
            raise ConfigError(f"rollout.max_staleness = {self.max_staleness} overlaps generation with training, "
                              "but rollout.release_memory_during_train frees the servers' memory while the trainer "
                              "runs, so they cannot generate then; set one of them off")
        if self.partial != "wait" and not self.max_staleness:
            raise ConfigError(f'rollout.partial = "{self.partial}" needs rollout.max_staleness >= 1 (with 0 nothing '
                              "is generating when the weights sync)")

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclass
class TrainConfig:
    """The RL loop: how many steps, how each rollout batch is split into updates, routing replay."""

    steps: int = 100
    """Total RL steps (one rollout batch each)."""
    seed: int = 0
    """Seed of parameter initialisation (built-in models) and of anything random in training."""
    minibatches: int = 4
    """Optimizer updates per rollout batch (paper: 4); only the first one is on-policy."""
    micro_batch_size: int = 4
    """Sequences per forward/backward pass on one data-parallel rank when
    ``max_tokens_per_microbatch`` is 0 (gradient accumulation fills the rest of a minibatch)."""
    max_tokens_per_microbatch: int = 0
    """Token budget of one forward/backward pass (0: fixed ``micro_batch_size`` rows). Rows are
    grouped, longest first, into microbatches whose padded size (rows x their longest row, or
    the packed length) stays within it, and spread over data-parallel ranks by length. Must be
    at least ``max_seq_len``, since a row is never split."""
    pack_sequences: bool = False
    """Concatenate a microbatch's rows into one sequence (no padding between rows; THD with
    TransformerEngine, a block-diagonal causal mask otherwise)."""
    routing_replay: RoutingReplayMode = "none"
    """MoE routing replay: "r2" replays the routes of the old-log-prob forward in the updates;
    "r3" replays the routes the rollout engine returned (colocated servers are started with
    --enable-return-routed-experts; disaggregated ones must have been)."""
    max_seq_len: int = 2048
    """Longest prompt + response the trainer accepts (>= data.max_prompt_tokens + rollout.max_new_tokens)."""
    out_dir: str | None = None
    """Folder of this run's checkpoints, TensorBoard events and resolved config. Unset:
    ``runs/<config file name without .toml>``, filled in by ``load_config``."""
    sft_steps: int = 0
    """Supervised cold-start steps before RL on the worked pairs of the synthetic task's "sft"
    split (0: none)."""
    sft_batch_size: int = 64
    """Prompt-completion pairs per cold-start step."""
    sft_lr: float | None = None
    """Learning rate of the cold start; unset: optimizer.lr."""

    def __post_init__(self) -> None:
        for key, minimum in (("steps", 1), ("seed", 0), ("minibatches", 1), ("micro_batch_size", 1),
                             ("max_seq_len", 2), ("sft_steps", 0), ("sft_batch_size", 1),
                             ("max_tokens_per_microbatch", 0)):
            _check_int(f"train.{key}", getattr(self, key), minimum)
        _check_bool("train.pack_sequences", self.pack_sequences)
        if self.max_tokens_per_microbatch and self.max_tokens_per_microbatch < self.max_seq_len:
            raise ConfigError(
                f"train.max_tokens_per_microbatch = {self.max_tokens_per_microbatch} is smaller than the longest "
                f"row, train.max_seq_len = {self.max_seq_len} (a row is never split across microbatches)")
        _check_choice("train.routing_replay", self.routing_replay, ROUTING_REPLAY_MODES)
        _check_text("train.out_dir", self.out_dir, optional=True)
        if self.sft_lr is not None:
            _check_positive("train.sft_lr", self.sft_lr)

    # What routing_replay means for each stage of a step (the loop asks these, not the string).
    @property
    def replays_routes(self) -> bool:
        """The updates replay recorded routes (R2 or R3)."""
        return self.routing_replay != "none"

    @property
    def records_routes(self) -> bool:
        """R2: the old-log-prob pass records the routes the updates replay."""
        return self.routing_replay == "r2"

    @property
    def routes_from_rollout(self) -> bool:
        """R3: the servers return the experts they routed to, and the updates replay those."""
        return self.routing_replay == "r3"


@dataclass
class DataConfig:
    """Where prompts come from and how responses are scored."""

    train_path: str | None = None
    """Training prompts: a .jsonl file (one JSON object per line) or a .parquet file."""
    val_path: str | None = None
    """Validation prompts for evaluation, same format (optional)."""
    task: str | None = None
    """A built-in synthetic task (megatron_sapo.data.synthetic) instead of files; it has its own
    train and validation splits."""
    prompt_key: str = "prompt"
    """Field holding the prompt: a string (sent as one user message) or a list of
    {role, content} messages. Dots reach into nested objects ("extra.question")."""
    answer_key: str = "answer"
    """Field holding the reference answer (a string or a number) given to the reward function."""
    image_key: str = "images"
    """Field holding a problem's images: a list of image files (paths relative to the prompt
    file, or absolute; parquet may hold bytes). Rows without it are text-only; ``<image>`` in
    the prompt marks where each image goes (unmarked: before the first user message's text)."""
    system_prompt: str | None = None
    """System message placed before every prompt (prompts that carry their own are refused)."""
    reward: str | None = None
    """The reward function: a built-in name ("math", "exact_match"), "path/to/file.py:function"
    or "package.module:function", called as f(response, answer, fields) and returning a float or
    a dict with "score" and extra numbers (``data/rewards.py``). Unset: the synthetic task's own
    verifier when ``task`` is set, else "math"."""
    reward_timeout_s: float = 10.0
    """Seconds one reward call may take; slower calls score 0 and are counted."""
    reward_workers: int = 1
    """Processes scoring responses at once (a slow verifier does not serialise the step); with
    ``reward_url``, requests in flight at once."""
    reward_url: str | None = None
    """An HTTP service that scores responses instead of a function (a reward-model server):
    batches POSTed as JSON, ``data/remote_reward.py`` gives the format. ``reward_timeout_s`` is
    then per request."""
    reward_retries: int = 3
    """Retries of a failed request to ``reward_url`` before the step fails."""
    shuffle: bool = True
    """Reshuffle the training prompts every epoch."""
    seed: int = 0
    """Seed of the prompt order (epoch e uses a permutation drawn from (seed, e)) and of the
    synthetic task's problems."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this after the chat template are left out (and counted)."""

    def __post_init__(self) -> None:
        if (self.train_path is None) == (self.task is None):
            raise ConfigError("data needs exactly one of data.train_path and data.task")
        if self.task is not None and self.val_path is not None:
            raise ConfigError(
                "data.val_path is only used with data.train_path; a data.task has its own validation split")
        for key in ("train_path", "val_path", "task", "system_prompt", "reward"):
            _check_text(f"data.{key}", getattr(self, key), optional=True)
        for key in ("prompt_key", "answer_key", "image_key"):
            _check_text(f"data.{key}", getattr(self, key))
        _check_positive("data.reward_timeout_s", self.reward_timeout_s)
        _check_int("data.reward_workers", self.reward_workers, 1)
        _check_int("data.reward_retries", self.reward_retries, 0)
        _check_text("data.reward_url", self.reward_url, optional=True)
        if self.reward_url is not None:
            if not self.reward_url.startswith(("http://", "https://")):
                raise ConfigError(f"data.reward_url must start with http:// or https://, got {self.reward_url!r}")
            if self.reward is not None:
                raise ConfigError("data.reward and data.reward_url both name a reward; set one")
        _check_bool("data.shuffle", self.shuffle)
        _check_int("data.seed", self.seed, 0)
        _check_int("data.max_prompt_tokens", self.max_prompt_tokens, 1)
        # The task and reward names are checked against data/'s registries when a config is
        # loaded (data/checks.py): this module sits below data/ and imports nothing of it.

    @property
    def has_validation(self) -> bool:
        return self.task is not None or self.val_path is not None


@dataclass
class EvalSet:
    """One evaluation set (``[[eval.sets]]``): a prompt file scored by its own reward, reported
    as ``eval_<name>_avg_at_<k>`` (Pass@1 as the mean over k samples per problem) and
    ``eval_<name>_pass_at_<j>`` for j = 1, 2, 4, ... below k, and k (the unbiased estimator: a response
    counts as solved when its reward is above 0.5)."""

    name: str
    """Names the set's metrics: lowercase letters, digits and "_"."""
    path: str
    """A .jsonl or .parquet prompt file."""
    prompt_key: str | None = None
    """Its prompt field; unset: ``data.prompt_key``."""
    answer_key: str | None = None
    """Its answer field; unset: ``data.answer_key``."""
    reward: str = "math"
    """Its reward function, as ``data.reward`` names one."""
    samples: int = 4
    """k: responses sampled per problem."""
    max_new_tokens: int | None = None
    """Longest response; unset: rollout.max_new_tokens."""
    temperature: float = 1.0
    """Sampling temperature."""
    max_problems: int | None = None
    """Use only the first this many problems; unset: all."""

    def __post_init__(self) -> None:
        where = f"eval.sets[{self.name!r}]"
        if not isinstance(self.name, str) or not self.name or not all(c.islower() or c.isdigit() or c == "_"
                                                                     for c in self.name):
            raise ConfigError(f"eval.sets: name must be lowercase letters, digits and _, got {self.name!r}")
        _check_text(f"{where}.path", self.path)
        _check_text(f"{where}.reward", self.reward)
        for key in ("prompt_key", "answer_key"):
            _check_text(f"{where}.{key}", getattr(self, key), optional=True)
        _check_int(f"{where}.samples", self.samples, 1)
        _check_optional_int(f"{where}.max_new_tokens", self.max_new_tokens, 1)
        _check_positive(f"{where}.temperature", self.temperature)
        _check_optional_int(f"{where}.max_problems", self.max_problems, 1)


@dataclass
class EvalConfig:
    """Periodic evaluation: Pass@1 estimated as avg@k over the validation prompts, and any
    further sets (``sets``)."""

    every: int = 0
    """Evaluate every this many RL steps (and after the last one); 0 disables evaluation."""
    samples_per_problem: int = 16
    """k of avg@k: responses sampled per validation problem."""
    max_problems: int | None = None
    """Use only the first this many validation problems; unset: all."""
    temperature: float = 1.0
    """Sampling temperature of evaluation."""
    max_new_tokens: int | None = None
    """Longest evaluation response; unset: rollout.max_new_tokens."""
    sets: list[EvalSet] = dataclasses.field(default_factory=list)
    """More evaluation sets, each with its own file, reward and sampling (``[[eval.sets]]``)."""

    def __post_init__(self) -> None:
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"eval.sets: names must differ, got {names}")
        _check_int("eval.every", self.every, 0)
        _check_int("eval.samples_per_problem", self.samples_per_problem, 1)
        _check_optional_int("eval.max_problems", self.max_problems, 1)
        _check_positive("eval.temperature", self.temperature)
        _check_optional_int("eval.max_new_tokens", self.max_new_tokens, 1)


@dataclass
class CheckpointConfig:
    """Saving and loading Megatron checkpoints of the policy, optimizer and data cursor."""

    save_every: int = 0
    """Save every this many RL steps; 0: only at the end of the run."""
    keep_last: int = 2
    """Checkpoints kept in the output folder; older ones are deleted."""
    load_dir: str | None = None
    """Megatron weights to start the policy from instead of model.hf_dir's: a folder written by
    `megatron-sapo convert hf-to-mcore`, a training checkpoint (step_N) or a run's checkpoints
    folder (its latest). Read at any TP/PP/EP, each rank reading its own part. model.hf_dir still
    gives the tokenizer, the architecture and the servers' first weights; the trainer sends them
    its weights before the first step. A resumed run loads its own checkpoint instead."""

    def __post_init__(self) -> None:
        _check_int("checkpoint.save_every", self.save_every, 0)
        _check_int("checkpoint.keep_last", self.keep_last, 1)
        _check_text("checkpoint.load_dir", self.load_dir, optional=True)


@dataclass
class LoggingConfig:
    """Metrics: TensorBoard events and console lines."""

    tensorboard: bool = True
    """Write TensorBoard events under <out_dir>/tensorboard."""
    histogram_every: int = 10
    """Every this many steps (0: never) recompute the log-probs after the step's updates and store
    a sample of token ratios and per-sequence gate diagnostics in <out_dir>/diagnostics/ (read by
    `megatron-sapo diagnose`), with TensorBoard histograms of the same sample."""
    diagnostics_tokens: int = 65536
    """Response tokens sampled per histogram step, over all data-parallel replicas (6 bytes each
    in the step's file); the fractions of tokens where the gate engaged count every token."""
    diagnostics_sequences: int = 4096
    """Sequences sampled per histogram step, over all replicas (26 bytes each in the step's file)."""

    def __post_init__(self) -> None:
        _check_bool("logging.tensorboard", self.tensorboard)
        _check_int("logging.histogram_every", self.histogram_every, 0)
        _check_int("logging.diagnostics_tokens", self.diagnostics_tokens, 1)
        _check_int("logging.diagnostics_sequences", self.diagnostics_sequences, 1)


@dataclass(kw_only=True)
class RunConfig:
    """Everything one training run needs; each field is a TOML section of the same name."""

    model: ModelConfig
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    data: DataConfig
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks that involve more than one section."""
        samples, minibatches = self.rollout.samples_per_step, self.train.minibatches
        if samples % minibatches:
            raise ConfigError(
                f"rollout.prompts_per_step * rollout.group_size = {samples} is not divisible by "
                f"train.minibatches = {minibatches}")
        if self.loss.kl_coef > 0:
            raise ConfigError(f"loss.kl_coef = {self.loss.kl_coef}: the trainer computes no reference-policy "
                              "log-probs, which the KL term needs; set loss.kl_coef = 0")
        if self.loss.behavior_logprobs == "rollout" and self.train.records_routes:
            raise ConfigError('loss.behavior_logprobs = "rollout" skips the old-log-prob pass, which records the '
                              'routes train.routing_replay = "r2" replays; use "r3" (the rollout\'s routes) or '
                              '"recompute"')
        if self.train.replays_routes and not self.router.routing_replay:
            raise ConfigError(f"train.routing_replay = {self.train.routing_replay!r} needs router.routing_replay = true")
        longest = self.data.max_prompt_tokens + max(self.rollout.max_new_tokens, self.eval.max_new_tokens or 0)
        if self.train.max_seq_len < longest:
            raise ConfigError(
                f"train.max_seq_len = {self.train.max_seq_len} is shorter than data.max_prompt_tokens + "
                f"the longest response (rollout/eval max_new_tokens) = {longest}")
        budget, multiple = self.train.max_tokens_per_microbatch, self.parallel.tp if self.parallel.sequence_parallel else 1
        if budget and -(-self.train.max_seq_len // multiple) * multiple > budget:
            raise ConfigError(
                f"train.max_tokens_per_microbatch = {budget} is smaller than train.max_seq_len = "
                f"{self.train.max_seq_len} rounded up to the sequence-parallel multiple {multiple}")
        if self.eval.every and not self.data.has_validation and not self.eval.sets:
            raise ConfigError("eval.every > 0 needs validation prompts: set data.val_path, use a data.task or "
                              "add eval.sets")
        if self.train.sft_steps and self.data.task is None:
            raise ConfigError("train.sft_steps > 0 needs a data.task (the cold start uses its worked pairs)")

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel size at ``world_size`` ranks, checking that every step's prompts and
        every minibatch split evenly over the data-parallel ranks."""
        dp = self.parallel.data_parallel_size(world_size)
        if self.rollout.prompts_per_step % dp:
            raise ConfigError(
                f"rollout.prompts_per_step = {self.rollout.prompts_per_step} is not divisible by the "
                f"data-parallel size {dp} (world size {world_size})")
        per_minibatch = self.rollout.samples_per_step // self.train.minibatches
        if per_minibatch % dp:
            raise ConfigError(
                f"a minibatch of {per_minibatch} responses (prompts_per_step * group_size / minibatches) "
                f"does not split over the data-parallel size {dp}")
        return dp
