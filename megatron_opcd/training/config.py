"""The trainer's configuration: one typed section per component (STYLE habit 6).

    model       the student (ModelConfig; read from checkpoint.pretrained when omitted)
    teacher     frozen model from its own checkpoint, `self` (the student's current weights), or
                `ema` (a moving average of the student)
    parallel    TP / PP / sequence parallelism / distributed optimizer
    data        prompt JSONL files, tokenizer, chat template, length limits
    context     what only the teacher sees: a system prompt or an experience pool
    algorithm   opcd | offpolicy_cd | seqkd
    loss        the divergence (reverse KL over the student's top-256 by default)
    generation  rollout sampling
    optimizer   megatron-core optimizer (Adam/SGD), clipping
    schedule    steps, batch sizes, LR warmup and decay
    checkpoint  save/load/pretrained folders, interval, retention
    logging     metrics JSONL, TensorBoard, Weights & Biases, console
    evaluation  periodic evaluation with and without the context
    numerics    what to do with NaN/inf
    game        a text game: multi-turn episodes instead of prompts (megatron_opcd.envs.config.GameConfig)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_opcd.config import (
    ModelConfig,
    ParallelConfig,
    apply_overrides,
    from_dict,
    load_yaml,
)
from megatron_opcd.envs.config import GameConfig
from megatron_opcd.errors import ConfigError
from megatron_opcd.generation.sampling import SamplingParams
from megatron_opcd.losses.diagnostics import DiagnosticsSpec
from megatron_opcd.losses.divergence import DivergenceSpec


@dataclass
class TeacherParallelConfig:
    """A frozen teacher's own TP/PP layout in the same job (docs/training.md, "Teacher layouts").
    Unset sizes are the student's; its data parallelism is what TP x PP leaves of the world."""

    tensor_model_parallel_size: Optional[int] = None
    """Ranks that split each teacher layer and the teacher's vocabulary (default: parallel's)."""

    pipeline_model_parallel_size: Optional[int] = None
    """Teacher pipeline stages (default: parallel's)."""

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"teacher.parallel.{name} must be >= 1, got {value}")

    def layout(self, student: ParallelConfig) -> ParallelConfig:
        """The teacher's ParallelConfig: these sizes (or the student's), no sequence parallelism."""
        tp = self.tensor_model_parallel_size or student.tensor_model_parallel_size
        pp = self.pipeline_model_parallel_size or student.pipeline_model_parallel_size
        if (tp, pp) == _sizes(student):
            return student
        return dataclasses.replace(student, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                   sequence_parallel=False)


def _sizes(parallel: ParallelConfig) -> tuple[int, int]:
    return parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size


@dataclass
class TeacherConfig:
    """The model that sees the context. `teacher: self` in YAML is short for `{mode: self}`."""

    mode: Literal["frozen", "self", "ema"] = "frozen"
    """frozen: a separate frozen model (may be larger; same vocabulary). self: the student's own
    current weights, with the context (self-distillation). ema: an exponential moving average of
    the student's weights, updated after each optimizer step (training/ema.py)."""

    checkpoint: Optional[str] = None
    """Checkpoint folder of the frozen teacher (tools/convert_checkpoint.py output). Required for
    mode=frozen unless `model` is given (random weights: tests only)."""

    model: Optional[ModelConfig] = None
    """Teacher architecture; read from the checkpoint's model_config.yaml when omitted."""

    seed: int = 4321
    """Seed of the teacher's random initialisation when no checkpoint is given (tests)."""

    ema_decay: Optional[float] = None
    """mode=ema only, and required there: d in `teacher <- d teacher + (1 - d) student` after each
    optimizer step, in [0, 1) (0: the live student; e.g. 0.99)."""

    parallel: Optional[TeacherParallelConfig] = None
    """mode=frozen only: the teacher's own tensor/pipeline sizes (default: the student's layout).
    The teacher then runs on process groups of its own; rollouts go to its ranks and its logits
    come back in the student's vocabulary sharding (docs/training.md, "Teacher layouts")."""

    def layout(self, student: ParallelConfig) -> ParallelConfig:
        """The teacher's layout: `parallel` over the student's, or the student's own."""
        return self.parallel.layout(student) if self.parallel is not None else student

    def own_layout(self, student: ParallelConfig) -> bool:
        """True when the teacher's TP x PP differs from the student's (its own process groups)."""
        return _sizes(self.layout(student)) != _sizes(student)

    def __post_init__(self):
        if self.mode in ("self", "ema") and self.parallel is not None:
            raise ConfigError(f"teacher.parallel is for a frozen teacher (teacher.mode={self.mode} uses the "
                              "student's weights in the student's layout): remove teacher.parallel")
        if self.mode in ("self", "ema") and (self.checkpoint or self.model):
            raise ConfigError(f"teacher.mode={self.mode} uses the student's weights: remove "
                              "teacher.checkpoint/teacher.model")
        if self.mode == "ema" and self.ema_decay is None:
            raise ConfigError("teacher.mode=ema needs teacher.ema_decay (the average's decay per step, e.g. 0.99)")
        if self.mode != "ema" and self.ema_decay is not None:
            raise ConfigError(f"teacher.ema_decay is for teacher.mode=ema (this teacher is {self.mode}): remove it")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"teacher.ema_decay={self.ema_decay} must be in [0, 1) (1 would never move: use "
                              "the student's initial weights as a frozen teacher)")
        if self.mode == "frozen" and not self.checkpoint and self.model is None:
            raise ConfigError(
                "teacher.mode=frozen needs teacher.checkpoint (a converted checkpoint folder) "
                "or teacher.model; for self-distillation set `teacher: self`"
            )


@dataclass
class DataConfig:
    """Prompts and how they are tokenised."""

    train: str = ""
    """JSONL of training prompts: {"prompt": ..., optional "answer", optional "context"}."""

    eval: Optional[str] = None
    """JSONL of held-out prompts for periodic evaluation (same format)."""

    tokenizer: Optional[str] = None
    """Tokenizer folder/file; default: the tokenizer/ folder of checkpoint.pretrained."""

    chat_template: Literal["auto", "none"] = "auto"
    """auto: use the tokenizer's chat template when it has one; none: plain text."""

    max_prompt_tokens: int = 1024
    """Longest prompt (student side) in tokens."""

    max_context_tokens: int = 4096
    """Longest context in tokens."""

    too_long: Literal["truncate_context", "skip", "error"] = "truncate_context"
    """When context + prompt + response exceed the model's max_position_embeddings: cut the
    context from the end (with a warning), skip the example (with a warning), or stop."""

    shuffle: bool = True
    """Shuffle the prompts every epoch (seeded: resume is exact)."""

    seed: int = 1234
    """Seed of the data order, the context sampling and the rollouts."""

    def __post_init__(self):
        if self.max_prompt_tokens < 1 or self.max_context_tokens < 0:
            raise ConfigError("data.max_prompt_tokens must be >= 1 and data.max_context_tokens >= 0")


@dataclass
class ContextConfig:
    """What only the teacher sees."""

    text: Optional[str] = None
    """The context itself (a system prompt)."""

    file: Optional[str] = None
    """A file holding one context (e.g. a system prompt)."""

    pool: Optional[str] = None
    """An experience pool: a JSON list of contexts, or one context per line."""

    selection: Literal["fixed", "random", "per_example"] = "fixed"
    """fixed: the (first) context for every prompt; random: one drawn from the pool per batch;
    per_example: each example's own "context" field (falling back to the fixed one)."""

    placement: Literal["system", "user_prefix"] = "system"
    """Where the context goes in the teacher's prompt: as a system message, or at the start of
    the user turn (stronger for small models)."""

    separator: str = "\n\n"
    """Between a user_prefix context and the prompt (and between context and prompt without a chat template)."""

    def __post_init__(self):
        given = [k for k in ("text", "file", "pool") if getattr(self, k)]
        if len(given) > 1:
            raise ConfigError(f"context: give one of context.text, context.file, context.pool (got {', '.join(given)})")


@dataclass
class AlgorithmConfig:
    name: Literal["opcd", "offpolicy_cd", "seqkd"] = "opcd"
    """opcd: the student samples, the teacher (with context) scores, reverse KL. offpolicy_cd:
    the teacher samples with the context, the student learns its distribution (forward KL).
    seqkd: the student is fine-tuned (cross-entropy) on the teacher's samples."""


@dataclass
class LossConfig:
    """The `loss:` section: the divergence's settings as YAML keys. What each one means, and every
    default, is declared once in `losses.DivergenceSpec`, which `TrainConfig.divergence` builds
    from this section; three may be null here and then follow another section."""

    kind: Optional[Literal["reverse_kl", "forward_kl", "jsd"]] = None
    """Divergence; null picks the algorithm's: reverse_kl for opcd, forward_kl for offpolicy_cd."""

    topk: Optional[int] = DivergenceSpec.topk
    """Tokens per position the divergence sums over; null = exact over the whole vocabulary."""

    topk_from: Optional[Literal["student", "teacher", "union"]] = None
    """Whose top-k forms the index set; null picks the algorithm's: the student's for opcd (reverse
    KL on the student's samples), the teacher's for offpolicy_cd (forward KL on the teacher's
    samples belongs on the teacher's support). union: the paper's merge option."""

    renormalize: bool = DivergenceSpec.renormalize
    """Renormalise both distributions over the top-k (a paper option)."""

    temperature: Optional[float] = None
    """Both logits are divided by it; null = generation.temperature (the paper)."""

    beta: float = DivergenceSpec.beta
    """JSD mixture weight of the teacher."""

    average: Literal["sequence", "token"] = "sequence"
    """sequence: (1/|y|) sum_t per response, then the mean over responses (the paper); token: per token."""

    chunk_tokens: int = DivergenceSpec.chunk_tokens
    """Tokens per chunk inside the loss (bounds its extra memory)."""

    diagnostics: bool = True
    """Top-k losses: log the top-k diagnostics every step and in evaluation (docs/training.md,
    "Top-k diagnostics"): the teacher's mass on I, the student's mass outside it, the share of
    tokens whose teacher argmax is outside it, the top-k vs exact divergence on sampled positions."""

    diagnostic_tokens: int = DiagnosticsSpec.sample_tokens
    """Response positions per micro-batch on which the top-k value is compared with the exact one (0: none)."""

    warn_teacher_mass: float = DiagnosticsSpec.warn_teacher_mass
    """Log a warning line when the teacher's mean mass on the student's top-k falls below this (0: never)."""

    def __post_init__(self):
        if self.topk is not None and self.topk < 1:
            raise ConfigError(f"loss.topk={self.topk} must be >= 1, or null for the exact divergence")
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"loss.temperature={self.temperature} must be > 0")
        try:  # the spec's own checks (beta, chunk_tokens, ...) at load time, not on the first step
            self.build(algorithm="opcd", generation_temperature=1.0)
            self.build_diagnostics()
        except ValueError as exc:
            raise ConfigError(f"loss.{exc}") from None

    def build_diagnostics(self) -> Optional[DiagnosticsSpec]:
        """The diagnostics this section asks for; None when off or for an exact loss (no top-k)."""
        spec = DiagnosticsSpec(sample_tokens=self.diagnostic_tokens, warn_teacher_mass=self.warn_teacher_mass)
        return spec if self.diagnostics and self.topk is not None else None

    def build(self, *, algorithm: str, generation_temperature: float,
              vocab_size: Optional[int] = None) -> DivergenceSpec:
        """The divergence this section asks for, its nulls resolved against the algorithm and the
        sampling temperature; `vocab_size` is the model's true (unpadded) vocabulary."""
        off_policy = algorithm == "offpolicy_cd"
        return DivergenceSpec(
            kind=self.kind or ("forward_kl" if off_policy else "reverse_kl"),
            topk=self.topk,
            topk_from=self.topk_from or ("teacher" if off_policy else "student"),
            renormalize=self.renormalize,
            temperature=self.temperature if self.temperature is not None else generation_temperature,
            beta=self.beta,
            chunk_tokens=self.chunk_tokens,
            vocab_size=vocab_size,
        )


@dataclass
class GenerationConfig:
    """The `generation:` section: rollout sampling as YAML keys. The settings and their defaults are
    declared once in `generation.SamplingParams`, which `build` makes for each rollout."""

    max_new_tokens: int = SamplingParams.max_new_tokens
    """Longest response."""

    temperature: float = SamplingParams.temperature
    """Rollout sampling temperature (also the loss temperature unless loss.temperature is set)."""

    top_k: int = SamplingParams.top_k
    """Sample among the k most likely tokens (0: off)."""

    top_p: float = SamplingParams.top_p
    """Nucleus sampling (1.0: off)."""

    greedy: bool = SamplingParams.greedy
    """Greedy rollouts (debugging; OPCD samples)."""

    stop_strings: list[str] = field(default_factory=list)
    """Stop a response when its text ends with one of these."""

    compile_decode: str = SamplingParams.compile_decode
    """The compiled decode step (docs/generation.md): auto (models of >= 50M parameters), always, never."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"generation.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"generation.temperature={self.temperature} must be > 0 (use generation.greedy=true)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generation.top_p={self.top_p} must be in (0, 1]")
        try:  # the sampler's own checks (top_k, stop_strings) at load time, not on the first rollout
            self.build(eos_ids=(), seed=0)
        except ValueError as exc:
            raise ConfigError(str(exc).replace("SamplingParams.", "generation.")) from None

    def build(self, *, eos_ids, seed: int, max_new_tokens: Optional[int] = None,
              greedy: Optional[bool] = None) -> SamplingParams:
        """The sampling parameters of one rollout; `max_new_tokens`/`greedy` given: the evaluation's own."""
        return SamplingParams(
            max_new_tokens=max_new_tokens or self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, greedy=self.greedy if greedy is None else greedy, eos_ids=tuple(eos_ids),
            stop_strings=tuple(self.stop_strings), seed=seed, compile_decode=self.compile_decode,
        )


@dataclass
class OptimizerConfig:
    name: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-6
    """Peak learning rate (paper: 1e-6 or 5e-6)."""
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0: off)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr={self.lr} must be > 0")
        if self.clip_grad < 0:
            raise ConfigError("optimizer.clip_grad must be >= 0 (0 disables clipping)")


@dataclass
class ScheduleConfig:
    steps: int = 50
    """Optimizer steps (paper: 50)."""
    global_batch_size: int = 128
    """Prompts per step over all data-parallel ranks (paper: 128)."""
    micro_batch_size: int = 4
    """Prompts per forward/backward micro-batch on one data-parallel rank."""
    samples_per_prompt: int = 1
    """Rollouts per prompt."""
    warmup_steps: int = 0
    decay: Literal["constant", "linear", "cosine"] = "constant"

    def __post_init__(self):
        if self.steps < 1 or self.global_batch_size < 1 or self.micro_batch_size < 1 or self.samples_per_prompt < 1:
            raise ConfigError("schedule.steps, global_batch_size, micro_batch_size and samples_per_prompt must be >= 1")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ConfigError(f"schedule.warmup_steps={self.warmup_steps} must be in [0, schedule.steps]")


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    """Folder for this run's checkpoints (step_XXXXXXX/ inside); null: never save."""
    load: Optional[str] = None
    """Resume from this folder (a run folder or one checkpoint); default: `save` if it has one."""
    pretrained: Optional[str] = None
    """Initial student weights (a converted checkpoint) when not resuming."""
    interval: int = 0
    """Save every N steps (0: only at the end)."""
    keep_last: int = 2
    """Keep the newest N checkpoints (0: keep all)."""
    save_at_end: bool = True
    resume: bool = True
    """Resume from the latest checkpoint found in `load`/`save`."""
    fallback: Literal["none", "previous"] = "none"
    """A damaged newest checkpoint (a part missing, a checksum wrong): none = stop with one line naming
    the folder and the part; previous = resume from the newest checkpoint that verifies (logged)."""
    use_checkpoint_schedule: Optional[bool] = None
    """On resume, when optimizer/schedule settings differ from the checkpoint's: null = refuse (one line
    naming both values), true = continue the checkpoint's, false = apply the config's from here on."""

    def __post_init__(self):
        if self.interval < 0 or self.keep_last < 0:
            raise ConfigError("checkpoint.interval and checkpoint.keep_last must be >= 0")


@dataclass
class LoggingConfig:
    dir: Optional[str] = None
    """Folder for metrics.jsonl and TensorBoard; default: checkpoint.save, else runs/opcd."""
    tensorboard: bool = True
    """Write TensorBoard events when `tensorboard` is installed (a warning says so otherwise)."""
    wandb: bool = False
    """Log to Weights & Biases (needs `wandb` installed and configured)."""
    wandb_project: str = "megatron-opcd"
    wandb_name: Optional[str] = None
    progress: bool = True
    """A progress bar on the console (rank 0)."""
    debug: bool = False
    """Show full tracebacks on errors (otherwise: one line naming the problem)."""


@dataclass
class EvaluationConfig:
    interval: int = 0
    """Evaluate every N steps (0: off); also before the first and after the last step when on."""
    task: Optional[str] = None
    """Task name from megatron_opcd.evaluation (e.g. starts_with, math, choice); null: KL only."""
    task_args: dict = field(default_factory=dict)
    """Arguments of the task's grader (e.g. {prefix: "Ahoy"})."""
    num_prompts: int = 64
    """Held-out prompts per evaluation."""
    max_new_tokens: int = 64
    greedy: bool = True


@dataclass
class NumericsConfig:
    on_nonfinite: Literal["skip", "stop"] = "skip"
    """A NaN/inf loss or gradient: skip that step (no update) or stop with an error. Never saved."""
    max_consecutive_skips: int = 5
    """Stop after this many skipped steps in a row."""


def check_trainable_dtype(model: ModelConfig) -> None:
    """The student trains in fp32 or bf16. fp16 would need megatron's dynamic loss scaling wired
    into the schedule (`config.grad_scale_func`): without it the optimizer unscales a loss that
    was never scaled, so fp16 is refused rather than trained wrongly (bf16 has fp32's range and
    needs no scaling). A teacher or generation in fp16 is fine: nothing is trained there."""
    if model.params_dtype == "fp16":
        raise ConfigError("model.params_dtype=fp16 cannot be trained (no loss scaling); use bf16 (or fp32)")


SECTION_TYPES = {
    "model": ModelConfig,
    "teacher": TeacherConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "context": ContextConfig,
    "algorithm": AlgorithmConfig,
    "loss": LossConfig,
    "generation": GenerationConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "evaluation": EvaluationConfig,
    "numerics": NumericsConfig,
    "game": GameConfig,
}


@dataclass
class TrainConfig:
    model: Optional[ModelConfig] = None
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(mode="self"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    numerics: NumericsConfig = field(default_factory=NumericsConfig)
    game: Optional[GameConfig] = None
    """Set: train on a text game (the Trainer's training.games.GameSource); data.train/data.eval are level files."""

    def __post_init__(self):
        if not self.data.train:
            raise ConfigError("data.train is required: a JSONL file of {\"prompt\": ...} lines")
        if self.model is None and not self.checkpoint.pretrained:
            raise ConfigError("give the student: a `model:` section or checkpoint.pretrained (a converted checkpoint)")
        # Impossible splits fail here, before any rank starts (models read from checkpoints: in the Trainer).
        if self.model is not None:
            self.model.check_parallel(self.parallel, role="model", trained=True)
        if self.teacher.model is not None:
            self.teacher.model.check_parallel(self.teacher_parallel, role="teacher.model", **self.teacher_parallel_names)
        if self.teacher.own_layout(self.parallel):
            self._check_teacher_layout()
        if self.model is not None:
            check_trainable_dtype(self.model)
        if self.algorithm.name in ("offpolicy_cd", "seqkd") and self.teacher.mode == "self":
            # Allowed (the paper's self-teacher baselines), but the teacher then changes as the student learns.
            pass

    @property
    def teacher_parallel(self) -> ParallelConfig:
        """The teacher's layout (teacher.parallel over the student's parallel section)."""
        return self.teacher.layout(self.parallel)

    @property
    def teacher_parallel_names(self) -> dict:
        """check_parallel's setting names for the teacher's layout (its own, or the student's)."""
        if self.teacher.parallel is None:
            return {}
        return dict(tp_name="teacher.parallel.tensor_model_parallel_size",
                    pp_name="teacher.parallel.pipeline_model_parallel_size")

    def _check_teacher_layout(self) -> None:
        """What a teacher on its own layout does not support, each one line naming what to set."""
        t = self.teacher_parallel
        own = f"teacher.parallel (TP={t.tensor_model_parallel_size} PP={t.pipeline_model_parallel_size})"
        if self.parallel.pipeline_model_parallel_size > 1:
            raise ConfigError(f"{own} needs a student at parallel.pipeline_model_parallel_size=1; set it to 1 or "
                              "remove teacher.parallel (the teacher then shares the student's layout)")
        if self.parallel.sequence_parallel:
            raise ConfigError(f"{own} does not combine with parallel.sequence_parallel=true; set "
                              "parallel.sequence_parallel=false or remove teacher.parallel")
        if self.algorithm.name != "opcd":
            p = self.parallel
            raise ConfigError(f"{own} is for algorithm.name=opcd (in {self.algorithm.name} the teacher generates "
                              "on the student's ranks); put the teacher in the student's layout: "
                              f"teacher.parallel.tensor_model_parallel_size={p.tensor_model_parallel_size} "
                              f"teacher.parallel.pipeline_model_parallel_size={p.pipeline_model_parallel_size}")
        if self.game is not None:
            raise ConfigError(f"{own} is for prompt training (games play the teacher on the student's ranks); "
                              "remove teacher.parallel or the game section")
        if self.parallel.expert_model_parallel_size > 1 or (self.teacher.model is not None and self.teacher.model.is_moe):
            # The teacher's own groups carry no expert-parallel dimension (parallel.teacher_groups).
            raise ConfigError(f"{own} is for dense models without expert parallelism; remove teacher.parallel "
                              "(an MoE teacher shares the student's layout and EP groups)")

    def divergence(self, vocab_size: Optional[int] = None) -> DivergenceSpec:
        """The divergence the loss section asks for (`LossConfig.build`)."""
        return self.loss.build(algorithm=self.algorithm.name, generation_temperature=self.generation.temperature,
                               vocab_size=vocab_size)

    @property
    def loss_kind(self) -> str:
        return self.divergence().kind

    @property
    def loss_topk_from(self) -> str:
        return self.divergence().topk_from

    @property
    def loss_temperature(self) -> float:
        return self.divergence().temperature

    def check_batches(self, dp_size: int) -> int:
        """Micro-batches per step on one data-parallel rank."""
        g, m = self.schedule.global_batch_size, self.schedule.micro_batch_size
        if g % (m * dp_size):
            raise ConfigError(
                f"schedule.global_batch_size={g} is not divisible by schedule.micro_batch_size={m} x "
                f"data-parallel size {dp_size}; choose sizes with global = k x micro x DP"
            )
        return g // (m * dp_size)


def _normalise(data: dict) -> dict:
    teacher = data.get("teacher")
    if teacher == "self":
        data["teacher"] = {"mode": "self"}
    elif isinstance(teacher, str):
        raise ConfigError(f"teacher: {teacher!r} is not understood; use `teacher: self` or a mapping with `checkpoint:`")
    return data


def load_train_config(path: Optional[str], overrides: list[str] = ()) -> TrainConfig:
    """YAML file (optional) + `key=value` overrides -> a validated TrainConfig."""
    data = load_yaml(path) if path else {}
    data = _normalise(apply_overrides(_normalise(data), list(overrides)))
    unknown = sorted(set(data) - set(SECTION_TYPES))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(SECTION_TYPES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; sections are: {', '.join(SECTION_TYPES)}"
        raise ConfigError(f"unknown config section '{unknown[0]}'{hint}")
    kwargs = {}
    for name, value in data.items():
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {value!r}")
        kwargs[name] = from_dict(SECTION_TYPES[name], value, name)
    return TrainConfig(**kwargs)


def to_yaml_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)

