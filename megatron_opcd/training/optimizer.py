"""megatron-core's optimizer and LR schedule for the student.

`get_megatron_optimizer` picks FP32Optimizer (fp32 params), Float16OptimizerWithFloat16Params
(bf16/fp16 params with fp32 master weights) or DistributedOptimizer (state sharded over DP) and
uses apex/TE fused Adam when present, torch's Adam otherwise (the CPU case).
"""

from __future__ import annotations

from megatron_opcd.parallel import ParallelGroups
from megatron_opcd.training.config import check_trainable_dtype


def build_optimizer(opt_cfg, schedule_cfg, model_config, ddp_model, groups: ParallelGroups, *,
                    use_distributed_optimizer: bool = False):
    """(optimizer, scheduler) for one DDP-wrapped student stage."""
    check_trainable_dtype(model_config)  # a model read from a checkpoint is checked here
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    dtype = model_config.torch_dtype
    config = MegatronOptimizerConfig(
        optimizer=opt_cfg.name,
        lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr,
        weight_decay=opt_cfg.weight_decay,
        adam_beta1=opt_cfg.adam_beta1,
        adam_beta2=opt_cfg.adam_beta2,
        adam_eps=opt_cfg.adam_eps,
        clip_grad=opt_cfg.clip_grad,
        bf16=str(dtype) == "torch.bfloat16",
        fp16=str(dtype) == "torch.float16",
        params_dtype=dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(
        config, [ddp_model], use_gloo_process_groups=use_distributed_optimizer,
    )
    steps = schedule_cfg.steps
    warmup = schedule_cfg.warmup_steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else opt_cfg.lr,
        max_lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=steps,
        lr_decay_style=schedule_cfg.decay,
        start_wd=opt_cfg.weight_decay,
        end_wd=opt_cfg.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
