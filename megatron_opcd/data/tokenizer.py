"""One small tokenizer interface for HF tokenizer folders, sentencepiece `.model` files and
megatron-opcd checkpoints (whose tokenizer/ folder travels with the weights).

    tok = load_tokenizer(path)
    tok.encode(text) -> list[int]            no BOS/EOS unless add_special_tokens=True
    tok.decode(ids) -> str
    tok.eos_ids, tok.pad_id, tok.bos_id, tok.vocab_size
    tok.apply_chat_template(messages) -> list[int]   (tok.has_chat_template says if there is one)

`eos_ids` is every id that ends a generation: the tokenizer's EOS plus the `eos_token_id`(s) of
generation_config.json when one sits beside the tokenizer (Llama 3 instruct models stop on
<|eot_id|> as well as <|end_of_text|>); empty if neither defines one. `pad_id` is the tokenizer's
pad token, else the first EOS, else 0 (padding is always masked, so its value never matters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from megatron_opcd.errors import TokenizerError


class Tokenizer:
    """Common surface of the two backends below."""

    name: str
    eos_ids: list[int]
    pad_id: int
    bos_id: Optional[int]
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    @property
    def has_chat_template(self) -> bool:
        return False

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        raise TokenizerError(f"tokenizer {self.name} has no chat template; use plain prompts or a tokenizer with one")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, vocab_size={self.vocab_size}, eos_ids={self.eos_ids})"


def _ids(out) -> list[int]:
    """transformers v5 returns a BatchEncoding from apply_chat_template(tokenize=True); v4 a list."""
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):  # a batch of one
        out = out[0]
    return [int(i) for i in out]


class HFTokenizer(Tokenizer):
    def __init__(self, folder: Path):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad folders
            raise TokenizerError(f"cannot load the tokenizer in {folder}: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc
        self.name = str(folder)
        eos = _generation_eos(folder)
        if self.tok.eos_token_id is not None:
            eos = [int(self.tok.eos_token_id)] + [e for e in eos if e != self.tok.eos_token_id]
        self.eos_ids = eos
        self.pad_id = int(self.tok.pad_token_id) if self.tok.pad_token_id is not None else (eos or [0])[0]
        self.bos_id = int(self.tok.bos_token_id) if self.tok.bos_token_id is not None else None
        self.vocab_size = len(self.tok)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.has_chat_template:
            return super().apply_chat_template(messages, add_generation_prompt)
        return _ids(self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True))


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: Path):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except Exception as exc:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError
            raise TokenizerError(f"{model_file} is not a sentencepiece model: {exc}") from exc
        self.name = str(model_file)
        eos = [self.sp.eos_id()] if self.sp.eos_id() >= 0 else []
        eos += [e for e in _generation_eos(model_file.parent) if e not in eos]
        self.eos_ids = eos
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else (eos or [0])[0]
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(self.sp.encode(text))
        if add_special_tokens and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # sentencepiece drops control pieces (BOS/EOS/PAD) when decoding ids anyway.
        return self.sp.decode([int(i) for i in ids])


def _generation_eos(folder: Path) -> list[int]:
    gen = folder / "generation_config.json"
    if not gen.is_file():
        return []
    eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a megatron-opcd checkpoint, an HF model/tokenizer folder, or a sentencepiece
    `.model` file. A folder with only `tokenizer.model` is read with sentencepiece."""
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer path {path} does not exist")
    if path.is_file():
        if path.suffix == ".model":
            return SentencePieceTokenizer(path)
        raise TokenizerError(f"{path} is a file but not a sentencepiece .model; pass a tokenizer folder instead")
    if (path / "tokenizer").is_dir() and not any((path / n).is_file() for n in _HF_FILES):
        path = path / "tokenizer"  # a megatron-opcd checkpoint
    if any((path / n).is_file() for n in _HF_FILES):
        return HFTokenizer(path)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(path / "tokenizer.model")
    raise TokenizerError(
        f"{path} holds no tokenizer (tokenizer.json, tokenizer_config.json, vocab.json or tokenizer.model); "
        "convert the model with tools/convert_checkpoint.py so the tokenizer travels with it"
    )


__all__ = ["HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_tokenizer"]
