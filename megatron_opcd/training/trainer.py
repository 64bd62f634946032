"""The OPCD training loop on megatron-core, and the paper's baselines from the same config.

One step, as named phases (each a method you can call alone):

    batch    = trainer.select_batch(step)           examples of this DP rank + their contexts
    rollout  = trainer.rollout(batch, step)          (a) student samples (opcd) / teacher samples (baselines)
    teacher  = trainer.score_teacher(rollout)        (b) teacher logits with the context, one scoring per
                                                      micro-batch, the rendered context prefilled once
    result   = trainer.update(rollout, teacher)      (c)+(d) student forward/backward through megatron's
                                                      schedule, the injected objective, clip, optimizer step
    trainer.train_step() runs the four and adds      (e) loss, KL, lengths, tokens/s, seconds per phase to
                                                      result.metrics; train() logs them (trainer.logger.log)

What is rolled out comes from a source chosen from the config (training/sources.py): prompts
(`PromptSource`), or text games with a `game:` section (`GameSource`, training/games.py). The
source selects, rolls out and builds the teacher's and the student's views; the loop,
micro-batching, device placement, teacher scoring, skipping, checkpoints and signals are here, once.

Teacher logits live for one micro-batch at PP = 1: `score_teacher` hands back one deferred scoring
per micro-batch, run inside the schedule's forward step, so only the current micro-batch's
`[R, b, V/tp]` teacher logits exist (and the loss's saved tensors until its backward). At PP > 1
the teacher's own pipeline cannot run inside the student's 1F1B schedule (its p2p sends would
interleave with the schedule's), so the step's teacher logits are computed before the update and
held, on the last pipeline stage only.

What this file leaves out, said plainly: no virtual pipeline stages; rollouts and the update are
sequential (no asynchronous generation).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_opcd.checkpointing import (  # noqa: F401 - check_matches_checkpoint: re-exported (it moved there)
    check_matches_checkpoint, load_model_weights, prepare_writer, read_model_config, tokenizer_dir,
    unwrap,
)
from megatron_opcd.config import ModelConfig
from megatron_opcd.data.packing import gather_response
from megatron_opcd.data.prompts import ContextSampler, Example, PromptStream
from megatron_opcd.errors import ConfigError, NonFiniteError
from megatron_opcd.generation.prefix import TeacherPrefix
from megatron_opcd.losses.diagnostics import warning_line
from megatron_opcd.models import build_model, check_same_vocabulary
from megatron_opcd.models.builder import check_same_tokenizer
from megatron_opcd.models.moe import RouterStats, load_balance_metrics
from megatron_opcd.parallel import ParallelGroups, dp_share, teacher_groups
from megatron_opcd.training.config import TrainConfig, to_yaml_dict
from megatron_opcd.training.ema import EMATeacher, ema_model_config
from megatron_opcd.training.engine import (
    configure_schedule,
    forward_backward,
    main_grad,
    response_outputs,
    wrap_ddp,
    zero_grads,
)
from megatron_opcd.training.games import GameSource
from megatron_opcd.training.metrics import MetricsLogger
from megatron_opcd.training.objectives import MicroBatch, build_objective
from megatron_opcd.training.optimizer import build_optimizer
from megatron_opcd.training.preempt import Preemption, StepAbandoned, signal_name
from megatron_opcd.training.preflight import preflight
from megatron_opcd.training.sources import PromptSource, Rollout, RolloutSource
from megatron_opcd.training.teacher_route import RoutedTeacher
from megatron_opcd.training import state as ckpt_state


TeacherLogits = Callable[[], Optional[torch.Tensor]]
"""One micro-batch's teacher logits `[R, b, v/tp]` when called (None off the last stage and for SFT)."""


@dataclass
class PendingMicroBatch:
    """A micro-batch before its forward step: the student's rows on the model's device, and its
    teacher scoring, run in that forward step (so one micro-batch's teacher logits exist at a time)."""

    packed: object
    teacher: TeacherLogits

    def scored(self) -> MicroBatch:
        return MicroBatch(self.packed, self.teacher())


@dataclass
class StepResult:
    metrics: dict = field(default_factory=dict)
    skipped: bool = False


class Trainer:
    def __init__(self, cfg: TrainConfig, groups: ParallelGroups, *, log_dir: Optional[str] = None):
        self.cfg = cfg
        self.groups = groups
        self.last_rollout: Optional[Rollout] = None  # the latest step's (its episodes, for games)
        self._teacher_seconds = 0.0
        self.rank = dist.get_rank()
        self.step = 0
        self.consecutive_skips = 0
        self.preempt = Preemption()  # SIGTERM/SIGUSR1: stop at the next safe point of the step
        self._micro_index = 0  # forward steps run in this update (safe points from the second on)
        self._saved_step: Optional[int] = None  # the step the newest checkpoint holds
        self._topk_low: dict[str, bool] = {}  # "step"/"evaluation": below loss.warn_teacher_mass last time
        self.run_dir = Path(cfg.checkpoint.save) if cfg.checkpoint.save else None
        self.run_lock = ckpt_state.lock_run_dir(self.run_dir)  # this run owns checkpoint.save, or one line
        self.resume = ckpt_state.check_resume(cfg)  # files only, before any model is built

        # --- models -------------------------------------------------------------------------
        pretrained = cfg.checkpoint.pretrained
        self.model_config: ModelConfig = cfg.model or read_model_config(pretrained)
        if cfg.model is not None and pretrained:
            check_matches_checkpoint(cfg.model, read_model_config(pretrained), pretrained)
        self.model_config.check_parallel(cfg.parallel, role="model", trained=True)
        self.tokenizer = self._load_tokenizer()
        # Every check that needs no model, before any model is built (training/preflight.py).
        checked = preflight(cfg, groups, model_config=self.model_config, tokenizer=self.tokenizer, rank=self.rank)
        student = build_model(self.model_config, "student", groups=groups, seed=cfg.parallel.seed)
        resume_from = self._resume_path()
        if resume_from is None and pretrained:
            load_model_weights(student, pretrained)
        self._student_module = student  # the EMA teacher's source, before DDP wraps it
        mc = self.model_config
        self.router_stats = (RouterStats(student, num_layers=mc.num_layers, num_experts=mc.num_experts,
                                         topk=mc.moe_router_topk) if mc.is_moe else None)
        self.teacher = self._build_teacher()
        self.ddp = wrap_ddp(student, groups, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
        configure_schedule([self.ddp], groups)
        self.optimizer, self.scheduler = build_optimizer(
            cfg.optimizer, cfg.schedule, self.model_config, self.ddp, groups,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
        self.objective = build_objective(cfg, vocab_size=self.model_config.vocab_size, tp_group=groups.tp_group)
        self.num_micro = checked.num_micro

        # --- data (read and checked by preflight) -------------------------------------------
        self.contexts = checked.contexts
        self.sampler = ContextSampler(self.contexts, cfg.context.selection, cfg.data.seed)
        self.renderer = checked.renderer
        # The teacher's shared prefixes: frozen, a context's cache lasts the run; `teacher: self`
        # clears them after every optimizer step (update()).
        self.prefixes = TeacherPrefix(self.renderer, groups=groups)
        self.routed = None  # teacher.parallel: rows to the teacher's ranks, logits back in the student's sharding
        if self.teacher_groups is not groups:
            self.routed = RoutedTeacher(
                self.teacher, student=groups, teacher=self.teacher_groups,
                prefixes=TeacherPrefix(self.renderer, groups=self.teacher_groups),
                vocab_size=self.model_config.vocab_size, pad_id=self.tokenizer.pad_id,
                student_padded=self.model_config.padded_vocab_size(groups.tp_size),
                teacher_padded=self.teacher_config.padded_vocab_size(self.teacher_groups.tp_size),
                dtype=self.teacher_config.torch_dtype,
            )
        self.stream = PromptStream(checked.examples, shuffle=cfg.data.shuffle, seed=cfg.data.seed)
        self.eval_examples = checked.eval_examples
        self.eval_task = checked.task

        # --- logging and resume -------------------------------------------------------------
        self.log_dir = Path(log_dir or cfg.logging.dir or cfg.checkpoint.save or "runs/opcd")
        if resume_from is not None:
            meta = ckpt_state.load_training_checkpoint(resume_from, model=self.ddp, optimizer=self.optimizer,
                                                       scheduler=self.scheduler, plan=self.resume,
                                                       ema_teacher=self.teacher if self.ema is not None else None)
            self.step = self._saved_step = int(meta["step"])
            self.stream.position = int(meta["data_position"])
        self.logger = MetricsLogger(
            self.log_dir, enabled=self.rank == 0, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project, wandb_name=cfg.logging.wandb_name, config=to_yaml_dict(cfg),
            progress_total=cfg.schedule.steps, progress=cfg.logging.progress, initial=self.step,
        )
        if resume_from is not None:
            self.logger.info(f"[megatron-opcd] resumed from {resume_from} at step {self.step}")
        self.source: RolloutSource = GameSource(self) if cfg.game is not None else PromptSource(self)

    # ------------------------------------------------------------------------------------------
    # set-up helpers

    def _load_tokenizer(self):
        from megatron_opcd.data.tokenizer import load_tokenizer

        path = self.cfg.data.tokenizer
        if path is None and self.resume is not None and self.resume.tokenizer is not None:
            path = str(self.resume.tokenizer)  # resume: the checkpoint's own tokenizer/
        if path is None and self.cfg.checkpoint.pretrained:
            found = tokenizer_dir(self.cfg.checkpoint.pretrained)
            path = str(found) if found else None
        if path is None:
            raise ConfigError("no tokenizer: set data.tokenizer, or use a checkpoint.pretrained that has tokenizer/")
        tok = load_tokenizer(path)
        self.tokenizer_source = path  # copied into every checkpoint's tokenizer/
        if tok.vocab_size > self.model_config.vocab_size:
            raise ConfigError(
                f"the tokenizer at {path} has {tok.vocab_size} tokens but model.vocab_size={self.model_config.vocab_size}; "
                "use the model's own tokenizer"
            )
        return tok

    def _resume_path(self) -> Optional[Path]:
        return self.resume.path if self.resume is not None else None  # chosen and verified by check_resume

    def _build_teacher(self):
        t = self.cfg.teacher
        self.ema = None
        self.teacher_groups = self.groups  # the student's, unless teacher.parallel gives the teacher its own
        if t.mode == "self":
            self.teacher_config = self.model_config
            return None
        if t.mode == "ema":
            # The student's architecture on the student's groups (its sharding), fp32, starting from
            # the student's current weights (a resume then loads the saved average over them).
            self.teacher_config = ema_model_config(self.model_config)
            teacher = build_model(self.teacher_config, "teacher", groups=self.groups, seed=t.seed, init=True)
            self.ema = EMATeacher(self._student_module, teacher, t.ema_decay)
            return teacher
        self.teacher_config = t.model or read_model_config(t.checkpoint)
        if t.model is not None and t.checkpoint:
            check_matches_checkpoint(t.model, read_model_config(t.checkpoint), t.checkpoint, role="teacher.model")
        check_same_vocabulary(self.model_config, self.teacher_config)
        if t.checkpoint and tokenizer_dir(t.checkpoint) is not None:  # the teacher's own tokenizer travelled with it
            from megatron_opcd.data.tokenizer import load_tokenizer

            check_same_tokenizer(self.tokenizer, load_tokenizer(tokenizer_dir(t.checkpoint)), f"{t.checkpoint}/tokenizer")
        self.teacher_config.check_parallel(self.cfg.teacher_parallel, role="teacher", **self.cfg.teacher_parallel_names)
        if self.cfg.teacher.own_layout(self.cfg.parallel):  # teacher.parallel: process groups of its own
            layout = self.cfg.teacher_parallel
            self.teacher_groups = teacher_groups(layout.tensor_model_parallel_size,
                                                 layout.pipeline_model_parallel_size)
        teacher = build_model(self.teacher_config, "teacher", groups=self.teacher_groups, seed=t.seed, init=True)
        if t.checkpoint:
            load_model_weights(teacher, t.checkpoint,
                               groups=self.teacher_groups if self.teacher_groups is not self.groups else None)
        return teacher

    @property
    def student(self):
        return unwrap(self.ddp)

    @property
    def teacher_model(self):
        return self.teacher if self.teacher is not None else self.student

    def sampling(self, step: int, *, greedy: Optional[bool] = None, max_new_tokens: Optional[int] = None,
                  salt: int = 0):
        return self.cfg.generation.build(
            eos_ids=self.tokenizer.eos_ids, max_new_tokens=max_new_tokens, greedy=greedy,
            # Rollout randomness depends only on (seed, step, DP rank): a resumed run samples the same.
            seed=(self.cfg.data.seed * 1_000_003 + step * 7_919 + self.groups.dp_rank * 104_729 + salt) % (2**63),
        )

    # ------------------------------------------------------------------------------------------
    # the phases of a step

    def examples_for_step(self) -> list[Example]:
        """This DP rank's slice of the next global batch, each example repeated samples_per_prompt times."""
        s = self.cfg.schedule
        global_examples = self.stream.take(s.global_batch_size)  # same on every rank: the stream is deterministic
        mine = global_examples[dp_share(s.global_batch_size, self.groups.dp_rank, self.groups.dp_size)]
        return [e for e in mine for _ in range(s.samples_per_prompt)]

    def select_batch(self, step: int):
        """This DP rank's examples (prompts or level lines: one stream, one checkpointed position)
        and their contexts, as the source's batch."""
        mine = self.examples_for_step()
        return self.source.select(mine, self.sampler.for_batch(mine, step))

    def rollout(self, batch, step: int) -> Rollout:
        """(a) the source's rollout: the student plays without the context (opcd), the teacher with
        it (baselines)."""
        return self.source.rollout(batch, step)

    def _micro_slices(self, n: int) -> list[slice]:
        m = n // self.num_micro
        return [slice(i * m, (i + 1) * m) for i in range(self.num_micro)]

    def score_teacher(self, rollout: Rollout) -> list[TeacherLogits]:
        """(b) the teacher's logits on [context; prompt; response], aligned to the responses, one
        entry per micro-batch. At PP = 1 each entry scores its micro-batch when called, inside the
        schedule's forward step (one micro-batch's logits at a time); at PP > 1 the teacher's
        pipeline runs here, before the update, and the entries hand back the held logits."""
        slices = self._micro_slices(len(rollout.responses))
        if not self.objective.needs_teacher_logits:
            return [lambda: None for _ in slices]
        if self.groups.pp_size == 1:
            return [lambda sl=sl: self._timed_score(rollout, sl) for sl in slices]
        held = []
        for i, sl in enumerate(slices):
            if i:
                self.preempt.check("teacher micro-batch")  # PP>1: between micro-batches, all stages agree
            held.append(self._timed_score(rollout, sl))
        return [lambda t=t: t for t in held]

    def _timed_score(self, rollout: Rollout, rows: slice) -> Optional[torch.Tensor]:
        t = time.perf_counter()
        try:
            return self.score_micro_batch(rollout, rows)
        finally:
            self._teacher_seconds += time.perf_counter() - t

    def score_micro_batch(self, rollout: Rollout, rows: slice) -> Optional[torch.Tensor]:
        """The teacher's aligned logits `[R, b, v/tp]` of one micro-batch (last stage; else None):
        its view of the rows (the rollout's), the shared prefix prefilled once (`self.prefixes`)."""
        from megatron_opcd.generation import score

        view = rollout.teacher_rows(rows)
        if self.routed is not None:  # the teacher on its own layout: the same score, on its ranks
            return self.routed(view)
        prefix = self.prefixes.tokens(view.starts, view.contexts)
        res = score(self.teacher_model, **view.without_prefix(len(prefix)), groups=self.groups,
                    prefix=self.prefixes.cache(self.teacher_model, prefix),
                    vocab_size=self.model_config.vocab_size, pad_id=self.tokenizer.pad_id)
        return res.logits

    def score_teacher_rows(self, prompts: list[list[int]], contexts: list, responses: list[list[int]]):
        """A teacher on its own layout scoring evaluation rows (`evaluation.runner`'s teacher_scorer):
        this student rank's `[R, b, v/tp]`. Every rank of the world calls it, with or without rows."""
        from megatron_opcd.training.sources import TeacherRows

        return self.routed(TeacherRows(prompts, contexts, prompts=prompts, responses=responses))

    def _micro_batches(self, rollout: Rollout, teacher_logits: list[TeacherLogits]) -> list[PendingMicroBatch]:
        """The one micro-batch path of every source: the rollout packs each micro-batch's rows on
        the host (`rollout.student_rows`), and this is the one place they move to the model's device."""
        multiple = self.groups.tp_size if self.groups.sequence_parallel else 1
        device = next(self.student.parameters()).device
        pad = self.tokenizer.pad_id
        return [
            PendingMicroBatch(rollout.student_rows(sl, pad_id=pad, pad_to_multiple=multiple).to(device), t)
            for sl, t in zip(self._micro_slices(len(rollout.responses)), teacher_logits)
        ]

    def _forward_step(self, data_iterator, model):
        self._micro_index += 1
        if self._micro_index > 1 and self.groups.pp_size == 1:  # PP>1: no safe point inside 1F1B
            self.preempt.check("update micro-batch")  # at PP=1 also the teacher's: it scores below
        # A new MicroBatch per forward step, not kept in the iterated list: its teacher logits are
        # freed once the loss's backward has run.
        micro: MicroBatch = next(data_iterator).scored()
        p = micro.packed
        with response_outputs(model, p.response_index) as aligned:  # logits of response positions only
            output = model(p.tokens, p.position_ids, p.attention_mask)  # last stage: [R, b, v/tp] (else [b, S, v/tp])

        def loss_func(output_tensor):
            return self.objective(output_tensor if aligned else gather_response(output_tensor, p), micro)

        return output, loss_func

    def update(self, rollout: Rollout, teacher_logits) -> StepResult:
        """(c)+(d) student forward/backward through megatron's schedule, then the optimizer step
        (skipped on NaN/inf: nothing non-finite is ever applied or saved)."""
        micro = self._micro_batches(rollout, teacher_logits)
        self.preempt.check("the start of the update")
        self._micro_index = 0
        zero_grads(self.ddp)
        self.student.train()
        if self.router_stats is not None:
            self.router_stats.reset()
        seq = max(m.packed.seq_length for m in micro)
        reports = forward_backward(self.ddp, self._forward_step, micro, num_microbatches=len(micro),
                                   seq_length=seq, micro_batch_size=micro[0].packed.batch_size)
        sums = self._reduce_reports(reports)
        if self.router_stats is not None:  # every rank: a collective, before any skip
            sums.update(load_balance_metrics(self.router_stats.reduce(), num_experts=self.model_config.num_experts,
                                             topk=self.model_config.moe_router_topk))
        finite = self._all_finite(sums)
        result = StepResult()
        if not finite:
            return self._skip(result, "non-finite loss or gradients")
        ok, grad_norm, _ = self.optimizer.step()
        if self.teacher is None:
            self.prefixes.clear()  # teacher: self -- the step changed its weights, its cached prefixes are stale
        if not ok or (grad_norm is not None and not math.isfinite(grad_norm)):
            return self._skip(result, f"optimizer refused the step (grad norm {grad_norm})")
        if self.ema is not None:
            self.ema.update()  # after the applied step only: a skipped one moves neither model
            self.prefixes.clear()  # the average moved: its cached prefixes are stale
        self.scheduler.step(increment=1)
        self.consecutive_skips = 0
        result.metrics.update({k: v for k, v in sums.items()})
        result.metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        result.metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return result

    def _skip(self, result: StepResult, why: str) -> StepResult:
        zero_grads(self.ddp)
        self.consecutive_skips += 1
        n = self.cfg.numerics
        if n.on_nonfinite == "stop" or self.consecutive_skips > n.max_consecutive_skips:
            raise NonFiniteError(f"step {self.step + 1}: {why}; stopping (numerics.on_nonfinite={n.on_nonfinite}, "
                                 f"{self.consecutive_skips} skipped in a row). Lower optimizer.lr or check the data.")
        self.logger.info(f"[megatron-opcd] step {self.step + 1} skipped: {why}")
        result.skipped = True
        return result

    def _reduce_reports(self, reports: list[dict]) -> dict:
        """Sum each metric's [sum, count] over micro-batches and DP replicas; every rank gets it."""
        names = list(self.objective.metric_names)  # known on every rank, so the all-reduce has one shape
        counted = self.groups.is_last_stage and self.groups.tp_rank == 0
        buf = torch.zeros(len(names), 2, dtype=torch.float64)
        if counted:
            for r in reports:
                for i, k in enumerate(names):
                    buf[i] += r[k].detach().double().cpu()
        dist.all_reduce(buf)
        out = {}
        for i, k in enumerate(names):
            s, c = buf[i].tolist()
            key = {"distill loss": "loss"}.get(k, k.replace(" per token", "").replace(" ", "_"))
            out[key] = s / c if c else float("nan")
        return out

    def _all_finite(self, sums: dict) -> bool:
        local = all(math.isfinite(v) for v in sums.values())
        if local:
            for p in self.student.parameters():
                g = main_grad(p)
                if g is not None and not bool(torch.isfinite(g).all()):
                    local = False
                    break
        flag = torch.tensor([0.0 if local else 1.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    # ------------------------------------------------------------------------------------------
    # the loop

    def train_step(self) -> StepResult:
        step = self.step + 1
        times = {}
        t = time.perf_counter()
        self.preempt.step = step
        batch = self.select_batch(step)
        times["select"] = time.perf_counter() - t
        rollout = self.last_rollout = self.rollout(batch, step)
        self.preempt.drain()  # the DP replicas finish decoding at different steps
        times["rollout"] = rollout.seconds
        self._teacher_seconds = 0.0
        t = time.perf_counter()
        teacher_logits = self.score_teacher(rollout)
        result = self.update(rollout, teacher_logits)
        # At PP = 1 the teacher scores inside the update's forward steps: its time is counted apart.
        times["teacher"] = self._teacher_seconds
        times["update"] = time.perf_counter() - t - self._teacher_seconds
        self.step = step
        total = sum(times.values())
        lengths = torch.tensor([float(len(r)) for r in rollout.responses] or [0.0], dtype=torch.float64)
        stats = torch.stack([lengths.sum(), torch.tensor(float(len(rollout.responses)), dtype=torch.float64)])
        if self.groups.dp_group is not None and self.groups.dp_size > 1:
            dist.all_reduce(stats, group=self.groups.dp_group)
        result.metrics.update({
            "response_len": float(stats[0] / stats[1]),
            "tokens_per_s": float(stats[0]) / max(total, 1e-9),
            "skipped": float(result.skipped),
            **{f"time_{k}": v for k, v in times.items()},
        })
        if "reverse_kl" in result.metrics or "forward_kl" in result.metrics or "jsd" in result.metrics:
            result.metrics["kl"] = result.metrics.get(self.cfg.loss_kind, float("nan"))
        result.metrics.update(self.source.metrics(rollout))
        self._warn_topk(result.metrics, f"step {step}")
        return result

    def _warn_topk(self, metrics: dict, where: str) -> None:
        """The top-k diagnostics' warning line (losses/diagnostics.py) when the teacher's mass falls below
        the threshold: once per fall, not every step while it stays low (the metric itself is logged
        every step); again if it recovers and falls again. Training and evaluation each keep their own."""
        diag = getattr(getattr(self.objective, "loss", None), "diagnostics", None)  # top-k losses only
        line = warning_line(metrics, diag, where) if diag is not None else None
        kind = where.split()[0]  # "step 3" / "evaluation at step 4": one state per kind
        if line and not self._topk_low.get(kind):
            self.logger.info(line + " (said once while it stays below)")
        self._topk_low[kind] = bool(line)

    def save(self) -> Optional[Path]:
        if self.run_dir is None:
            return None
        path = ckpt_state.save_training_checkpoint(
            self.run_dir, self.step, model=self.ddp, optimizer=self.optimizer, scheduler=self.scheduler,
            model_config=self.model_config, data_position=self.stream.position,
            tokenizer_dir=self.tokenizer_source, ema_teacher=self.teacher if self.ema is not None else None,
        )
        ckpt_state.apply_retention(self.run_dir, self.cfg.checkpoint.keep_last)
        self._saved_step = self.step
        self.logger.info(f"[megatron-opcd] saved {path}")
        return path

    def evaluate(self, step: int) -> dict:
        """The source's evaluation (prompts: held-out KL, the task's accuracy, samples appended to
        eval_samples.jsonl; games: success rates), the student in eval mode meanwhile."""
        was_training = self.student.training
        self.student.eval()
        try:
            metrics, samples = self.source.evaluate(step)
        finally:
            self.student.train(was_training)
        self.logger.log(step, metrics, prefix="eval")
        self._warn_topk(metrics, f"evaluation at step {step}")
        self.logger.samples(samples)
        return metrics

    def train(self) -> dict:
        """Run until schedule.steps (or a stop signal); returns the last metrics.

        A stop signal (training/preempt.py) ends the step in flight at its next safe point: that
        step is abandoned (the state it consumed is put back), the last completed step is saved
        unless its checkpoint exists, and the loop ends (exit 0). An evaluation due at the end of
        the step the signal arrived in is skipped."""
        self.preempt.install()
        if self.run_dir is not None:
            prepare_writer()  # its helper process starts now, not in the seconds a preemption leaves
        c, e = self.cfg, self.cfg.evaluation
        last: dict = {}
        history = []
        if e.interval and self.step == 0:
            self.evaluate(0)
        while self.step < c.schedule.steps:
            before = self.preempt.snapshot(self.stream.position)
            try:
                result = self.train_step()
            except StepAbandoned as stop:
                self.stream.position = before.data_position
                self.preempt.restore(before)
                zero_grads(self.ddp)  # the partial backward's gradients are never applied
                self._stop(f"step {self.step + 1} abandoned at {stop.where}", stop.signum, last)
                break
            last = result.metrics
            history.append(last)
            self.logger.log(self.step, last)
            stop = self.preempt.agreed()
            if not stop and e.interval and (self.step % e.interval == 0 or self.step == c.schedule.steps):
                self.evaluate(self.step)
            periodic = c.checkpoint.interval and self.step % c.checkpoint.interval == 0
            if periodic and not stop:
                self.save()
            if stop:
                self._stop(f"step {self.step} completed", self.preempt.signum, last)
                break
        else:
            if c.checkpoint.save_at_end and not (c.checkpoint.interval and self.step % c.checkpoint.interval == 0):
                self.save()
        self.logger.close()
        if self.run_lock is not None:
            self.run_lock.release()  # the run is over: checkpoint.save is free for the next one
        return {"step": self.step, "last": last, "history": history}

    def _stop(self, what: str, signum, last: dict) -> None:
        """A stop signal was agreed: save the last completed step (unless saved), say so."""
        since = self.preempt.signalled_at
        t0 = time.monotonic()
        if self._saved_step != self.step:
            self.save()
        took = (f" (stopped {t0 - since:.1f}s after the signal, saved in {time.monotonic() - t0:.1f}s)"
                if since is not None else "")
        self.logger.info(f"[megatron-opcd] signal {signal_name(signum)}: {what}; checkpointed at step "
                         f"{self.step}{took}, exiting")
        last["stopped_by_signal"] = True
