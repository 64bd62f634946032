"""GGUF files (llama.cpp's format) -> an in-memory Hugging Face model and tokenizer.

    find_gguf(path)            the .gguf file: `path` itself, or the one .gguf inside the folder `path`
    load_gguf(path)            (model, tokenizer), the weights dequantised to fp32 by transformers

transformers (with the `gguf` package) reads the file offline; `save_pretrained` then refuses the
model ("quantized with gguf and is not serializable"), so `hf_to_megatron(model, tokenizer=tok)`
writes it shard by shard itself and converts it through the same mapping as an HF folder.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path

from megatron_opcd.errors import ConversionError


def find_gguf(path: str | Path) -> Path:
    """`path` if it is a .gguf file; the single .gguf file of the folder `path` otherwise."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ConversionError(f"{p} is not a .gguf file; pass a GGUF file or a folder holding one")
        return p
    if not p.is_dir():
        raise ConversionError(f"{p} does not exist; pass a .gguf file or a folder holding one")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".gguf" and f.is_file())
    if not files:
        raise ConversionError(f"{p} holds no .gguf file")
    if len(files) > 1:
        raise ConversionError(f"{p} holds {len(files)} .gguf files ({', '.join(f.name for f in files[:3])}"
                              f"{' ...' if len(files) > 3 else ''}); pass the file itself")
    return files[0]


def load_gguf(path: str | Path):
    """(model, tokenizer) of a GGUF file (or of the one GGUF in a folder), dequantised to fp32."""
    f = find_gguf(path)
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ConversionError(f"reading GGUF files needs {exc.name}: pip install -e '.[hf]'") from None
    hf_logging.set_verbosity_error()  # the GGUF reader's per-tensor notices
    hf_logging.disable_progress_bar()
    try:
        with _read_once():
            tok = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
            model = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as exc:  # transformers' ways of refusing an architecture/file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConversionError(f"transformers cannot read {f}: {first}") from None
    return model.eval(), tok


@contextmanager
def _read_once():
    """Each file parsed once while loading: transformers opens a GGUF file three times (tokenizer,
    config, weights), and gguf's reader parses every vocabulary string in Python (~8 CPU-s a time
    for SmolLM2's 49k tokens); transformers also builds gguf's tensor-name map once per module of
    the model (~400 times, ~8 CPU-s). Both are read-only here: the reader maps the file read-only."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    # transformers imports both from `gguf` inside the functions that call them: this is what they get.
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(saved[0])  # keyed by (path, mode)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved[1])  # keyed by (arch, blocks)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved
