"""Checkpoint conversion to and from Hugging Face (issue 5).

Tiny random Llama (rope scaling, GQA, untied), Qwen2 (QKV bias, tied) and Qwen3 (QK-norm,
head_dim != hidden/heads, untied) models are built here with transformers, with a sentencepiece
tokenizer trained in-process (no downloads). The reference is always the HF model itself:

- HF -> megatron at TP=1, TP=2, PP=2: logits equal HF's within 1e-4 (fp32) and greedy tokens equal
  HF `generate`'s; converted checkpoints load at other layouts with the same logits;
- HF -> megatron -> HF and megatron -> HF -> megatron give bit-identical tensors;
- a checkpoint written by `checkpointing.save_checkpoint` from a TP=2 model (what the trainer
  writes) exports to HF and generates the same greedy tokens there;
- tokenizers travel with the checkpoints; bad inputs fail with one-line errors.

Greedy tokens on the megatron side come from a plain full-forward loop (tests/_convert_ranks.py)
at every layout, and from `python -m megatron_opcd.generate` (KV cache) for one checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _convert_ranks import many_cases
from _numerics import assert_f32_close

REPO = Path(__file__).resolve().parents[1]
VOCAB = 250  # padded to 256 by make_vocab_size_divisible_by=64 at TP=1 and TP=2 (6 zero rows), 288/384 by 96
B, S, P, NEW = 2, 12, 5, 6
ARCHS = ("llama", "qwen2", "qwen3")
SEEDS = {"llama": 1, "qwen2": 1, "qwen3": 2}  # fixed; greedy top-1 margins >= 1e-2 (checked by _hf_generate)
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def _make_tokenizer(folder: Path) -> Path:
    """A 240-piece sentencepiece BPE trained in-process, saved as an HF tokenizer (+ tokenizer.model)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    rnd = random.Random(0)
    words = ("alpha beta gamma delta omega red green blue cat dog run jump the a is over under hello world "
             "model token train teacher student reason answer").split()
    # Plus made-up words: BPE needs enough distinct text to learn 240 pieces.
    words += ["".join(rnd.choice("bcdfghklmnprstvz") + rnd.choice("aeiou") for _ in range(rnd.randint(2, 4)))
              for _ in range(150)]
    lines = [" ".join(rnd.choice(words) for _ in range(12)) for _ in range(400)]
    raw = folder / "sp"
    raw.mkdir(parents=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(raw / "tokenizer"),
                                   vocab_size=240, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    tok = AutoTokenizer.from_pretrained(str(raw))
    tok.chat_template = CHAT_TEMPLATE
    out = folder / "tok"
    tok.save_pretrained(str(out))
    shutil.copy(raw / "tokenizer.model", out / "tokenizer.model")
    return out


def _make_hf(arch: str, folder: Path, tok_dir: Path) -> Path:
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        # Llama 3 rope scaling with a small original context so that it changes most frequencies.
        rope = dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=32)
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, tie_word_embeddings=False, rope_parameters=rope,
                                             **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, tie_word_embeddings=True,
                                             rope_parameters=dict(rope_type="default", rope_theta=1e6), **common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=2, head_dim=32, tie_word_embeddings=False,
                                             rope_parameters=dict(rope_type="default", rope_theta=1e6), **common))
    gen = torch.Generator().manual_seed(SEEDS[arch])
    with torch.no_grad():
        # Norms, biases and weights all away from their init values, so a dropped or misplaced one shows.
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.3 * noise if "norm" in name else 0.3 * noise if name.endswith("bias") else 0.1 * noise)
    model.eval()
    path = folder / arch
    model.save_pretrained(str(path))
    for f in tok_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def _hf_generate(model, prompts: torch.Tensor) -> torch.Tensor:
    """HF greedy tokens. Every step's top-1 logit must lead the runner-up by 1e-3 or more: with a
    near tie, fp32 rounding differences could flip the argmax and the comparison would be luck."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=NEW, min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=cfg,
                             output_scores=True, return_dict_in_generate=True)
    margin = min(float((s.topk(2, dim=-1).values.diff(dim=-1).abs()).min()) for s in out.scores)
    assert margin > 1e-3, f"greedy top-1 margin {margin:.1e}: pick another seed for this test model"
    return out.sequences


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _cli_main(*args: str) -> int:
    """The CLI's main() in this process (a subprocess would import megatron-core again: ~10 s on
    2 cores); test_one_line_errors runs the script itself as a subprocess."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import convert_checkpoint
    finally:
        sys.path.remove(str(REPO / "tools"))
    return convert_checkpoint.main(list(args))


def _last(results: list) -> dict:
    """The last pipeline stage's TP-rank-0 result of one case across ranks."""
    return next(r for r in results if r["last"] and r["tp_rank"] == 0)


@pytest.fixture(scope="module")
def world(run_ranks, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from megatron_opcd.config import to_dict
    from megatron_opcd.convert import hf_to_megatron, megatron_to_hf, model_config_from_hf

    root = tmp_path_factory.mktemp("convert")
    tok_dir = _make_tokenizer(root)
    hf = {a: _make_hf(a, root / "hf", tok_dir) for a in ARCHS}
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (B, S), generator=gen)
    prompts = torch.randint(3, VOCAB, (B, P), generator=gen)
    ref = {}
    for a in ARCHS:
        model = AutoModelForCausalLM.from_pretrained(str(hf[a]), dtype=torch.float32).eval()
        with torch.no_grad():
            ref[a] = {"logits": model(tokens).logits.float(), "greedy": _hf_generate(model, prompts)}
    ck = {a: root / f"ck_{a}" for a in ARCHS}

    # HF -> megatron checkpoints: the CLI at TP=2 (llama), the API at PP=2 (qwen2) and TP=2 (qwen3).
    assert _cli_main("hf-to-megatron", "--hf", str(hf["llama"]), "--out", str(ck["llama"]), "--tp", "2",
                     "--dtype", "fp32", "--make-vocab-size-divisible-by", "64") == 0
    # Qwen2 pads its vocabulary to a multiple of 96 (288 rows at TP=1/PP=2, 384 at TP=2): megatron's
    # dist_checkpointing loads the embedding across the different padding (allow_shape_mismatch).
    hf_to_megatron(hf["qwen2"], ck["qwen2"], tp=1, pp=2, make_vocab_size_divisible_by=96)
    hf_to_megatron(str(hf["qwen3"]), ck["qwen3"], tp=2, pp=1, dtype="fp32", make_vocab_size_divisible_by=64)

    io = dict(tokens=tokens, prompts=prompts, new_tokens=NEW)
    qwen3_cfg = json.loads((hf["qwen3"] / "config.json").read_text())
    # init_method_std=0.1: logits spread enough for unambiguous greedy choices (see _hf_generate).
    student_cfg = {**to_dict(model_config_from_hf(qwen3_cfg, make_vocab_size_divisible_by=64)), "init_method_std": 0.1}
    trainer_ck = root / "trainer_ck"
    two_cases = [dict(tp=2, pp=1, hf_dir=str(hf[a]), **io) for a in ARCHS]
    two_cases += [dict(tp=1, pp=2, hf_dir=str(hf[a]), **io) for a in ARCHS]
    two_cases += [
        dict(tp=1, pp=2, load_dir=str(ck["llama"]), **io),  # written at TP=2
        dict(tp=2, pp=1, load_dir=str(ck["qwen2"]), **io),  # written at PP=2 with 288 vocab rows, read with 384
        # What the trainer writes: save_checkpoint of a TP=2 model (random "trained" weights).
        dict(tp=2, pp=1, random_config=student_cfg, save_dir=str(trainer_ck),
             tokenizer_dir=str(ck["qwen3"] / "tokenizer"), **io),
    ]
    two = run_ranks(many_cases, 2, two_cases, timeout=400)
    two = [_last([r[i] for r in two]) for i in range(len(two_cases))]

    # Megatron -> HF: the CLI for the trainer checkpoint, the API for the converted ones (qwen2 with
    # tiny shards, to exercise the sharded writer and its index).
    exported = {a: root / f"export_{a}" for a in ARCHS}
    trainer_hf = root / "trainer_hf"
    assert _cli_main("megatron-to-hf", "--ckpt", str(trainer_ck), "--out", str(trainer_hf)) == 0
    for a in ARCHS:
        megatron_to_hf(ck[a], exported[a], max_shard_bytes=40_000 if a == "qwen2" else 2 * 1024**3)
    # ... and back: megatron -> HF -> megatron, through the in-memory path (as for GGUF-loaded models).
    trainer_back = root / "trainer_back"
    in_memory = AutoModelForCausalLM.from_pretrained(str(trainer_hf), dtype=torch.float32)
    hf_to_megatron(in_memory, trainer_back, tp=1, pp=1, make_vocab_size_divisible_by=64, tokenizer=trainer_hf)
    del in_memory

    one_cases = [dict(tp=1, pp=1, hf_dir=str(hf[a]), **io) for a in ARCHS]
    one_cases += [
        dict(tp=1, pp=1, load_dir=str(ck["qwen3"]), **io),  # written at TP=2
        dict(tp=1, pp=1, hf_dir=str(hf["qwen2"]), as_dict=True, **io),
        dict(kind="dict_error", hf_dir=str(hf["llama"]), extra="model.layers.0.self_attn.q_norm.weight"),
        dict(tp=1, pp=1, compare_dirs=(str(trainer_ck), str(trainer_back)), tokens=tokens, prompts=prompts,
             new_tokens=0),
    ]
    one = run_ranks(many_cases, 1, one_cases, timeout=300)[0]

    m = {}
    for i, a in enumerate(ARCHS):
        m[(a, "tp2")] = two[i]
        m[(a, "pp2")] = two[3 + i]
        m[(a, "tp1")] = one[i]
    m[("llama", "ckpt_tp2_at_pp2")] = two[6]
    m[("qwen2", "ckpt_pp2_at_tp2")] = two[7]
    m[("qwen3", "ckpt_tp2_at_tp1")] = one[3]
    m[("qwen2", "dict_tp1")] = one[4]
    return dict(root=root, hf=hf, ck=ck, ref=ref, runs=m, trainer=two[8], trainer_ck=trainer_ck,
                trainer_hf=trainer_hf, trainer_back=trainer_back, exported=exported, dict_error=one[5],
                compare=one[6], prompts=prompts, tok_dir=tok_dir)


RUNS = [(a, lay) for a in ARCHS for lay in ("tp1", "tp2", "pp2")] + [
    ("llama", "ckpt_tp2_at_pp2"), ("qwen2", "ckpt_pp2_at_tp2"), ("qwen3", "ckpt_tp2_at_tp1"), ("qwen2", "dict_tp1")]


@pytest.mark.parametrize("arch,layout", RUNS, ids=[f"{a}-{lay}" for a, lay in RUNS])
def test_logits_and_greedy_match_hf(world, arch, layout):
    run, ref = world["runs"][(arch, layout)], world["ref"][arch]
    assert run["logits"].shape == ref["logits"].shape == (B, S, VOCAB)
    assert ref["logits"].std() > 0.1, "reference logits are nearly flat: the test would prove little"
    assert_f32_close(run["logits"], ref["logits"], rel=1e-4)  # HF vs megatron kernels, float32
    # The padded vocabulary rows are zero, so their logits are exactly zero.
    assert run["padded_logits"].shape[-1] >= 6 and torch.all(run["padded_logits"] == 0)
    assert ref["greedy"].shape == (B, P + NEW)
    assert torch.equal(run["greedy"], ref["greedy"]), f"{run['greedy']} vs HF {ref['greedy']}"


def _generate_cli(ckpt, prompts, tmp_path) -> torch.Tensor:
    """`python -m megatron_opcd.generate --greedy` (the project's KV-cache loop) on `ckpt` for
    `prompts` (rows of token ids): [prompt + response] per row, as HF `generate` returns them."""
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt_ids": p.tolist()}) + "\n" for p in prompts))
    out = subprocess.run(
        [sys.executable, "-m", "megatron_opcd.generate", "--ckpt", str(ckpt), "--prompts",
         str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--greedy", "--max-new-tokens", str(NEW),
         "--ignore-eos", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    return torch.tensor([p.tolist() + r["response_ids"] for p, r in zip(prompts, rows)])


@pytest.mark.skipif(not (REPO / "megatron_opcd" / "generate.py").is_file(), reason="megatron_opcd.generate not present")
def test_generate_cli_matches_hf_generate(world, tmp_path):
    """`python -m megatron_opcd.generate --greedy` on the Llama checkpoint the CLI converted at TP=2
    (loaded at TP=1, KV-cache decoding, tokenizer from the checkpoint) gives HF `generate`'s tokens."""
    got = _generate_cli(world["ck"]["llama"], world["prompts"], tmp_path)
    assert torch.equal(got, world["ref"]["llama"]["greedy"])


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_megatron_hf_round_trip_is_identical(world, arch):
    from safetensors.torch import load_file

    from megatron_opcd.convert import HFReader

    original = load_file(str(world["hf"][arch] / "model.safetensors"))
    with HFReader(world["exported"][arch]) as back:
        assert sorted(back.keys()) == sorted(original), "exported tensor names differ from the original"
        for name, t in original.items():
            assert torch.equal(back.get(name), t), name
    if arch == "qwen2":  # tied embeddings: no lm_head.weight, as HF writes it; tiny shards + index
        assert "lm_head.weight" not in original
        assert len(list(world["exported"][arch].glob("model-*-of-*.safetensors"))) > 1
        assert (world["exported"][arch] / "model.safetensors.index.json").is_file()
    cfg_orig = json.loads((world["hf"][arch] / "config.json").read_text())
    cfg_back = json.loads((world["exported"][arch] / "config.json").read_text())
    for key in ("model_type", "architectures", "vocab_size", "num_key_value_heads", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "rope_parameters"):
        assert cfg_back.get(key) == cfg_orig.get(key), key


def test_megatron_hf_megatron_round_trip_is_identical(world):
    cmp = world["compare"]
    assert cmp["same_names"] and len(cmp["names"]) > 10
    assert cmp["different"] == []


def test_trainer_checkpoint_exports_and_generates_the_same(world):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(world["trainer_hf"]), dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3ForCausalLM"
    tokens = _hf_generate(model, world["prompts"])
    assert torch.equal(tokens, world["trainer"]["greedy"])
    # It is a different model from the one it shares the tokenizer with (random student weights).
    assert not torch.equal(world["trainer"]["greedy"], world["ref"]["qwen3"]["greedy"])
    assert json.loads((world["trainer_ck"] / "opcd_checkpoint.json").read_text())["written_by"] == "test trainer"


def test_tokenizer_travels_with_checkpoints(world):
    from transformers import AutoTokenizer

    from megatron_opcd.data.tokenizer import load_tokenizer

    text = "hello world the teacher is a cat"
    msgs = [{"role": "user", "content": "hello cat"}]
    # Each place must tokenize as AutoTokenizer does on the HF folder it came from (the original
    # config.json travels too: transformers picks the tokenizer class from its model_type).
    places = [(world["ck"]["llama"], "llama"), (world["ck"]["qwen2"] / "tokenizer", "qwen2"),
              (world["trainer_ck"], "qwen3"), (world["exported"]["qwen3"], "qwen3"), (world["trainer_hf"], "qwen3"),
              (world["hf"]["llama"], "llama"), (world["trainer_back"], "qwen3")]
    for place, origin in places:
        hf_tok = AutoTokenizer.from_pretrained(str(world["hf"][origin]))
        expected_chat = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
        tok = load_tokenizer(place)
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), place
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
        assert tok.eos_ids[0] == 2 and tok.bos_id == 1 and tok.vocab_size == len(hf_tok)
        assert tok.has_chat_template and tok.apply_chat_template(msgs) == list(expected_chat)
    assert (world["ck"]["qwen3"] / "tokenizer" / "tokenizer.model").is_file()
    assert (world["trainer_hf"] / "tokenizer.model").is_file()
    assert (world["trainer_hf"] / "generation_config.json").is_file()


def test_sentencepiece_tokenizer(world):
    from megatron_opcd.data.tokenizer import load_tokenizer
    from megatron_opcd.errors import TokenizerError

    tok = load_tokenizer(world["tok_dir"] / "tokenizer.model")
    hf_like = load_tokenizer(world["tok_dir"])
    text = "the student is over the dog"
    assert tok.encode(text) == hf_like.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text, add_special_tokens=True)[0] == tok.bos_id == 1
    assert tok.eos_ids == [2] and tok.pad_id == 2 and tok.vocab_size == 240
    assert not tok.has_chat_template
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(world["root"] / "nowhere")
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_tokenizer(world["root"] / "hf")


def test_dict_with_foreign_tensor_is_refused(world):
    assert "not used by the llama mapping" in world["dict_error"]
    assert "q_norm" in world["dict_error"]


def test_one_line_errors(world, tmp_path):
    from megatron_opcd.convert import hf_to_megatron, megatron_to_hf, model_config_from_hf
    from megatron_opcd.errors import ConversionError

    base = json.loads((world["hf"]["llama"] / "config.json").read_text())
    bad = [
        ({**base, "model_type": "gemma"}, "model_type 'gemma' is not supported.*llama, qwen2, qwen3"),
        ({**base, "model_type": "mistral"}, "model_type 'mistral' is not supported"),
        ({**base, "model_type": "qwen3", "use_sliding_window": True}, "use_sliding_window"),
        ({**base, "model_type": "qwen2_moe"}, "qwen2_moe"),
        ({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
        ({**base, "mlp_bias": True}, "mlp_bias"),
    ]
    for cfg, pattern in bad:
        with pytest.raises(ConversionError, match=pattern) as info:
            model_config_from_hf(cfg)
        assert "\n" not in str(info.value)
    with pytest.raises(ConversionError, match="does not exist"):
        hf_to_megatron(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ConversionError, match="num_attention_heads=4 is not divisible by --tp=3"):
        hf_to_megatron(world["hf"]["llama"], tmp_path / "out", tp=3)
    with pytest.raises(ConversionError, match="num_layers=2 is not divisible by --pp=4"):
        hf_to_megatron(world["hf"]["qwen2"], tmp_path / "out", pp=4)
    with pytest.raises(ConversionError, match="not a megatron-opcd checkpoint"):
        hf_to_megatron(world["hf"]["qwen2"], world["hf"]["llama"])  # would overwrite an unrelated folder
    # A rank's error (tensors that do not fit the config) comes back as the same one line; nothing is left.
    broken = tmp_path / "broken"
    shutil.copytree(world["hf"]["llama"], broken)
    (broken / "config.json").write_text(json.dumps({**base, "intermediate_size": 128}))
    with pytest.raises(ConversionError, match=r"linear_fc1.weight: the Hugging Face tensors .* give shape \(192, 64\)"):
        hf_to_megatron(broken, tmp_path / "broken_ck")
    assert not (tmp_path / "broken_ck").exists()
    with pytest.raises(ConversionError, match="holds a qwen3 model.*not llama"):
        megatron_to_hf(world["ck"]["qwen3"], tmp_path / "hf", arch="llama")
    with pytest.raises(ConversionError, match="not a complete megatron-opcd checkpoint"):
        megatron_to_hf(world["hf"]["llama"], tmp_path / "hf")
    with pytest.raises(ConversionError, match="does not exist"):
        megatron_to_hf(tmp_path / "missing", tmp_path / "hf")
    # The CLI prints the same one line and exits with status 2.
    out = _cli("megatron-to-hf", "--ckpt", str(world["ck"]["qwen2"]), "--out", str(tmp_path / "x"), "--arch", "qwen3")
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and len(out.stderr.strip().splitlines()) == 1


def test_qkv_and_fc1_layouts():
    """The fused layouts, checked by hand on a small case: per query group, q heads then k then v."""
    from megatron_opcd.config import ModelConfig
    from megatron_opcd.convert.mappings import LLAMA, QWEN2, to_hf, to_megatron

    cfg = ModelConfig(hidden_size=8, num_attention_heads=4, num_query_groups=2, kv_channels=1, vocab_size=8,
                      ffn_hidden_size=4)
    q, k, v = torch.arange(4.0)[:, None], 10 + torch.arange(2.0)[:, None], 20 + torch.arange(2.0)[:, None]
    qkv = next(r for r in LLAMA if r.kind == "qkv")
    fused = to_megatron(qkv, [q, k, v], cfg, 8)
    assert fused[:, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert [t.tolist() for t in to_hf(qkv, fused, cfg)] == [q.tolist(), k.tolist(), v.tolist()]
    bias = next(r for r in QWEN2 if r.megatron.endswith("linear_qkv.bias"))
    assert to_megatron(bias, [q[:, 0], k[:, 0], v[:, 0]], cfg, 8).tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    fc1 = next(r for r in LLAMA if r.kind == "fc1")
    gate, up = torch.zeros(4, 8), torch.ones(4, 8)
    assert torch.equal(to_megatron(fc1, [gate, up], cfg, 8), torch.cat([gate, up]))
    emb = next(r for r in LLAMA if r.kind == "vocab")
    padded = to_megatron(emb, [torch.ones(8, 8)], cfg, 16)
    assert padded.shape == (16, 8) and padded[8:].abs().sum() == 0
    assert to_hf(emb, padded, cfg)[0].shape == (8, 8)


# ----------------------------------------------------------------------------------------------
# Qwen3-MoE (issue 23): 8 experts, top-2, normalised top-k weights (as Qwen3-30B-A3B), hidden 32.

MOE_LAYOUTS = {"tp1": dict(tp=1, pp=1), "ep2": dict(tp=1, pp=1, ep=2), "tp2xep2": dict(tp=2, pp=1, ep=2, etp=1),
               "pp2": dict(tp=1, pp=2)}


def _make_hf_moe(folder: Path, tok_dir: Path) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6))
    model = Qwen3MoeForCausalLM(cfg)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            # The router's weights large, so that no token sits near a tie between its 2nd and 3rd
            # expert (a rounding difference would route it elsewhere and the logits would differ).
            scale = 1.0 if name.endswith("mlp.gate.weight") else 0.15 if "experts" in name else 0.1
            p.copy_(1 + 0.3 * noise if "norm" in name else scale * noise)
    model.eval()
    path = folder / "qwen3_moe"
    model.save_pretrained(str(path))  # the hub's per-expert names (mlp.experts.<e>.gate_proj.weight ...)
    for f in tok_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def moe_world(run_ranks, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from megatron_opcd.convert import hf_to_megatron, megatron_to_hf

    root = tmp_path_factory.mktemp("convert_moe")
    hf = _make_hf_moe(root, _make_tokenizer(root))
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (B, S), generator=gen)
    prompts = torch.randint(3, VOCAB, (B, P), generator=gen)
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = {"logits": model(tokens).logits.float(), "greedy": _hf_generate(model, prompts)}
    del model
    ck = root / "ck_ep2"
    hf_to_megatron(str(hf), ck, tp=1, pp=1, ep=2, dtype="fp32", make_vocab_size_divisible_by=64)
    io = dict(tokens=tokens, prompts=prompts, new_tokens=NEW)
    cases = [dict(hf_dir=str(hf), **MOE_LAYOUTS[k], **io) for k in MOE_LAYOUTS]
    cases.append(dict(tp=1, pp=2, load_dir=str(ck), **io))  # the EP2 checkpoint read at PP2 (EP1)
    two = run_ranks(many_cases, 2, cases, timeout=400)
    two = [_last([r[i] for r in two]) for i in range(len(cases))]
    exported = root / "export"
    megatron_to_hf(ck, exported)
    return dict(hf=hf, ck=ck, ref=ref, runs=dict(zip([*MOE_LAYOUTS, "ckpt_ep2_at_pp2"], two)), exported=exported,
                prompts=prompts)


@pytest.mark.parametrize("layout", [*MOE_LAYOUTS, "ckpt_ep2_at_pp2"])
def test_qwen3_moe_logits_and_greedy_match_hf(moe_world, layout):
    run, ref = moe_world["runs"][layout], moe_world["ref"]
    assert run["logits"].shape == ref["logits"].shape == (B, S, VOCAB)
    assert ref["logits"].std() > 0.1, "reference logits are nearly flat: the test would prove little"
    assert_f32_close(run["logits"], ref["logits"], rel=1e-4)  # HF vs megatron kernels, float32
    assert torch.all(run["padded_logits"] == 0)
    assert torch.equal(run["greedy"], ref["greedy"]), f"{run['greedy']} vs HF {ref['greedy']}"


def test_qwen3_moe_round_trip_is_identical(moe_world):
    """HF -> megatron at EP2 -> HF (exported at EP1): every tensor bit-identical, the config's MoE
    fields and the tokenizer back."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from megatron_opcd.convert import HFReader

    original = load_file(str(moe_world["hf"] / "model.safetensors"))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in original and "model.layers.0.mlp.gate.weight" in original
    with HFReader(moe_world["exported"]) as back:
        assert sorted(back.keys()) == sorted(original)
        for name, t in original.items():
            assert torch.equal(back.get(name), t), name
    cfg_orig = json.loads((moe_world["hf"] / "config.json").read_text())
    cfg_back = json.loads((moe_world["exported"] / "config.json").read_text())
    assert cfg_back["architectures"] == ["Qwen3MoeForCausalLM"]
    for key in ("model_type", "moe_intermediate_size", "num_experts_per_tok", "norm_topk_prob", "router_aux_loss_coef",
                "head_dim", "eos_token_id", "rope_parameters"):
        assert cfg_back.get(key) == cfg_orig.get(key), key
    experts = {c.get("num_experts") or c.get("num_local_experts") for c in (cfg_orig, cfg_back)}
    assert experts == {8}
    text = "hello world the teacher is a cat"
    assert (AutoTokenizer.from_pretrained(str(moe_world["exported"])).encode(text)
            == AutoTokenizer.from_pretrained(str(moe_world["hf"])).encode(text))


def test_qwen3_moe_kv_cache_generate_matches_hf(moe_world, tmp_path):
    """`python -m megatron_opcd.generate --greedy` (the project's KV-cache loop, at TP1 / EP1) on the
    checkpoint converted at EP2 gives HF `generate`'s tokens."""
    got = _generate_cli(moe_world["ck"], moe_world["prompts"], tmp_path)
    assert torch.equal(got, moe_world["ref"]["greedy"])


def test_qwen3_moe_config_refusals():
    from megatron_opcd.convert import model_config_from_hf
    from megatron_opcd.errors import ConversionError

    base = dict(model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                router_aux_loss_coef=0.001, decoder_sparse_step=1, mlp_only_layers=[])
    cfg = model_config_from_hf(base)
    assert (cfg.num_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size, cfg.moe_norm_topk_prob,
            cfg.moe_aux_loss_coeff, cfg.qk_layernorm) == (8, 2, 16, True, 0.001, True)
    for bad, pattern in [({"decoder_sparse_step": 2}, "decoder_sparse_step=2.*mixed"),
                         ({"mlp_only_layers": [0]}, "mlp_only_layers=\\[0\\].*mixed")]:
        with pytest.raises(ConversionError, match=pattern) as info:
            model_config_from_hf({**base, **bad})
        assert "\n" not in str(info.value)
