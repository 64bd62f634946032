"""Typed configuration: one dataclass per component, validated in `__post_init__`, loaded from YAML
with `key=value` overrides (`model.num_layers=4`).

Rules: a docstring per field; unknown keys and wrong types are
rejected with a one-line `ConfigError` that names the field and the fix; never `assert` for user
input. Cluster facts (node counts, paths, TP/PP degrees of a real job) live in `examples/`.

The trainer's sections (data, context, algorithm, loss, generation, ...) live in
`megatron_opcd/training/config.py`; this module holds the machinery, the model and the parallel
layout.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from megatron_opcd.errors import ConfigError


# ----------------------------------------------------------------------------------------------
# Machinery: from plain dicts to typed dataclasses, loudly.


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(get_args(tp)[0])}" if get_args(tp) else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`; convert the few lossless cases YAML needs."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1 and dataclasses.is_dataclass(next(a for a in args if a is not type(None))):
            raise ConfigError(errors[0])  # an optional section: its own message names the key and the fix
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: must be one of {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads `1e-6` (no dot) as a string.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - known)
    if unknown:
        import difflib

        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"
        raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


MAX_YAML_BYTES = 4 * 2**20
"""Largest config file (a config is kilobytes; a bigger file is a mistake)."""
MAX_YAML_NODES = 100_000
"""Most values a YAML document may expand to, aliases counted at each use (a few nested aliases
can otherwise name billions: the "billion laughs")."""


def _expanded_size(node, where: str) -> int:
    """Values `node` stands for once every alias is expanded (shared nodes counted at each use)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{where}: a YAML alias refers to itself (a recursive structure); remove it")
        active.add(key)
        total = 1
        if isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total += sum(size(v) for v in n.value)
        active.discard(key)
        sizes[key] = total = min(total, MAX_YAML_NODES + 1)  # capped: the sum stays small
        return total

    return size(node)


def safe_yaml(text: str, where: str) -> Any:
    """yaml.safe_load with a bound on what aliases can expand to (ConfigError naming `where`)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, where) > MAX_YAML_NODES:
            raise ConfigError(f"{where}: the YAML expands to more than {MAX_YAML_NODES} values (nested aliases); "
                              "write the values out or use fewer aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _keeps_hash(value: Any) -> bool:
    if isinstance(value, str):
        return "#" in value
    if isinstance(value, dict):
        return any(_keeps_hash(k) or _keeps_hash(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_keeps_hash(v) for v in value)
    return False


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML). A `#` in the value is part of it
    (a command line has no comments): when YAML would read ` #...` as a comment, the value is
    the text as typed."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. model.num_layers=4)")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override '{text}' has an empty key part")
    if not raw.strip():
        return path, ""
    try:
        value = safe_yaml(raw, f"override '{text}'")
    except yaml.YAMLError as exc:
        if "#" not in raw:
            raise ConfigError(f"override '{text}': the value is not valid YAML ({str(exc).splitlines()[0]}); "
                              "quote it") from None
        value = None  # e.g. `[a, #b]`: fall back to the text as typed
    if "#" in raw and not _keeps_hash(value):
        value = raw.strip()
    return path, value


def set_dotted(data: dict, path: list[str], value: Any, where: str) -> None:
    """`data[a][b][c] = value` for path `[a, b, c]`, creating missing sections; `where` names the
    setting in the error when a part on the way is a value, not a section."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{part}' is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(data, path, value, f"override '{text}'")
    return data


def peek_setting(config_path: Optional[str | Path], overrides: list[str], key: str) -> Any:
    """The value of the dotted `key` in the YAML file with the overrides applied, or None; read
    leniently, for a setting needed before the config is validated (`logging.debug` decides how a
    config error is shown): an unreadable file or a malformed override is skipped, not raised."""
    data: Any = {}
    if config_path:
        try:
            data = load_yaml(config_path)
        except ConfigError:
            pass
    for text in overrides:
        try:
            apply_overrides(data, [text])
        except ConfigError:
            pass
    for part in key.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


_TOPOLOGY = re.compile(r"(?:^|_)(\d+)n(\d+)g(?:_|$)")


def cluster_topology(name: str | Path) -> Optional[tuple[int, int]]:
    """(nodes, GPUs per node) that a cluster example's file name states (`..._2n8g_tp2pp1.yaml` ->
    (2, 8)); None for a name without one (the CPU configs). The one reading of that convention:
    the sbatch scripts, recipes, memory estimator and rehearsal all go by it."""
    m = _TOPOLOGY.search(Path(name).stem if str(name).endswith((".yaml", ".yml")) else Path(name).name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory, not a file; pass --config with a YAML file (see examples/)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file (see examples/)")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"config file {path} is {path.stat().st_size // 2**20} MiB, over the "
                          f"{MAX_YAML_BYTES // 2**20} MiB a config may have; is it the right file?")
    try:
        data = safe_yaml(path.read_text(encoding="utf-8"), f"config file {path}")
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections at the top level")
    return data


# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class ModelConfig:
    """A Llama/Qwen-family decoder built as a megatron-core GPTModel (student or teacher)."""

    num_layers: int = 2
    """Transformer layers. Must divide by the pipeline-parallel size."""

    hidden_size: int = 64
    """Width of the residual stream."""

    num_attention_heads: int = 4
    """Query heads. Must divide by the tensor-parallel size."""

    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; null means one per query head (MHA)."""

    ffn_hidden_size: Optional[int] = None
    """MLP width (per gate for SwiGLU); null means 4 x hidden_size."""

    kv_channels: Optional[int] = None
    """Head dimension; null means hidden_size / num_attention_heads."""

    vocab_size: int = 256
    """Tokens the tokenizer can produce. The embedding is padded (see make_vocab_size_divisible_by)."""

    make_vocab_size_divisible_by: int = 128
    """The embedding has ceil(vocab_size / (this x TP)) x (this x TP) rows, as in Megatron-LM;
    the padded rows are never sampled and are excluded from every loss."""

    max_position_embeddings: int = 4096
    """Longest sequence (context + prompt + response) the model accepts."""

    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Norm of each block and of the final layer."""

    norm_epsilon: float = 1e-5
    """Epsilon of every norm."""

    activation: Literal["swiglu", "gelu"] = "swiglu"
    """MLP activation: SwiGLU (Llama/Qwen) or GELU."""

    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    """Rotary (Llama/Qwen) or learned absolute positions."""

    rotary_base: int = 10000
    """RoPE theta (Llama 3: 500000; Qwen2/3: 1000000)."""

    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that is rotated."""

    rope_scaling: bool = False
    """Llama 3.1/3.2 frequency scaling of RoPE (factor/low/high/original below)."""

    rope_scaling_factor: float = 8.0
    """Llama 3.x rope scaling factor (3.1: 8, 3.2: 32)."""

    rope_low_freq_factor: float = 1.0
    """Llama 3.x rope scaling low_freq_factor."""

    rope_high_freq_factor: float = 4.0
    """Llama 3.x rope scaling high_freq_factor."""

    rope_original_max_position_embeddings: int = 8192
    """Llama 3.x rope scaling original_max_position_embeddings."""

    add_qkv_bias: bool = False
    """Bias on the query/key/value projection (Qwen2/2.5)."""

    add_bias_linear: bool = False
    """Bias on the other linear layers (none in Llama/Qwen)."""

    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (Qwen3)."""

    tie_embeddings: bool = True
    """Share the input embedding and the output layer (small Llama/Qwen models)."""

    params_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Dtype of the parameters and activations. fp32 on CPU; bf16 on GPUs."""

    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """Layer spec: megatron-core's local modules, or Transformer Engine's (GPU only)."""

    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 format for Transformer Engine layers; null disables FP8. Needs transformer_impl=transformer_engine."""

    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """FP8 scaling recipe: delayed (amax history) or tensorwise (current scaling), mxfp8 (Blackwell), blockwise."""

    fp8_amax_history_len: int = 1024
    """Delayed scaling: length of the amax history window."""

    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """Delayed scaling: how the scale is derived from the amax history."""

    init_method_std: float = 0.02
    """Standard deviation of the random initialisation (used when no checkpoint is loaded)."""

    attention_dropout: float = 0.0
    """Dropout on attention probabilities (0 for distillation)."""

    hidden_dropout: float = 0.0
    """Dropout on the residual branches (0 for distillation)."""

    num_experts: Optional[int] = None
    """Routed experts of every layer's mixture-of-experts MLP (Qwen3-MoE: every layer is MoE);
    null means a dense MLP. Built with megatron-core's MoELayer (router, experts, all-to-all
    token dispatcher); the experts split over parallel.expert_model_parallel_size ranks."""

    moe_router_topk: int = 2
    """Experts each token is routed to (HF's num_experts_per_tok)."""

    moe_ffn_hidden_size: Optional[int] = None
    """FFN width of one expert (per gate for SwiGLU; HF's moe_intermediate_size); required with num_experts."""

    moe_shared_expert_intermediate_size: Optional[int] = None
    """FFN width of the shared expert every token also goes through (null: none, as in Qwen3-MoE)."""

    moe_norm_topk_prob: bool = True
    """Qwen3-MoE's norm_topk_prob: the top-k weights are renormalised to sum to 1 (softmax over the
    top-k logits, which equals softmax over all experts renormalised over the top k); false keeps
    the top-k probabilities of the softmax over all experts (megatron's pre-softmax routing)."""

    moe_aux_loss_coeff: float = 0.0
    """Weight of megatron's load-balancing auxiliary loss (0: off). Trained models only: a frozen
    teacher never adds it."""

    def __post_init__(self):
        positive = ["num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_position_embeddings"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_query_groups is not None:
            if self.num_query_groups <= 0 or self.num_attention_heads % self.num_query_groups:
                raise ConfigError(
                    f"model.num_query_groups={self.num_query_groups} must divide "
                    f"model.num_attention_heads={self.num_attention_heads}"
                )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                f"{self.num_attention_heads}; set model.kv_channels (head dimension) explicitly"
            )
        if self.make_vocab_size_divisible_by <= 0:
            raise ConfigError("model.make_vocab_size_divisible_by must be positive (128 is Megatron's default)")
        if self.fp8 is not None and self.transformer_impl != "transformer_engine":
            raise ConfigError(
                f"model.fp8={self.fp8!r} needs model.transformer_impl=transformer_engine (FP8 runs in TE layers)"
            )
        if not 0.0 <= self.attention_dropout < 1.0 or not 0.0 <= self.hidden_dropout < 1.0:
            raise ConfigError("model.attention_dropout and model.hidden_dropout must be in [0, 1)")
        self._check_moe()

    def _check_moe(self) -> None:
        if self.num_experts is None:
            return
        if self.num_experts < 1:
            raise ConfigError(f"model.num_experts must be positive (or null for a dense MLP), got {self.num_experts}")
        if not 1 <= self.moe_router_topk <= self.num_experts:
            raise ConfigError(f"model.moe_router_topk={self.moe_router_topk} must be in [1, model.num_experts="
                              f"{self.num_experts}]")
        if self.moe_ffn_hidden_size is None or self.moe_ffn_hidden_size <= 0:
            raise ConfigError("model.num_experts is set: set model.moe_ffn_hidden_size (one expert's FFN width, "
                              "HF's moe_intermediate_size) to a positive integer")
        shared = self.moe_shared_expert_intermediate_size
        if shared is not None and shared <= 0:
            raise ConfigError(f"model.moe_shared_expert_intermediate_size must be positive or null, got {shared}")
        if self.moe_aux_loss_coeff < 0:
            raise ConfigError(f"model.moe_aux_loss_coeff must be >= 0 (0 turns it off), got {self.moe_aux_loss_coeff}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    def padded_vocab_size(self, tp: int) -> int:
        """Rows of the (TP-sharded) embedding: a multiple of make_vocab_size_divisible_by x TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    @property
    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.params_dtype]

    def tp_sizes(self) -> list[int]:
        """Tensor-parallel sizes this model can take (they divide the heads, query groups and FFN)."""
        return [t for t in range(1, self.num_attention_heads + 1)
                if not (self.num_attention_heads % t or self.query_groups % t or self.ffn_size % t
                        or any(size % t for size in self._moe_widths()))]

    def _moe_widths(self) -> list[int]:
        """The MoE FFN widths that TP splits (the experts' under expert TP = TP, the shared expert's)."""
        if not self.is_moe:
            return []
        return [self.moe_ffn_hidden_size] + [w for w in (self.moe_shared_expert_intermediate_size,) if w]

    def ep_sizes(self) -> list[int]:
        """Expert-parallel sizes this model can take (they divide the experts)."""
        return [e for e in range(1, (self.num_experts or 1) + 1) if not (self.num_experts or 1) % e]

    def pp_sizes(self) -> list[int]:
        """Pipeline-parallel sizes this model can take (they divide the layers)."""
        return [p for p in range(1, self.num_layers + 1) if not self.num_layers % p]

    def check_parallel(self, parallel: "ParallelConfig", role: str = "model", *,
                       tp_name: str = "parallel.tensor_model_parallel_size",
                       pp_name: str = "parallel.pipeline_model_parallel_size", trained: bool = False) -> None:
        """Reject splits this model cannot take; `role` names the config section in messages and
        `tp_name`/`pp_name` the setting (a CLI passes its own flags, e.g. `--tp`). `trained`: the
        model will be trained (the student), which an MoE model under TP can only with SP."""
        tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
        sizes = f"; TP sizes this model takes: {', '.join(map(str, self.tp_sizes()))}"
        for field_name, value in (("num_attention_heads", self.num_attention_heads),
                                  ("num_query_groups", self.query_groups), ("ffn_hidden_size", self.ffn_size)):
            if value % tp:
                raise ConfigError(f"{role}.{field_name}={value} is not divisible by {tp_name}={tp}{sizes}")
        if self.num_layers % pp:
            raise ConfigError(
                f"{role}.num_layers={self.num_layers} is not divisible by {pp_name}={pp}; "
                f"PP sizes this model takes: {', '.join(map(str, self.pp_sizes()))}"
            )
        if not self.is_moe:
            return  # EP does not touch a dense model (e.g. a dense student beside an MoE teacher)
        if trained and tp > 1 and not parallel.sequence_parallel:
            # megatron-core's MoELayer refuses to train under TP without SP (moe_layer.py: "performance
            # may degrade"): the dispatcher expects each TP rank to hold its own slice of the tokens.
            raise ConfigError(f"{role}.num_experts is set and {tp_name}={tp}: megatron-core's MoE layer needs "
                              "sequence parallelism with TP; set parallel.sequence_parallel=true")
        ep, etp = parallel.expert_model_parallel_size, parallel.expert_tp_size
        if self.num_experts % ep:
            raise ConfigError(f"{role}.num_experts={self.num_experts} is not divisible by "
                              f"parallel.expert_model_parallel_size={ep}; EP sizes this model takes: "
                              f"{', '.join(map(str, self.ep_sizes()))}")
        if self.moe_ffn_hidden_size % etp:
            raise ConfigError(f"{role}.moe_ffn_hidden_size={self.moe_ffn_hidden_size} is not divisible by the "
                              f"expert tensor-parallel size {etp}; set parallel.expert_tensor_parallel_size to a "
                              "divisor of it")
        shared = self.moe_shared_expert_intermediate_size
        if shared and shared % tp:
            raise ConfigError(f"{role}.moe_shared_expert_intermediate_size={shared} is not divisible by {tp_name}={tp}")


# ----------------------------------------------------------------------------------------------
# The parallel layout


@dataclass
class ParallelConfig:
    """How the ranks of the job are split. Data parallelism takes what TP x PP leaves."""

    tensor_model_parallel_size: int = 1
    """Ranks that split each layer's weights (and the vocabulary)."""

    pipeline_model_parallel_size: int = 1
    """Ranks that split the stack of layers into stages."""

    sequence_parallel: bool = False
    """Split norms and dropout along the sequence across the TP ranks (needs TP > 1)."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (megatron-core's distributed optimizer)."""

    backend: Optional[Literal["nccl", "gloo"]] = None
    """torch.distributed backend; null picks nccl with CUDA, gloo without."""

    distributed_timeout_minutes: int = 10
    """A collective that waits longer than this fails instead of hanging (e.g. a rank died)."""

    seed: int = 1234
    """Base seed for the model-parallel RNG states (megatron's model_parallel_cuda_manual_seed)."""

    expert_model_parallel_size: int = 1
    """Ranks that split the experts of mixture-of-experts layers (EP). megatron-core lays the expert
    groups over the data-parallel x tensor-parallel ranks of a pipeline stage: EP x expert TP must
    divide DP x TP. Dense layers and attention are unaffected."""

    expert_tensor_parallel_size: Optional[int] = None
    """Ranks that split each expert's weights (expert TP); null means the tensor-parallel size
    (megatron-core's default)."""

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "distributed_timeout_minutes",
                     "expert_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.expert_tensor_parallel_size is not None and self.expert_tensor_parallel_size < 1:
            raise ConfigError(f"parallel.expert_tensor_parallel_size must be >= 1 or null (= TP), got "
                              f"{self.expert_tensor_parallel_size}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError(
                "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1; "
                "set sequence_parallel=false or raise TP"
            )

    def check_world_size(self, world_size: int) -> None:
        mp = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if world_size % mp:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size x "
                f"pipeline_model_parallel_size = {self.tensor_model_parallel_size} x "
                f"{self.pipeline_model_parallel_size}; launch a multiple of {mp} ranks"
            )
        # megatron-core's expert grid: per pipeline stage, the world/PP ranks split into
        # expert TP x EP x expert DP, so EP x expert TP must divide DP x TP (initialize_model_parallel).
        per_stage = world_size // self.pipeline_model_parallel_size
        expert_mp = self.expert_model_parallel_size * self.expert_tp_size
        if per_stage % expert_mp:
            raise ConfigError(
                f"expert_model_parallel_size x expert tensor-parallel size = {self.expert_model_parallel_size} x "
                f"{self.expert_tp_size} does not divide the {per_stage} ranks of a pipeline stage (world size "
                f"{world_size} / pipeline_model_parallel_size {self.pipeline_model_parallel_size}); lower "
                "parallel.expert_model_parallel_size or launch more ranks"
            )

    @property
    def expert_tp_size(self) -> int:
        """Expert tensor-parallel size: expert_tensor_parallel_size, or TP where it is null."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size


__all__ = [
    "ModelConfig",
    "ParallelConfig",
    "apply_overrides",
    "from_dict",
    "load_yaml",
    "parse_override",
    "peek_setting",
    "set_dotted",
    "to_dict",
    "field",
]
