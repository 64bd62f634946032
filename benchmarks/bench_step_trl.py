"""TRL's side of bench_step.py: the Hugging Face models, and TRL's GKDTrainer and SDFTTrainer set up
as our trainer is (see bench_step.py's docstring), each timed step by step in a process of its own.

`trl_worker` is the process's entry point (bench_step.py starts it with spawn and sends "round" for
each timed round); `build_hf` is shared with bench_step.py, which loads the same weights into ours.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def build_hf(args, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(4096, args.context_tokens + args.prompt_tokens + args.new_tokens + 64),
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=None, pad_token_id=0, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    # No EOS: every response runs to max_new_tokens (GKD copies this into its generation config).
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model



# ----------------------------------------------------------------------------------------------
# TRL, in a process of its own: importing megatron_opcd pushes a CPU shim (a TorchFunctionMode that
# sees every torch call) and our process group of one sets RANK/WORLD_SIZE, which accelerate would
# take for a multi-CPU run (torch DDP around TRL's model). Neither belongs to a TRL run.


def trl_worker(conn, args, tok_dir: str, prompts: list[str], work: str):
    """Builds the same models and GKDTrainer, then runs one timed round per request."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tok_dir)
    student_hf, teacher_hf = build_hf(args, args.seed + 1), build_hf(args, args.seed + 2)
    sums = (checksum(student_hf), checksum(teacher_hf))
    runs = {"trl": build_trl(args, Path(work), hf_tok, prompts, student_hf, teacher_hf)}
    if not args.no_sdft:
        runs["sdft"] = build_sdft(args, Path(work), hf_tok, prompts, student_hf)
    gkd = runs["trl"][0]
    conn.send({"checksums": sums, "mode": str(gkd.args.parallel_mode), "threads": torch.get_num_threads(),
               "sdft_checksums": [checksum(m) for m in runs["sdft"][3]] if "sdft" in runs else None})
    while conn.recv() == "round":
        out = {}
        for name, (trainer, clock, record, _) in runs.items():
            torch.set_num_threads(args.threads)
            out[name] = time_trl(trainer, clock, record, args.steps)
        conn.send(out)
    conn.close()


@torch.no_grad()
def checksum(model) -> float:
    return float(sum(p.double().sum() for p in model.parameters()))


class StepClock:
    """Wall and process CPU time at every `on_step_end` (a transformers TrainerCallback)."""

    def __init__(self):
        self.ends: list[tuple[float, float]] = []

    def hook(self):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.ends.append((time.perf_counter(), time.process_time()))

        return _Callback()


def build_trl(args, work: Path, hf_tok, prompts: list[str], student_hf, teacher_hf):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "w0"}]} for p in prompts]
    config = GKDConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        learning_rate=1e-6, max_grad_norm=1.0, lmbda=1.0, beta=1.0, temperature=1.0,
        max_new_tokens=args.new_tokens, max_steps=args.steps + 1, logging_steps=1_000_000, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, disable_tqdm=True,
        dataloader_num_workers=0, seed=args.seed, max_length=4 * (args.prompt_tokens + args.new_tokens),
    )
    clock = StepClock()
    trainer = GKDTrainer(model=student_hf, teacher_model=teacher_hf, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=hf_tok, callbacks=[clock.hook()])
    # Count the tokens GKD actually trains on and time its generation (a wrapper, same call; an
    # instance attribute, called unbound like the staticmethod it shadows).
    trainer.generate_on_policy_outputs, record = timed_generation(
        trainer.generate_on_policy_outputs,
        tokens=lambda out: int((out[2] != -100).sum()),  # labels: -100 on prompt and padding
        prompt_len=lambda model, inputs, generation_config: int(inputs["prompts"].shape[1]))
    return trainer, clock, record, (trainer.model, trainer.teacher_model)


def timed_generation(generate, *, tokens, prompt_len):
    """`generate` wrapped to record, per call, its wall and CPU seconds, the response tokens it
    made (`tokens(output)`) and the prompt length (`prompt_len(*args)`): what `time_trl` reads."""
    record = {"tokens": [], "generate": []}

    def wrapper(*args):
        t0 = time.perf_counter(), time.process_time()
        out = generate(*args)
        record["generate"].append((time.perf_counter() - t0[0], time.process_time() - t0[1]))
        record["tokens"].append(tokens(out))
        record["prompt_len"] = prompt_len(*args)
        return out

    return wrapper, record


def build_sdft(args, work: Path, hf_tok, prompts: list[str], student_hf):
    """TRL's SDFTTrainer (trl.experimental.sdft; Shenfeld et al. 2026, "Self-Distillation Enables
    Continual Learning"): on-policy, the teacher sees a privileged context the student does not,
    the loss is a divergence over the student's top-k. Set up as OPCD: `distillation_alpha=1.0`
    (reverse KL), `distillation_topk=256`, the top-k renormalised (`distillation_add_tail=False`),
    one generation per prompt; the teacher is SDFT's default "base", a frozen copy of the initial
    student (loaded from the folder the student is loaded from); the privileged context is "w1",
    put before the prompt in the user turn as ours does (`sdft_twin`)."""
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    folder = work / "sdft_student"
    student_hf.save_pretrained(str(folder))  # SDFT builds its "base" teacher from the student's path
    student = LlamaForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa")
    student.generation_config.eos_token_id = None
    rows = [{"prompt": [{"role": "user", "content": p}], "privileged_context": "w1"} for p in prompts]
    config = SDFTConfig(
        output_dir=str(work / "sdft"), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        num_generations=1, learning_rate=1e-6, max_grad_norm=1.0, temperature=1.0, top_k=0, top_p=1.0,
        max_completion_length=args.new_tokens, max_prompt_length=None, distillation_mode="topk_logits",
        distillation_topk=256, distillation_alpha=1.0, distillation_add_tail=False, teacher_model_kind="base",
        teacher_prompt_template="{privileged_context}\n\n{prompt}", max_steps=args.steps + 1,
        logging_steps=1_000_000, save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, disable_tqdm=True, dataloader_num_workers=0, seed=args.seed,
    )
    clock = StepClock()
    trainer = SDFTTrainer(model=student, args=config, train_dataset=Dataset.from_list(rows), processing_class=hf_tok,
                          callbacks=[clock.hook()])
    # No EOS, as on the other sides: SDFT adds the tokenizer's EOS to the generation config and cuts
    # completions after it; neither happens here (-1 is no token id), so every response has 64 tokens.
    trainer.generation_config.eos_token_id = None
    trainer.eos_token_ids = [-1]
    trainer._generate, record = timed_generation(
        trainer._generate, tokens=lambda out: sum(len(c) for c in out[1]),  # (prompt ids, completion ids)
        prompt_len=lambda prompt_ids: len(prompt_ids[0]))
    return trainer, clock, record, (trainer.model, trainer.teacher_model)


def time_trl(trainer, clock, record, steps: int) -> dict:
    """One `train()` of steps + 1 steps; the first is a warm-up."""
    clock.ends.clear()
    record["tokens"].clear()
    record["generate"].clear()
    trainer.args.max_steps = steps + 1
    trainer.train()
    (w0, c0), (w1, c1) = clock.ends[0], clock.ends[-1]
    gen = [sum(g[i] for g in record["generate"][1:]) for i in (0, 1)]
    return {"tokens": sum(record["tokens"][1:]), "wall": w1 - w0, "cpu": c1 - c0, "prompt_len": record["prompt_len"],
            "phases": {"wall": {"rollout": gen[0], "rest (teacher + loss + update)": w1 - w0 - gen[0]},
                       "cpu": {"rollout": gen[1], "rest (teacher + loss + update)": c1 - c0 - gen[1]}}}
