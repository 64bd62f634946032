"""Rank functions for trainer tests (module level: pickled by reference into each rank)."""

from __future__ import annotations


def one_step(config_path: str, overrides: list[str]) -> dict:
    """Build the trainer at the config's layout, run one step, return the loss and full weights."""
    from _layouts import _full_weights
    from megatron_opcd import parallel
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.trainer import Trainer

    cfg = load_train_config(config_path, overrides)
    groups = parallel.initialize(cfg.parallel)
    trainer = Trainer(cfg, groups)
    batch = trainer.select_batch(1)
    rollout = trainer.rollout(batch, 1)
    teacher = trainer.score_teacher(rollout)
    result = trainer.update(rollout, teacher)
    weights = _full_weights(trainer.student, groups)
    out = {"loss": result.metrics["loss"], "responses": rollout.responses, "weights": weights,
           "tp_rank": groups.tp_rank, "pp_rank": groups.pp_rank, "last": groups.is_last_stage,
           "tied": trainer.model_config.tie_embeddings, "grads": {}}
    trainer.logger.close()
    parallel.destroy()
    return out


def train_run(config_path: str, overrides: list[str]) -> dict:
    """A whole `Trainer.train()`; returns its summary (history of metrics)."""
    from megatron_opcd import parallel
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.trainer import Trainer

    cfg = load_train_config(config_path, overrides)
    groups = parallel.initialize(cfg.parallel)
    try:
        return Trainer(cfg, groups).train()
    finally:
        parallel.destroy()


def response_logits_only(config_path: str, overrides: list[str]) -> dict:
    """The training forward with the output layer on the response positions only, aligned to the
    response tokens (what `Trainer._forward_step` runs) against a plain full-sequence forward whose response logits are
    picked one by one: loss and every gradient, and the width the output layer actually saw."""
    import torch

    from megatron_opcd import parallel
    from megatron_opcd.checkpointing import unwrap
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.engine import main_grad, zero_grads
    from megatron_opcd.training.trainer import Trainer

    cfg = load_train_config(config_path, overrides)
    groups = parallel.initialize(cfg.parallel)
    trainer = Trainer(cfg, groups)
    rollout = trainer.rollout(trainer.select_batch(1), 1)
    micro = trainer._micro_batches(rollout, trainer.score_teacher(rollout))[0]
    p = micro.packed
    trainer.student.train()
    model = unwrap(trainer.ddp)
    widths = []
    hook = model.output_layer.register_forward_hook(lambda m, a, out: widths.append(tuple(out[0].shape[:2])))

    def grads():
        return {n: main_grad(w).detach().clone() for n, w in model.named_parameters() if main_grad(w) is not None}

    zero_grads(trainer.ddp)
    output, loss_func = trainer._forward_step(iter([micro]), trainer.ddp)
    sliced_loss, _, _ = loss_func(output)
    sliced_loss.backward()
    sliced = grads()

    zero_grads(trainer.ddp)
    full = trainer.ddp(p.tokens, p.position_ids, p.attention_mask)  # [b, S, V]: no slicing here
    R, b = p.response_index.shape
    aligned = torch.stack([torch.stack([full[i, max(int(p.response_index[t, i]), 0)] for i in range(b)])
                           for t in range(R)])  # [R, b, V], one position at a time
    ref_loss, _, _ = trainer.objective(aligned, micro.scored())
    ref_loss.backward()
    reference = grads()
    hook.remove()
    out = {"sliced_loss": float(sliced_loss), "ref_loss": float(ref_loss), "widths": widths,
           "seq": p.seq_length, "rows": R, "batch": b, "max_grad_diff": max(float((sliced[n] - reference[n]).abs().max()) for n in reference),
           "max_grad": max(float(g.abs().max()) for g in reference.values()), "same_names": sorted(sliced) == sorted(reference)}
    trainer.logger.close()
    parallel.destroy()
    return out


def cluster_steps(config_path: str, cases: list[list[str]], steps: int = 2) -> list[dict]:
    """Several whole-trainer runs in one launch (process start-up dominates on 2 cores): for each
    case (a list of overrides) build the trainer, run `steps` train steps and an evaluation, and
    return per step the logged loss and grad norm, the eval KL, the shape and bytes of every
    training forward's output-layer logits, and the full weights (TP-gathered; from DP rank 0
    only, the other replicas must hold the same)."""
    from _layouts import _full_weights
    from megatron_opcd import parallel
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.trainer import Trainer

    out = []
    for overrides in cases:
        cfg = load_train_config(config_path, overrides)
        groups = parallel.initialize(cfg.parallel)  # resets megatron's state; torch.distributed stays up
        trainer = Trainer(cfg, groups)
        logits = []  # (shape, bytes) of every training forward's output-layer logits (last stage)
        layer = trainer.student.output_layer if groups.is_last_stage else None
        hook = layer and layer.register_forward_hook(
            lambda m, _a, o: logits.append((tuple(o[0].shape), o[0].nbytes)) if m.training else None)
        history = [trainer.train_step().metrics for _ in range(steps)]
        if hook:
            hook.remove()
        ev = trainer.evaluate(steps)
        weights = _full_weights(trainer.student, groups)
        out.append({"loss": [h["loss"] for h in history], "grad_norm": [h["grad_norm"] for h in history],
                    "eval_kl": ev["kl"], "logits": logits, "weights": weights if groups.dp_rank == 0 else {},
                    "tp_rank": groups.tp_rank, "pp_rank": groups.pp_rank, "dp_rank": groups.dp_rank,
                    "last": groups.is_last_stage, "tied": trainer.model_config.tie_embeddings})
        trainer.logger.close()
    parallel.destroy()
    return out


def teacher_accounting(config_path: str, overrides: list[str], steps: int = 2) -> dict:
    """Whole train steps with the teacher's prefills counted and the live bytes of its logits
    tracked (every tensor `generation.score` hands back, until it is freed)."""
    import weakref

    import megatron_opcd.generation as generation
    from megatron_opcd import parallel
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.trainer import Trainer

    seen = {"prefills": 0, "live": 0, "peak": 0, "largest": 0, "scored": 0}
    prefill, score = generation.prefill_prefix, generation.score

    def counted_prefill(*args, **kwargs):
        seen["prefills"] += 1
        return prefill(*args, **kwargs)

    def release(n):
        seen["live"] -= n

    def tracked_score(*args, **kwargs):
        out = score(*args, **kwargs)
        if out.logits is not None:
            n = out.logits.untyped_storage().nbytes()
            seen["scored"] += 1
            seen["live"] += n
            seen["peak"], seen["largest"] = max(seen["peak"], seen["live"]), max(seen["largest"], n)
            weakref.finalize(out.logits, release, n)
        return out

    generation.prefill_prefix, generation.score = counted_prefill, tracked_score
    cfg = load_train_config(config_path, overrides)
    groups = parallel.initialize(cfg.parallel)
    try:
        trainer = Trainer(cfg, groups)
        losses = [trainer.train_step().metrics["loss"] for _ in range(steps)]
        trainer.logger.close()
        return {**seen, "losses": losses, "num_micro": trainer.num_micro}
    finally:
        generation.prefill_prefix, generation.score = prefill, score
        parallel.destroy()


def _params(module) -> dict:
    return {n: p.detach().double().clone() for n, p in module.named_parameters()}


def ema_steps(config_path: str, overrides: list[str], steps: int = 3) -> dict:
    """teacher.mode=ema: this rank's shard of the student before and after each of `steps` steps
    (float64 copies) and of the EMA teacher after them."""
    from megatron_opcd import parallel
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.trainer import Trainer

    cfg = load_train_config(config_path, overrides)
    groups = parallel.initialize(cfg.parallel)
    try:
        t = Trainer(cfg, groups)
        students, skipped = [_params(t.student)], []
        first_teacher = _params(t.teacher)
        for _ in range(steps):
            skipped.append(t.train_step().skipped)
            students.append(_params(t.student))
        return {"students": students, "teacher": _params(t.teacher), "first_teacher": first_teacher,
                "skipped": skipped, "decay": cfg.teacher.ema_decay, "dtype": str(next(t.teacher.parameters()).dtype)}
    finally:
        parallel.destroy()


def ema_train(config_path: str, overrides: list[str]) -> dict:
    """A whole `Trainer.train()` with teacher.mode=ema: the EMA teacher as built (after a resume:
    as loaded) and at the end, and the history."""
    from megatron_opcd import parallel
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.trainer import Trainer

    cfg = load_train_config(config_path, overrides)
    groups = parallel.initialize(cfg.parallel)
    try:
        t = Trainer(cfg, groups)
        start = _params(t.teacher)
        summary = t.train()
        return {"start": start, "end": _params(t.teacher), "student": _params(t.student),
                "history": summary["history"]}
    finally:
        parallel.destroy()


def teacher_layouts(config_path: str, cases: list[list[str]]) -> dict:
    """teacher.parallel: the one-line error of a teacher layout that does not divide the world
    (TP = 4 on 2 ranks), then `cluster_steps` of every case, in one launch."""
    from megatron_opcd import parallel
    from megatron_opcd.errors import ConfigError

    parallel.initialize()
    try:
        parallel.teacher_groups(4, 1)
        error = None
    except ConfigError as exc:
        error = str(exc)
    return {"error": error, "runs": cluster_steps(config_path, cases)}
