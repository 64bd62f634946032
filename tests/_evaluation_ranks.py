"""Rank functions for tests/test_evaluation.py, tests/test_experience.py and tests/test_synthetic.py
(module level: the launcher pickles them by reference)."""

from __future__ import annotations

CFG = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
           make_vocab_size_divisible_by=64, max_position_embeddings=128, init_method_std=0.2)
CONTEXT = "Always answer like a pirate."
PROMPTS = ["what is the sea", "name a ship", "how deep is it", "where is the gold", "who sails", "why"]


def _setup(tok_path: str, seed: int = 3, positions: int = 128):
    from megatron_opcd import parallel
    from megatron_opcd.config import ModelConfig
    from megatron_opcd.data.render import PromptRenderer
    from megatron_opcd.data.tokenizer import load_tokenizer
    from megatron_opcd.models import build_model

    groups = parallel.initialize()  # DP = world size
    tok = load_tokenizer(tok_path)
    cfg = ModelConfig(**{**CFG, "max_position_embeddings": positions}, vocab_size=tok.vocab_size)
    model = build_model(cfg, groups=groups, seed=seed)
    renderer = PromptRenderer(tok, use_chat_template=False, separator="\n", max_total_tokens=positions,
                              max_prompt_tokens=positions - 8, max_new_tokens=6)
    return groups, tok, cfg, model, renderer


def evaluate_suite(tok_path: str) -> dict:
    """Reference responses (one prompt at a time, no shared prefix, plain `generate`), then
    `evaluate_task` with answers that match the reference for even examples only."""
    from megatron_opcd import parallel
    from megatron_opcd.data.prompts import Example
    from megatron_opcd.evaluation import evaluate_task, get_task
    from megatron_opcd.generation import SamplingParams, generate

    groups, tok, cfg, model, renderer = _setup(tok_path)
    greedy = SamplingParams(max_new_tokens=6, greedy=True, eos_ids=tuple(tok.eos_ids))

    def alone(ids):
        out = generate(model, [ids], greedy, groups=groups, vocab_size=cfg.vocab_size)
        resp = [t for t in out.responses[0]]
        if resp and resp[-1] in tok.eos_ids:
            resp = resp[:-1]
        return tok.decode(resp)

    ref_plain = [alone(tok.encode(p)) for p in PROMPTS]
    ref_ctx = [alone(tok.encode(CONTEXT + "\n" + p)) for p in PROMPTS]
    task = get_task("exact")
    res = {"ref_plain": ref_plain, "ref_ctx": ref_ctx, "dp_size": groups.dp_size}
    ex_plain = [Example(prompt=p, answer=r if i % 2 == 0 else r + " nope", index=i)
                for i, (p, r) in enumerate(zip(PROMPTS, ref_plain))]
    ex_ctx = [Example(prompt=p, answer=r if i % 2 == 0 else r + " nope", index=i)
              for i, (p, r) in enumerate(zip(PROMPTS, ref_ctx))]
    kw = dict(groups=groups, sampling=greedy, vocab_size=cfg.vocab_size, batch_size=4)
    res["plain"] = evaluate_task(model, tok, renderer, ex_plain, task, contexts=None, **kw)
    res["ctx"] = evaluate_task(model, tok, renderer, ex_ctx, task, contexts=CONTEXT, **kw)
    res["ctx_list"] = evaluate_task(model, tok, renderer, ex_ctx, task,
                                    contexts=[CONTEXT if i < 3 else None for i in range(len(PROMPTS))], **kw)
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, seed=7)
    res["sampled_a"] = evaluate_task(model, tok, renderer, ex_plain, task, **{**kw, "sampling": sampled})
    res["sampled_b"] = evaluate_task(model, tok, renderer, ex_plain, task, **{**kw, "sampling": sampled})
    parallel.destroy()
    return res


def experience_suite(tok_path: str, problems: list[dict]) -> dict:
    """The experience procedure on a random tiny model through `ModelCompleter`: only mechanics."""
    from megatron_opcd import parallel
    from megatron_opcd.data.prompts import Example
    from megatron_opcd.evaluation import get_task
    from megatron_opcd.evaluation.experience import ModelCompleter, extract_pool
    from megatron_opcd.evaluation.templates import load_prompt
    from megatron_opcd.generation import SamplingParams

    groups, tok, cfg, model, renderer = _setup(tok_path, positions=512)  # the reflect prompt is long
    calls = []
    complete = ModelCompleter(model, tok, renderer, groups=groups, vocab_size=cfg.vocab_size, batch_size=2,
                              sampling=SamplingParams(max_new_tokens=5, temperature=1.0),
                              reflect_sampling=SamplingParams(max_new_tokens=7, temperature=1.0))

    def spy(prompts, contexts, *, seed, phase):
        out = complete(prompts, contexts, seed=seed, phase=phase)
        calls.append({"phase": phase, "n": len(prompts), "contexts": contexts,
                      "tokens": [len(tok.encode(o)) for o in out]})
        return out

    examples = [Example(**p, index=i) for i, p in enumerate(problems)]
    runs = extract_pool(spy, examples, get_task("exact"), seeds=[0, 1, 2], count_tokens=lambda s: len(tok.encode(s)),
                        max_items_tokens=64, reflect_template=load_prompt("experience_reflect"))
    parallel.destroy()
    return {"calls": calls, "runs": [(r.seed, [s.problem for s in r.steps], [s.response for s in r.steps])
                                     for r in runs]}


def synthetic_pretrain(out_dir: str, steps: int) -> dict:
    """Pre-train the synthetic model, then measure it with `evaluate_task`."""
    from megatron_opcd.evaluation.synthetic import pretrain_synthetic_model

    art = pretrain_synthetic_model(out_dir, steps=steps, log=None)
    res = synthetic_measure(str(art.checkpoint), str(art.tokenizer_dir), str(art.eval_file))
    res["metrics"] = art.metrics
    res["paths"] = {k: str(getattr(art, k)) for k in ("checkpoint", "train_file", "eval_file", "config",
                                                        "context_file", "tokenizer_dir")}
    return res


def synthetic_measure(ckpt: str, tok_dir: str, eval_file: str, teacher_ckpt: str | None = None) -> dict:
    """Greedy accuracy (sort and copy) of `ckpt` without the context, of `teacher_ckpt` (default:
    the same) with it, and the student's agreement with the teacher's outputs."""
    from megatron_opcd import parallel
    from megatron_opcd.checkpointing import load_model_weights, read_model_config
    from megatron_opcd.data.prompts import load_examples
    from megatron_opcd.data.render import PromptRenderer
    from megatron_opcd.data.tokenizer import load_tokenizer
    from megatron_opcd.evaluation import evaluate_task, get_task
    from megatron_opcd.evaluation.synthetic import CONTEXT
    from megatron_opcd.evaluation.tasks import SEPARATOR
    from megatron_opcd.generation import SamplingParams
    from megatron_opcd.models import build_model

    groups = parallel.initialize()
    tok = load_tokenizer(tok_dir)
    cfg = read_model_config(ckpt)

    def load(path):
        m = build_model(cfg, groups=groups, init=False)
        load_model_weights(m, path)
        return m

    student = load(ckpt)
    teacher = load(teacher_ckpt or ckpt)
    renderer = PromptRenderer(tok, use_chat_template=False, separator=SEPARATOR, max_total_tokens=64)
    examples = load_examples(eval_file)
    kw = dict(groups=groups, sampling=SamplingParams(max_new_tokens=8, greedy=True), vocab_size=cfg.vocab_size)
    out = {}
    for rule in ("sort", "copy"):
        task = get_task("synthetic", rule=rule)
        out[f"student_{rule}"] = evaluate_task(student, tok, renderer, examples, task, **kw)["accuracy"]
        out[f"teacher_{rule}"] = evaluate_task(teacher, tok, renderer, examples, task, contexts=CONTEXT,
                                               **kw)["accuracy"]
    s = evaluate_task(student, tok, renderer, examples, get_task("exact"), **kw)["samples"]
    t = evaluate_task(teacher, tok, renderer, examples, get_task("exact"), contexts=CONTEXT, **kw)["samples"]
    out["agreement"] = sum(a["response"] == b["response"] for a, b in zip(s, t)) / len(s)
    # Per-character agreement: a finer measure than whole-string equality.
    same = total = 0
    for a, b in zip(s, t):
        x, y = a["response"], b["response"]
        total += max(len(x), len(y))
        same += sum(p == q for p, q in zip(x, y))
    out["char_agreement"] = same / max(total, 1)
    parallel.destroy()
    return out


CORPUS = (
    "the sea is deep and the ship sails to the gold . a pirate says ahoy to the crew . "
    "experience item : check the answer before you write it . the answer is 42 . "
    "what is the sea ? name a ship . how deep is it ? where is the gold ? who sails ? why ? "
    "- EXPERIENCE ITEM: Always check the units . ANSWER: 7 . GRADE PROBLEM RESPONSE "
)


def train_sp_tokenizer(folder) -> str:
    """A 256-piece BPE sentencepiece model trained in-process (well under a second)."""
    import io
    from pathlib import Path

    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    lines = [CORPUS[i:] + CORPUS[:i] for i in range(0, len(CORPUS), 7)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
                                   vocab_size=256, character_coverage=1.0, unk_id=0, eos_id=1, bos_id=-1,
                                   pad_id=-1, minloglevel=2, hard_vocab_limit=False)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    return str(folder)


ITEM = "- EXPERIENCE ITEM: Always check the units ."


def write_item_emitter(out_dir: str, tok_path: str, steps: int = 40, max_prompt: int = 120) -> str:
    """A tiny checkpoint trained for a few seconds to answer anything (prompts of up to
    `max_prompt` tokens) with ITEM: a stand-in teacher whose reflections parse, so the CLI's whole
    path (pool, selection) runs."""
    import random as _random

    from megatron_opcd import parallel
    from megatron_opcd.checkpointing import save_checkpoint
    from megatron_opcd.config import ModelConfig
    from megatron_opcd.data.tokenizer import load_tokenizer
    from megatron_opcd.evaluation.synthetic import train_responses
    from megatron_opcd.models import build_model

    groups = parallel.initialize()
    tok = load_tokenizer(tok_path)
    cfg = ModelConfig(**{**CFG, "max_position_embeddings": max(512, 4 * max_prompt), "init_method_std": 0.02},
                      vocab_size=tok.vocab_size)
    model = build_model(cfg, groups=groups, seed=5)
    item = tok.encode(ITEM) + [tok.eos_ids[0]]

    def batch(rng: _random.Random):
        rows = []
        for _ in range(8):
            prefix = [rng.randrange(2, tok.vocab_size) for _ in range(rng.randint(2, max_prompt))]
            rows.append((prefix + item, len(prefix)))
        return rows

    train_responses(model, cfg.vocab_size, batch, steps=steps, lr=3e-3, seed=0)
    path = save_checkpoint(out_dir, model, cfg, tokenizer_dir=tok_path)
    parallel.destroy()
    return str(path)
