"""The one training loop of lctool, built on accelerate.

The same code runs in one process, under `accelerate launch` (DDP; FSDP for the forward/backward)
and under `torchrun`: accelerate wraps the model and reduces the gradients, this loop only takes
every world-th micro-batch. The caller decides what trains (`requires_grad`), what a batch is,
and, through hooks, the loss and per-step batch changes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time

import torch

from lctool.errors import LctoolError
from lctool.io.manifest import peak_rss_mb
from lctool.train import state as ckpt
from lctool.train.batches import process_stream
from lctool.train.config import TrainConfig, TrainResult

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped training after a checkpoint was saved (when a checkpoint_dir is set)."""

    def __init__(self, result: TrainResult):
        where = f"; checkpoint {result.checkpoint} (resume to continue)" if result.checkpoint else ""
        super().__init__(f"training interrupted at step {result.steps}{where}")
        self.result = result


def causal_lm_loss(model, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy; `labels` default to `input_ids` (-100 marks positions without loss)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    inputs.setdefault("labels", batch["input_ids"])
    return model(**inputs, use_cache=False).loss


def lr_multiplier(config: TrainConfig):
    def multiplier(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        span = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * shape

    return multiplier


def make_optimizer(named_parameters: list[tuple[str, torch.nn.Parameter]], config: TrainConfig):
    # Matrices decay; vectors (norms, biases) do not, the usual AdamW practice. A parameter whose name
    # contains a key of `lr_scales` trains at lr × that scale (the first key that matches).
    def scale_of(name: str) -> float:
        return next((scale for key, scale in config.lr_scales.items() if key in name), 1.0)

    groups = []
    for scale in dict.fromkeys([1.0, *config.lr_scales.values()]):
        chosen = [(n, p) for n, p in named_parameters if scale_of(n) == scale]
        groups += [{"params": [p for _, p in chosen if p.dim() >= 2], "weight_decay": config.weight_decay,
                    "lr": config.lr * scale},
                   {"params": [p for _, p in chosen if p.dim() < 2], "weight_decay": 0.0, "lr": config.lr * scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas, foreach=True)


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag checked between steps; a second signal stops at once."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class StepLog:
    """The JSONL log (one line per step and per evaluation), main process only."""

    def __init__(self, path: str | None, start_step: int, enabled: bool):
        self.file = None
        if not (path and enabled):
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = self._lines_up_to(path, start_step) if start_step else []
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.file.writelines(kept)
        self.file.flush()

    @staticmethod
    def _lines_up_to(path: str, step: int) -> list[str]:
        if not os.path.exists(path):
            return []
        kept = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
        return kept

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def _progress(config: TrainConfig, enabled: bool):
    if not (config.progress and enabled):
        return None
    from lctool.cli.common import progress

    return progress(transient=True)


def make_accelerator(config: TrainConfig):
    """accelerate on `config.device`: cpu is accelerate's cpu=True (also what makes it run several CPU
    processes, gloo, under torchrun or `accelerate launch`); cuda is accelerate's device for this
    process (its local rank under a launcher), cuda:N picks that GPU for a single process; mps is
    what accelerate picks on a Mac."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device = config.device
    if device.startswith("cuda:"):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise LctoolError(f"--device {device}: under a launcher each process takes its own GPU; pass --device cuda")
        torch.cuda.set_device(int(device.split(":")[1]))
    # accelerate keeps one mixed precision per process and refuses another; each lctool run (the Python
    # API may make several, with different dtypes) sets its own. The process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=config.mixed_precision, cpu=device == "cpu")


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _count_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if torch.is_tensor(mask) else int(batch["input_ids"].numel())


def train(model: torch.nn.Module, batches, config: TrainConfig, *, loss_fn=None, before_step=None, eval_fn=None,
          tag: dict | None = None, after_step=None, extra_state=None, sharded_ok: bool = False) -> TrainResult:
    """Train `model`'s parameters that require grad for `config.steps` optimizer steps.

    Hooks (keyword arguments win over the same fields of `config`):
      loss_fn(model, batch) -> scalar loss; default: causal LM cross-entropy on `labels`/`input_ids`.
        `model` is the accelerate-prepared model (call it, do not replace its modules).
      before_step(step, model, batch) -> batch; called per micro-batch with the 0-based optimizer step
        and the unwrapped model (e.g. to sample a RoPE scale and shift positions).
      eval_fn(model) -> dict | float; every `eval_every` steps on the main process, in eval mode, no grad.
      after_step(step, model): after each optimizer step (every process, the unwrapped model), e.g. to
        update state no optimizer reaches, such as PV-Tuning's discrete codes.
    `extra_state` (an object with state_dict() -> {name: tensor} and load_state_dict(dict)) holds what
    training changes outside the trainable parameters; it is saved with checkpoints and restored on resume.
    `tag` is stored with checkpoints and must match on resume (e.g. which base model was trained).
    Under FSDP only callers that pass `sharded_ok` run: they take the model to write from `trained_model`.
    The model is left in eval mode (on the CPU, see `_back_to_cpu`); with `TrainingInterrupted` (SIGINT/SIGTERM) after saving a checkpoint.
    """
    from accelerate.utils import set_seed

    loss_fn = loss_fn or config.loss_fn or causal_lm_loss
    before_step = before_step or config.before_step
    after_step = after_step or config.after_step
    extra_state = extra_state if extra_state is not None else config.extra_state
    eval_fn = eval_fn or config.eval_fn
    tag = dict(tag or {})
    if config.eval_every and eval_fn is None:
        raise ValueError("eval_every needs an eval_fn")
    accelerator = make_accelerator(config)
    set_seed(config.seed)

    sharded = is_sharded(accelerator)
    if sharded and not sharded_ok:
        raise LctoolError(f"{config.description} does not run under FSDP yet; launch it with DDP "
                          "(accelerate launch --multi_gpu) or in one process")
    if sharded and (config.checkpoint_every or config.resume):
        # Optimizer state is sharded under FSDP; lctool's resumable checkpoint holds full tensors.
        raise LctoolError("resumable checkpoints (--checkpoint-every, --resume) are not supported under FSDP")
    named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named_trainable:
        raise LctoolError("nothing to train: no parameter requires grad")
    restore_model = _training_mode(model, config.grad_checkpointing)
    optimizer = make_optimizer(named_trainable, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config))
    # The scheduler stays unprepared: accelerate would step it once per process.
    prepared, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(prepared)

    options = config.model_dump(mode="json")
    result = TrainResult(trainable_parameters=sum(p.numel() for _, p in named_trainable),
                         num_processes=accelerator.num_processes)
    start_step = _restore(accelerator, config, unwrapped, optimizer, scheduler, options, tag, result, extra_state)
    result.start_step = result.steps = start_step

    stream = process_stream(batches, config.batch_size, accelerator.process_index, accelerator.num_processes,
                            skip=start_step * config.grad_accum)
    log = StepLog(config.log_path, start_step, accelerator.is_main_process)
    bar = _progress(config, accelerator.is_main_process)
    parameters = [p for _, p in named_trainable]
    prepared.train()
    started = time.perf_counter()
    tokens = 0

    def checkpoint_state() -> dict:
        return {"options": options, "tag": tag, "losses": result.losses, "learning_rates": result.learning_rates,
                "evals": result.evals, "num_processes": accelerator.num_processes}

    def save(step: int) -> None:
        result.checkpoint = ckpt.save_checkpoint(accelerator, config.checkpoint_dir, step, unwrapped, optimizer,
                                                 scheduler, checkpoint_state(), config.keep_checkpoints,
                                                 extra=extra_state.state_dict() if extra_state is not None else None)

    try:
        with StopSignals() as signals, (bar or contextlib.nullcontext()):
            task = bar.add_task(config.description, total=config.steps, completed=start_step, info="") if bar else None
            for step in range(start_step, config.steps):
                step_loss, step_tokens = _one_step(accelerator, prepared, unwrapped, stream, step, config, loss_fn,
                                                   before_step)
                if step_loss is None:
                    accelerator.print(f"training data ran out after {step} steps")
                    break
                grad_norm = accelerator.clip_grad_norm_(parameters, config.max_grad_norm) if config.max_grad_norm else None
                optimizer.step()
                learning_rate = scheduler.get_last_lr()[0]
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if after_step is not None:
                    after_step(step, unwrapped)

                step_loss, stop = _agree(accelerator, step_loss, signals.requested)
                if not math.isfinite(step_loss):
                    raise LctoolError(f"the loss became {step_loss} at step {step + 1} (try a lower learning rate)")
                tokens += step_tokens * accelerator.num_processes
                result.losses.append(step_loss)
                result.learning_rates.append(learning_rate)
                result.steps = step + 1
                elapsed = time.perf_counter() - started
                record = {"step": step + 1, "loss": round(step_loss, 6), "lr": learning_rate,
                          "tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1), "elapsed_s": round(elapsed, 3)}
                if grad_norm is not None:
                    record["grad_norm"] = round(float(grad_norm), 5)
                log.write(record)
                if bar and ((step + 1) % config.log_every == 0 or step + 1 == config.steps):
                    bar.update(task, completed=step + 1,
                               info=f"loss {step_loss:.4f} · {tokens / elapsed:,.0f} tok/s")
                if config.eval_every and (step + 1) % config.eval_every == 0:
                    _evaluate(accelerator, prepared, unwrapped, eval_fn, step + 1, result, log)
                if stop:
                    if config.checkpoint_dir and not sharded:
                        save(step + 1)
                    result.interrupted = True
                    break
                if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                    save(step + 1)
    finally:
        log.close()
        result.wall_s = time.perf_counter() - started
        result.tokens = tokens
        result.tokens_per_s = tokens / result.wall_s if result.wall_s > 0 else 0.0
        result.peak_rss_mb = peak_rss_mb()
        restore_model()
        unwrapped.eval()
        if not sharded:
            _back_to_cpu(accelerator, unwrapped)
    if result.interrupted:
        raise TrainingInterrupted(result)
    if sharded:
        # Every process joins the gather; the main one receives full CPU tensors (the others an empty dict).
        result.full_state_dict = accelerator.get_state_dict(prepared)
    return result


def is_sharded(accelerator) -> bool:
    """FSDP: each process holds a shard of every parameter, so the trained model is not whole anywhere."""
    return accelerator.distributed_type.name == "FSDP"


def trained_model(model: torch.nn.Module, result: TrainResult, rebuild) -> torch.nn.Module | None:
    """The trained model, whole: `model` itself, or after FSDP training (whose model holds shards) on the
    main process a new `rebuild()` (the model as it was built before training) carrying the gathered
    weights; None on the other processes, which have nothing whole to write."""
    if result.full_state_dict is None:
        return model
    if not result.full_state_dict:
        return None
    whole = rebuild()
    whole.load_state_dict(result.full_state_dict)  # strict: the rebuilt model must be the trained one's twin
    return whole.eval()


def _back_to_cpu(accelerator, model) -> None:
    """A model trained on a GPU goes back to the CPU, where lctool's writers read tensors from; bitsandbytes
    models cannot move (their adapters are small, and safetensors copies them when saving)."""
    if accelerator.device.type != "cpu" and getattr(model, "hf_quantizer", None) is None:
        model.to("cpu")


def _training_mode(model, grad_checkpointing: bool):
    """Switch the KV cache off (and checkpointing on) for training; returns the undo, so that a model
    saved after training carries its original config."""
    model_config = getattr(model, "config", None)
    use_cache = getattr(model_config, "use_cache", None)
    if use_cache:
        model_config.use_cache = False
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def restore() -> None:
        if use_cache:
            model_config.use_cache = use_cache
        if grad_checkpointing:
            model.gradient_checkpointing_disable()

    return restore


def _restore(accelerator, config, unwrapped, optimizer, scheduler, options, tag, result, extra_state=None) -> int:
    if not (config.resume and config.checkpoint_dir):
        return 0
    folder = ckpt.latest_checkpoint(config.checkpoint_dir)
    if folder is None:
        accelerator.print(f"no checkpoint in {config.checkpoint_dir}: starting from step 0")
        return 0
    saved = ckpt.read_state(folder)
    ckpt.check_resumable(saved, options, tag)
    if saved.get("num_processes", 1) != accelerator.num_processes:
        raise LctoolError(f"cannot resume: the run used {saved.get('num_processes')} processes, this one "
                          f"{accelerator.num_processes}")
    saved = ckpt.load_checkpoint(accelerator, folder, unwrapped, optimizer, scheduler)
    if extra_state is not None:
        extra_state.load_state_dict(ckpt.load_extra(folder))
    result.losses = list(saved["losses"])
    result.learning_rates = list(saved["learning_rates"])
    result.evals = list(saved["evals"])
    result.checkpoint = folder
    if saved["step"] >= config.steps:
        accelerator.print(f"checkpoint {folder} is already at step {saved['step']}")
    return int(saved["step"])


def _one_step(accelerator, prepared, unwrapped, stream, step, config, loss_fn, before_step):
    """Forward and backward over `grad_accum` micro-batches; (mean loss, tokens) or (None, 0) at the end."""
    total = torch.zeros(())
    tokens = 0
    for micro in range(config.grad_accum):
        batch = next(stream, None)
        if batch is None:
            return None, 0
        if before_step is not None:
            batch = before_step(step, unwrapped, batch)
        batch = _to_device(batch, accelerator.device)
        last = micro == config.grad_accum - 1
        sync = contextlib.nullcontext() if last or accelerator.num_processes == 1 else accelerator.no_sync(prepared)
        with sync:
            loss = loss_fn(prepared, batch)
            accelerator.backward(loss / config.grad_accum if config.grad_accum > 1 else loss)
        total += loss.detach().float().cpu()
        tokens += _count_tokens(batch)
    return total / config.grad_accum, tokens


def _agree(accelerator, step_loss: torch.Tensor, stop_requested: bool) -> tuple[float, bool]:
    """The mean loss over processes, and whether any process was asked to stop (one collective)."""
    if accelerator.num_processes == 1:
        return float(step_loss), stop_requested
    both = torch.tensor([float(step_loss), 1.0 if stop_requested else 0.0], device=accelerator.device)
    both = accelerator.reduce(both, reduction="sum")
    return float(both[0]) / accelerator.num_processes, bool(both[1] > 0)


def _evaluate(accelerator, prepared, unwrapped, eval_fn, step, result, log) -> None:
    if accelerator.is_main_process:
        unwrapped.eval()
        with torch.no_grad():
            metrics = eval_fn(unwrapped)
        metrics = metrics if isinstance(metrics, dict) else {"value": float(metrics)}
        entry = {"step": step, **metrics}
        result.evals.append(entry)
        log.write({"step": step, "eval": metrics})
        accelerator.print(f"eval at step {step}: " + ", ".join(f"{k} {v}" for k, v in metrics.items()))
        prepared.train()
    accelerator.wait_for_everyone()
