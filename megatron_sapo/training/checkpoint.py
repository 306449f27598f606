"""Full-state training checkpoints: a resumed run continues exactly where the saved one stopped.

Layout under ``OUTPUT/checkpoints``::

    latest                    names the newest complete checkpoint ("step_00000004")
    step_00000004/
      model/                  the weights: a Megatron-Core torch_dist checkpoint, loadable at any layout
        hf_config.json        the model's HF architecture, when given (for conversion to HF)
      optimizer/              the optimizer state: a torch_dist checkpoint of its own
      scheduler.json          the learning-rate schedule (OptimizerParamScheduler state)
      rng/rank_00000.pt       per global rank: python, numpy, torch CPU/CUDA and TP-tracker RNG states
      trainer_state.json      step, weight version, data cursor, the caller's extras, parallel layout
      config.toml             the resolved run config, when given
      rollout_pipeline.pt     the caller's own files (``rank0_files``): the RL loop's groups generated
                              ahead of the trainer (``rollout/pipeline.py``)
    .step_00000006.partial/   a save in progress, or one a crash interrupted (the next save removes it)

Choices and why:

- Publication is atomic. Everything is written into ``.step_N.partial``, renamed to ``step_N``
  when complete; only then is ``latest`` replaced (temporary file + ``os.replace``), and only
  then are older checkpoints pruned. A process crash at any point leaves ``latest`` naming the
  previous or the new checkpoint, both complete. Readers follow ``latest`` and never list
  folders, so a partial folder, or one renamed in just before a crash, is never loaded.
- The optimizer state uses the DistributedOptimizer's "dp_reshardable" format: each rank
  writes its own slice of the flat Adam buffers, with no gather and no copy (the
  layout-independent formats gather every moment on every rank, too costly for 30B models;
  "fully_sharded_model_space" is refused by Megatron-Core 0.16's dist_checkpointing). As its
  name says, it reloads at another DP size: DP=2 -> DP=1 -> DP=2 gives back the Adam state bit
  for bit (measured with the layout check disabled).
- Loading needs the layout the checkpoint was saved at (TP, PP, EP, expert-TP, CP and DP, so the
  world size): RNG streams are per rank, and only the same layout continues the same run. A
  different layout is refused, naming the sizes that differ. The weights alone load at any
  layout (``convert.mcore_checkpoint.load_model(model, step_dir / "model")``), and
  ``megatron-sapo convert mcore-to-hf --mcore step_dir/model`` reads them when ``hf_config``
  was given.
- Saving leaves the run undisturbed: the RNG states captured on entry are put back on exit, so
  a run that saves draws the same random numbers as one that does not.
- Every call is collective over the default process group, like the dist_checkpointing calls
  it wraps. Rank 0 writes the shared files, every rank its own RNG file, so the folder must be
  on a filesystem all ranks see. After each phase the ranks exchange their errors, so a failure
  on one rank raises on all of them instead of leaving the others waiting in a collective.
- RNG files hold only tensors and plain values, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from megatron_sapo.convert.mcore_checkpoint import HF_CONFIG_FILE
from megatron_sapo.convert.output import partial_path, publish

LATEST_FILE = "latest"
MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
SCHEDULER_FILE = "scheduler.json"
RNG_DIR = "rng"
TRAINER_STATE_FILE = "trainer_state.json"
RUN_CONFIG_FILE = "config.toml"
FORMAT_VERSION = 1
STEP_DIR = re.compile(r"step_(\d{8})")
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, unreadable, or does not fit the model it is loaded into."""


@dataclass
class TrainerState:
    """What the RL loop needs, besides tensors, to continue a run where it stopped."""

    step: int
    """RL steps completed; the checkpoint folder is named after it."""
    weight_version: str | None = None
    """Weight version last pushed to the rollout engines, so a resumed run continues the sequence."""
    data_cursor: dict = field(default_factory=dict)
    """Where the prompt stream stands (epoch, position, ...), as the data loader reported it."""
    extra: dict = field(default_factory=dict)
    """Anything else the caller wants back on resume (JSON-serialisable)."""

    def validate(self) -> None:
        """Raise ValueError naming the field that cannot be saved."""
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"TrainerState.step must be an integer >= 0, got {self.step!r}")
        if self.weight_version is not None and not isinstance(self.weight_version, str):
            raise ValueError(
                f"TrainerState.weight_version must be a string or None, got {self.weight_version!r}")
        for name in ("data_cursor", "extra"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise ValueError(f"TrainerState.{name} must be a dict, got {type(value).__name__}")
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise ValueError(f"TrainerState.{name} is not JSON-serialisable: {err}") from None


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# -- saving -----------------------------------------------------------------------------------

def save_checkpoint(checkpoint_root: str | Path, state: TrainerState, model, optimizer, scheduler, *,
                    run_config_text: str | None = None, hf_config: dict | None = None,
                    keep_last: int | None = None, rank0_files: dict[str, bytes] | None = None) -> Path:
    """Collective: write ``checkpoint_root/step_{state.step:08d}`` and make it the latest.

    ``model`` is the (DDP-wrapped) Megatron model, ``optimizer`` the Megatron optimizer built on
    it, ``scheduler`` its ``OptimizerParamScheduler``. Rank 0's ``state`` is the one written.
    ``keep_last``: after publishing, keep this many checkpoints up to this step (this one
    included) and delete older ones; None keeps all. Checkpoints with a later step (left by a run
    that was resumed from an earlier one) are left alone. Replacing the checkpoint ``latest``
    names is refused: a crash midway would leave no complete latest checkpoint. ``rank0_files``:
    more files (name -> content) rank 0 writes into the checkpoint folder, published with it.
    """
    state.validate()
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)
                                  or keep_last < 1):
        raise ValueError(f"keep_last must be an integer >= 1 or None, got {keep_last!r}")
    rng = capture_rng_states()
    root = Path(checkpoint_root)
    final = root / step_dir_name(state.step)
    tmp = partial_path(final)
    _collectively(f"preparing {tmp}", lambda: _prepare(root, final, tmp), rank0_only=True)
    from megatron.core import dist_checkpointing

    model_sd = _unwrap(model).sharded_state_dict()
    dist_checkpointing.save(model_sd, str(tmp / MODEL_DIR))
    dist_checkpointing.save(_optimizer_sharded_state_dict(optimizer, model_sd, is_loading=False),
                            str(tmp / OPTIMIZER_DIR))
    record = _trainer_record(state, _layout(model))
    _collectively(f"writing {tmp}", lambda: _write_files(tmp, rng, record, scheduler.state_dict(),
                                                        run_config_text, hf_config, rank0_files or {}))
    _collectively(f"publishing {final}", lambda: _publish(root, tmp, final, keep_last), rank0_only=True)
    restore_rng_states(rng)  # whatever saving drew from the generators is undone
    return final


def _prepare(root: Path, final: Path, tmp: Path) -> None:
    if (root / LATEST_FILE).exists() and _read_pointer(root) == final.name:
        raise FileExistsError(
            f"{final} is the latest checkpoint; replacing it in place could leave none complete")
    for stale in root.glob(".step_*.partial"):  # from a save that crashed
        shutil.rmtree(stale)
    for part in (MODEL_DIR, OPTIMIZER_DIR, RNG_DIR):
        (tmp / part).mkdir(parents=True)


def _write_files(tmp: Path, rng: dict, record: dict, scheduler_state: dict, run_config_text: str | None,
                 hf_config: dict | None, rank0_files: dict[str, bytes]) -> None:
    torch.save(rng, tmp / RNG_DIR / _rng_file_name(dist.get_rank()))
    if dist.get_rank() != 0:
        return
    (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler_state, indent=2))
    (tmp / TRAINER_STATE_FILE).write_text(json.dumps(record, indent=2))
    if run_config_text is not None:
        (tmp / RUN_CONFIG_FILE).write_text(run_config_text)
    if hf_config is not None:
        (tmp / MODEL_DIR / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
    for name, content in rank0_files.items():
        (tmp / name).write_bytes(content)


def _publish(root: Path, tmp: Path, final: Path, keep_last: int | None) -> None:
    # An existing `final` is a checkpoint renamed in just before a crash: `latest` never named it.
    publish(tmp, final)
    _write_pointer(root, final.name)
    if keep_last is not None:
        _prune(root, int(STEP_DIR.fullmatch(final.name).group(1)), keep_last)


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.partial"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST_FILE)


def _prune(root: Path, step: int, keep_last: int) -> None:
    older = sorted(s for s in (_step_of(p) for p in root.iterdir()) if s is not None and s < step)
    for old in older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(root / step_dir_name(old))


def _step_of(path: Path) -> int | None:
    match = STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


# -- finding and loading ----------------------------------------------------------------------

def find_latest(checkpoint_root: str | Path) -> Path | None:
    """The checkpoint ``checkpoint_root/latest`` names; None when no checkpoint was published yet."""
    root = Path(checkpoint_root)
    if not (root / LATEST_FILE).exists():
        return None
    path = root / _read_pointer(root)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise CheckpointError(f"{root / LATEST_FILE} names {path.name}, but {path} is missing or incomplete")
    return path


def weights_dir(path: str | Path) -> Path:
    """The Megatron weights in ``path``: a folder written by ``convert hf-to-mcore`` or
    ``save_model``, a training checkpoint (its ``model/``), or a run's checkpoints folder (the
    latest checkpoint's ``model/``)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / LATEST_FILE).exists():
        path = find_latest(path)
    if (path / TRAINER_STATE_FILE).exists():
        path = path / MODEL_DIR
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is not a Megatron checkpoint (no .metadata): expected a folder written by "
                              "`megatron-sapo convert hf-to-mcore`, a training checkpoint (step_N) or a "
                              "run's checkpoints folder")
    return path


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> TrainerState:
    """Collective: restore the model, optimizer, LR schedule and RNG states saved in ``path``.

    ``model``, ``optimizer`` and ``scheduler`` are freshly built at the layout the checkpoint was
    saved at. Returns the trainer state the run saved with it.
    """
    path = Path(path)
    record = _read_record(path)
    _check_layout(path, record["layout"], _layout(model))
    if scheduler.num_steps != 0:
        raise ValueError(
            f"the scheduler has already taken {scheduler.num_steps} steps; load into a fresh one")
    rng_file = path / RNG_DIR / _rng_file_name(dist.get_rank())
    rng = _collectively(f"reading {rng_file}", lambda: torch.load(rng_file, weights_only=True))
    from megatron.core import dist_checkpointing

    module = _unwrap(model)
    # With fp32 weights the optimizer's main parameters are views of the model's parameters,
    # which autograd forbids copying into outside no_grad.
    with torch.no_grad():
        module.load_state_dict(dist_checkpointing.load(module.sharded_state_dict(), str(path / MODEL_DIR)))
        optimizer_sd = _optimizer_sharded_state_dict(optimizer, module.sharded_state_dict(), is_loading=True)
        optimizer.load_state_dict(dist_checkpointing.load(optimizer_sd, str(path / OPTIMIZER_DIR)))
    _restore_torch_adam_steps(optimizer)
    scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text()))
    restore_rng_states(rng)  # last: loading may draw from the generators
    return TrainerState(step=record["step"], weight_version=record["weight_version"],
                        data_cursor=record["data_cursor"], extra=record["extra"])


def _read_pointer(root: Path) -> str:
    pointer = root / LATEST_FILE
    name = pointer.read_text().strip()
    if not STEP_DIR.fullmatch(name):
        raise CheckpointError(f"{pointer} holds {name!r}, not a checkpoint folder name like step_00000001")
    return name


def _read_record(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if (path / LATEST_FILE).exists():
        raise CheckpointError(
            f"{path} is a checkpoints folder, not a checkpoint; load find_latest({str(path)!r})")
    try:
        record = json.loads((path / TRAINER_STATE_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} has no {TRAINER_STATE_FILE}: not a complete megatron-sapo checkpoint") from None
    if record.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path / TRAINER_STATE_FILE}: format {record.get('format')!r} is not "
                              f"{FORMAT_VERSION}, the one this version reads")
    return record


def _check_layout(path: Path, saved: dict, current: dict) -> None:
    differ = [f"{key.upper()} {saved.get(key)} -> {value}"
              for key, value in current.items() if saved.get(key) != value]
    if differ:
        raise CheckpointError(
            f"{path} was saved at a different parallel layout ({', '.join(differ)}); a full-state resume "
            f"needs the same layout. Its weights alone load at any layout from {path / MODEL_DIR}.")


# -- model, optimizer and layout ----------------------------------------------------------------

def _unwrap(model):
    """The Megatron module inside DDP wrappers: its parameter names are the checkpoint's keys."""
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel

    while isinstance(model, _BaseDataParallel):
        model = model.module
    return model


def _optimizer_sharded_state_dict(optimizer, model_sd: dict, *, is_loading: bool) -> dict:
    _give_unstepped_torch_adam_zero_state(optimizer)
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA)


def _torch_adams(optimizer) -> list[torch.optim.Optimizer]:
    """The torch Adam optimizers inside a Megatron optimizer (its choice without TransformerEngine
    or Apex); their per-parameter ``step`` needs the two work-arounds below."""
    inners = (part.optimizer for part in getattr(optimizer, "chained_optimizers", [optimizer]))
    return [inner for inner in inners if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))]


def _give_unstepped_torch_adam_zero_state(optimizer) -> None:
    """Megatron-Core 0.16 reads a torch Adam's step from its per-parameter state, which a fresh
    optimizer does not have yet, so building the state dict to load into (or to save before the
    first step) fails. Zero moments at step 0 are where torch Adam starts anyway."""
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                if not adam.state[param]:
                    adam.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                         "exp_avg_sq": torch.zeros_like(param)}


def _restore_torch_adam_steps(optimizer) -> None:
    """Megatron-Core 0.16 loads the saved step into a torch Adam's param groups, then overwrites
    the per-parameter step with the placeholder's from the state dict it loaded into; put the
    saved one back."""
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                adam.state[param]["step"] = torch.tensor(float(group["step"]))


def _layout(model) -> dict:
    config = _unwrap(model).config
    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    cp = config.context_parallel_size
    world = dist.get_world_size()
    return {"tp": tp, "pp": pp, "ep": config.expert_model_parallel_size,
            "etp": config.expert_tensor_parallel_size or tp, "cp": cp, "dp": world // (tp * pp * cp)}


def _trainer_record(state: TrainerState, layout: dict) -> dict:
    return {"format": FORMAT_VERSION, **asdict(state), "layout": layout}


# -- RNG states -------------------------------------------------------------------------------

def _rng_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def capture_rng_states() -> dict:
    """This rank's random generators: python, numpy, torch CPU, CUDA (when present) and the
    tensor-parallel tracker's named states, as tensors and plain values."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    version, internal, gauss_next = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    if numpy_state["bit_generator"] != "MT19937":
        raise CheckpointError(
            f"numpy's global generator is {numpy_state['bit_generator']}; only MT19937 is saved")
    tracker = get_cuda_rng_tracker().get_states()
    generators = [name for name, value in tracker.items() if not torch.is_tensor(value)]
    if generators:
        raise CheckpointError(f"RNG tracker states {generators} are generator objects (CUDA-graph-safe RNG), "
                              "which checkpoints do not save")
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": numpy_state["state"]["pos"], "has_gauss": numpy_state["has_gauss"],
                  "gauss": numpy_state["gauss"]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {name: state.clone() for name, state in tracker.items()},
    }


def restore_rng_states(states: dict) -> None:
    """Put back what ``capture_rng_states`` returned."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    python = states["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    numpy = states["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
                         "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]})
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        if not torch.cuda.is_available():
            raise CheckpointError("the checkpoint holds CUDA RNG states but CUDA is not available")
        torch.cuda.set_rng_state(states["cuda"])
    get_cuda_rng_tracker().set_states({name: state.clone() for name, state in states["tracker"].items()})


# -- agreement between ranks ------------------------------------------------------------------

def _collectively(what: str, work: Callable[[], object], *, rank0_only: bool = False):
    """Run ``work`` (on rank 0 only, or on every rank), then raise on every rank if it failed on any.

    Returns what ``work`` returned (None where it did not run)."""
    error = result = None
    if not rank0_only or dist.get_rank() == 0:
        try:
            result = work()
        except Exception as err:  # reported to the other ranks, then re-raised
            error = err
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
    if failed:
        rank, report = failed[0]
        raise CheckpointError(f"{what} failed on rank {rank}: {report}")
    return result


__all__ = ["CheckpointError", "TrainerState", "capture_rng_states", "find_latest", "load_checkpoint",
           "restore_rng_states", "save_checkpoint", "step_dir_name"]
