"""One trainer for NExT-GPT's three stages, on one CPU, one GPU or many GPUs through accelerate.

`train(config)` builds the model, freezes it but for the stage's parameter groups (stages.py),
reads the data, and runs AdamW with a warm-up + cosine schedule, gradient accumulation and
clipping, mixed precision where the device has it, and optional gradient checkpointing of the LLM.
Launched with `accelerate launch`, the same code runs data-parallel (DDP, DeepSpeed, FSDP; see
`nextgpt/configs/accelerate/`). The data order depends only on the seed and the step
(`StepBatchSampler`), RNG states are checkpointed, and so `resume` reproduces an unbroken run.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from nextgpt.data.dataset import (
    ConversationDataset,
    EvalBatchSampler,
    SampleEncoder,
    StepBatchSampler,
    collate_encoded,
)
from nextgpt.data.embeddings import CaptionEmbeddingStore
from nextgpt.data.formats import DataError, Sample, read_samples
from nextgpt.data.shards import ShardStream, expand_shards, is_shards
from nextgpt.data.targets import TargetMedia
from nextgpt.model import NextGPT
from nextgpt.training.checkpoint import (
    STATE_FILE,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_base,
)
from nextgpt.training.config import DataSource, TrainConfig
from nextgpt.training.stages import StagePlan, apply_stage, get_stage, set_train_mode

TRACKER_NAME = "logs"  # TensorBoard event files go to <out_dir>/logs


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per logged step
    evals: list[dict[str, float]] = field(default_factory=list)
    skipped_records: int = 0


def resolve_precision(precision: str) -> str:
    """`auto`: bf16 on GPUs that support it, fp16 on other GPUs, full precision on CPU."""
    if precision == "auto":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("precision fp16 needs a GPU; use bf16 or no on a CPU")
    return precision


def train(config: TrainConfig) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    run_dir = Path(config.out_dir)
    accelerator = Accelerator(
        # on a machine without GPUs, processes started by torchrun join one gloo group
        cpu=not torch.cuda.is_available(),
        mixed_precision=resolve_precision(config.precision),
        gradient_accumulation_steps=config.grad_accum,
        log_with="tensorboard" if config.tensorboard else None,
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,
        # a micro-batch may lack a modality, leaving its output projector without gradient
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    resume_from = None
    if config.resume:
        resume_from = latest_checkpoint(run_dir)
        if resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir} (no 'latest' file)")
    start_step = json.loads((resume_from / STATE_FILE).read_text())["step"] if resume_from else 0

    set_seed(config.seed)  # every process builds the same model
    model = NextGPT.from_pretrained(config.model)
    stage = get_stage(config.stage)
    plan = apply_stage(model, stage, config.lora)
    losses = tuple(config.losses or stage.losses)
    if config.gradient_checkpointing:
        model.llm.enable_gradient_checkpointing()
    accelerator.print(plan.summary())
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_base(model, run_dir)
    accelerator.wait_for_everyone()
    model_config = write_base(model, run_dir)

    data = _Data(config, model, losses, accelerator, start_step)
    optimizer = make_optimizer(plan, config)
    scheduler = make_scheduler(optimizer, config, data.total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped: NextGPT = accelerator.unwrap_model(model)

    history: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator, model, optimizer, scheduler)
        history, evals = state["history"], state["evals"]
        accelerator.print(f"resumed from {resume_from} at step {start_step}")
    if config.tensorboard:
        accelerator.init_trackers(TRACKER_NAME, config=_hparams(config))

    def checkpoint(step: int) -> Path:
        state = {"history": history, "evals": evals, "stage": stage.number}
        return save_checkpoint(
            run_dir,
            step,
            accelerator,
            model,
            optimizer,
            scheduler,
            model_config,
            config,
            state,
            config.keep_checkpoints,
        )

    if data.eval_loader is not None and resume_from is None:  # the baseline to improve on
        evals.append(_evaluate(unwrapped, plan, data, losses, accelerator, 0))
    set_train_mode(unwrapped, plan)
    batches = iter(data.train_loader)
    bar = tqdm(
        total=data.total_steps,
        initial=start_step,
        desc=f"stage {stage.number}",
        disable=not (config.progress and accelerator.is_main_process),
    )
    step, last_saved = start_step, None
    window_start, window_steps = time.perf_counter(), 0
    while step < data.total_steps:
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        step_loss = torch.zeros((), device=accelerator.device)
        for _ in range(config.grad_accum):
            batch = next(batches).to(accelerator.device)
            with accelerator.accumulate(model):
                out = model(batch, losses=losses)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    if config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(plan.parameters(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            step_loss += out.loss.detach().float() / config.grad_accum
            for name, value in {**out.terms, **out.diagnostics}.items():
                sums[name] += float(value.detach())
                counts[name] += 1
        step += 1
        window_steps += 1
        loss = float(accelerator.reduce(step_loss, reduction="mean"))
        lr = scheduler.get_last_lr()[0]
        if step % max(config.log_every, 1) == 0 or step == data.total_steps:
            elapsed = time.perf_counter() - window_start
            rate = window_steps * data.global_batch / max(elapsed, 1e-9)
            entry = {"step": step, "loss": loss, "lr": lr, "samples_per_s": rate}
            entry.update({name: sums[name] / counts[name] for name in sums})
            history.append(entry)
            accelerator.log({f"train/{k}": v for k, v in entry.items() if k != "step"}, step=step)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
            window_start, window_steps = time.perf_counter(), 0
        bar.update(1)
        last = step == data.total_steps
        if data.eval_loader is not None and (last or _due(step, config.eval_every)):
            evals.append(_evaluate(unwrapped, plan, data, losses, accelerator, step))
        if last or _due(step, config.save_every):
            last_saved = checkpoint(step)
    bar.close()
    accelerator.end_training()
    return TrainResult(run_dir, last_saved or resume_from, history, evals, data.skipped)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _hparams(config: TrainConfig) -> dict[str, Any]:
    keys = ("stage", "model", "lr", "batch_size", "grad_accum", "epochs", "max_steps", "seed")
    return {k: getattr(config, k) for k in keys}


def make_optimizer(plan: StagePlan, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with one learning rate per parameter group; decay only on projector/LoRA matrices."""
    groups = []
    for name, params in plan.groups.items():
        lr = config.lr_groups.get(name, config.lr)
        decay = [p for _, p in params if p.ndim >= 2 and name != "signal_rows"]
        rest = [p for _, p in params if not (p.ndim >= 2 and name != "signal_rows")]
        if decay:
            groups.append(
                {"params": decay, "lr": lr, "weight_decay": config.weight_decay, "name": name}
            )
        if rest:
            groups.append({"params": rest, "lr": lr, "weight_decay": 0.0, "name": f"{name}/nd"})
    betas = tuple(config.betas)
    if len(betas) != 2:
        raise ValueError(f"betas: expected two values, got {config.betas}")
    return torch.optim.AdamW(groups, betas=betas)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_ratio` of the steps, then cosine decay to 0 (or constant)."""
    warmup = math.ceil(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def _evaluate(
    model: NextGPT,
    plan: StagePlan,
    data: _Data,
    losses: tuple[str, ...],
    accelerator: Any,
    step: int,
) -> dict[str, float]:
    """Mean loss over the held-out split (every process takes a share), outside the train RNG."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for batch in data.eval_loader:
            out = model(batch.to(accelerator.device), losses=losses)
            totals += torch.tensor([float(out.loss), 1.0], device=accelerator.device)
    totals = accelerator.reduce(totals, reduction="sum")
    set_train_mode(model, plan)
    result = {"step": step, "eval_loss": float(totals[0] / totals[1].clamp(min=1))}
    accelerator.log({"eval/loss": result["eval_loss"]}, step=step)
    accelerator.print(f"step {step}: eval loss {result['eval_loss']:.4f}")
    return result


class _Data:
    """Training and evaluation loaders of this process, and the number of optimizer steps."""

    def __init__(
        self,
        config: TrainConfig,
        model: NextGPT,
        losses: tuple[str, ...],
        accelerator: Any,
        start_step: int,
    ) -> None:
        dc = config.data
        if not dc.train:
            raise ValueError("data.train: no training data given")
        store = None
        if dc.caption_embeddings:
            store = CaptionEmbeddingStore(dc.caption_embeddings)
            for modality, decoder in model.decoders.items():
                store.check(modality, decoder.conditioning_shape())
        targets = TargetMedia(model.decoders) if "diffusion" in losses else None
        encoder = SampleEncoder.for_model(
            model, max_length=dc.max_length, captions=store, targets=targets
        )
        processes, rank = accelerator.num_processes, accelerator.process_index
        self.global_batch = config.batch_size * config.grad_accum * processes
        collate = partial(collate_encoded, pad_id=model.llm.tokenizer.pad_token_id)
        self.skipped = 0
        self.eval_loader = None

        streamed = [is_shards(s.path) for s in dc.train]
        if any(streamed) and not all(streamed):
            raise ValueError("data.train: mix of JSON files and tar shards; use one kind")
        if all(streamed):
            if config.max_steps <= 0:
                raise ValueError("streaming from tar shards needs max_steps > 0")
            self.total_steps = config.max_steps
            shards = [name for s in dc.train for name in expand_shards(s.path)]
            stream = ShardStream(
                shards,
                encoder,
                config.batch_size,
                processes,
                rank,
                config.seed,
                skip_batches=start_step * config.grad_accum,
                skip_bad=dc.skip_bad_records,
            )
            self.train_loader = DataLoader(
                stream, batch_size=config.batch_size, collate_fn=collate, num_workers=dc.num_workers
            )
            eval_samples = self._read(dc.eval, dc.skip_bad_records, accelerator)
        else:
            samples = self._read(dc.train, dc.skip_bad_records, accelerator)
            eval_samples = self._read(dc.eval, dc.skip_bad_records, accelerator)
            if not eval_samples and dc.eval_fraction > 0:
                samples, eval_samples = _hold_out(samples, dc.eval_fraction, config.seed)
            per_epoch = len(samples) // self.global_batch
            self.total_steps = config.max_steps or config.epochs * per_epoch
            sampler = StepBatchSampler(
                len(samples),
                config.batch_size,
                config.grad_accum,
                processes,
                rank,
                self.total_steps,
                config.seed,
                shuffle=dc.shuffle,
                start_step=start_step,
            )
            self.train_loader = DataLoader(
                ConversationDataset(samples, encoder, skip_bad=dc.skip_bad_records),
                batch_sampler=sampler,
                collate_fn=collate,
                num_workers=dc.num_workers,
                generator=torch.Generator().manual_seed(config.seed),
            )
        if eval_samples:
            self.eval_loader = DataLoader(
                ConversationDataset(eval_samples, encoder, skip_bad=dc.skip_bad_records),
                batch_sampler=EvalBatchSampler(
                    len(eval_samples), config.batch_size, processes, rank
                ),
                collate_fn=collate,
                num_workers=dc.num_workers,
                generator=torch.Generator().manual_seed(config.seed),
            )

    def _read(
        self, sources: tuple[DataSource, ...], skip_bad: bool, accelerator: Any
    ) -> list[Sample]:
        samples: list[Sample] = []
        for source in sources:
            if is_shards(source.path):
                raise DataError(f"{source.path}: evaluation data must be a JSON file")
            result = read_samples(source.path, source.root, skip_bad=skip_bad)
            samples += result.samples
            if result.skipped:
                self.skipped += len(result.skipped)
                accelerator.print(
                    f"{source.path}: skipped {len(result.skipped)} bad record(s); "
                    f"first: {result.skipped[0]}"
                )
        return samples


def _hold_out(
    samples: list[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """A seeded random `fraction` of the samples (at least one) for evaluation."""
    count = max(1, round(len(samples) * fraction))
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    train = [s for i, s in enumerate(samples) if i not in held]
    return train, [samples[i] for i in sorted(held)]
