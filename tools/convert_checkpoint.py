#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and megatron-opcd (megatron-core dist_checkpointing).

    python tools/convert_checkpoint.py hf-to-megatron --hf PATH --out DIR --tp N --pp M [--dtype bf16|fp32]
    python tools/convert_checkpoint.py hf-to-megatron --gguf FILE_OR_FOLDER --out DIR [...]
    python tools/convert_checkpoint.py megatron-to-hf --ckpt DIR --out PATH [--arch llama|qwen2|qwen3]

Supported: Llama 3.x (incl. rope scaling), Qwen2/2.5, Qwen3 dense models, from an HF folder or a
GGUF file (dequantised by transformers, then the same mapping). See docs/conversion.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF folder or GGUF file -> megatron-opcd checkpoint (loads at any TP/PP)")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Hugging Face model folder (config.json + safetensors)")
    src.add_argument("--gguf", help="a .gguf file, or a folder holding one (read and dequantised to fp32 by "
                                    "transformers; the tokenizer comes from the file)")
    a.add_argument("--out", required=True, help="checkpoint folder to write")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks used for the conversion")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks used for the conversion")
    a.add_argument("--ep", type=int, default=1, help="expert-parallel ranks used for an MoE model (Qwen3-MoE)")
    a.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="parameter dtype (default: fp32 for fp32 HF weights and for GGUF files, else bf16)")
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="embedding rows are padded to a multiple of this x TP (Megatron's default 128)")
    a.add_argument("--timeout", type=float, default=3600.0, help="seconds before the conversion ranks are killed")
    b = sub.add_parser("megatron-to-hf", help="megatron-opcd checkpoint -> HF folder")
    b.add_argument("--ckpt", required=True, help="megatron-opcd checkpoint folder (trainer or converter)")
    b.add_argument("--out", required=True, help="HF folder to write")
    b.add_argument("--arch", choices=["llama", "qwen2", "qwen3", "qwen3_moe"], default=None,
                   help="expected architecture (refuses a checkpoint of another); default: inferred")
    b.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                   help="dtype of the safetensors (default: the checkpoint's)")
    b.add_argument("--max-shard-size-gb", type=float, default=2.0, help="largest safetensors shard (GiB)")
    b.add_argument("--timeout", type=float, default=3600.0, help="seconds before the export is killed")
    return p


def _check_out(out: str) -> None:
    from megatron_opcd.convert.hf_to_megatron import _check_out_dir

    _check_out_dir(Path(out))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from megatron_opcd.convert import hf_to_megatron, megatron_to_hf
    from megatron_opcd.errors import CheckpointError, ConfigError, ConversionError

    start = time.time()
    try:
        if args.command == "hf-to-megatron" and args.gguf:
            from megatron_opcd.convert.gguf import find_gguf, load_gguf

            _check_out(args.out)  # before the minute it may take to read the file
            path = find_gguf(args.gguf)
            print(f"reading {path} ({path.stat().st_size / 2**20:.0f} MiB) ...", flush=True)
            model, tok = load_gguf(path)
            out = hf_to_megatron(model, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype or "fp32",
                                 make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                 tokenizer=tok, source=str(path), timeout=args.timeout)
        elif args.command == "hf-to-megatron":
            out = hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp, ep=args.ep, dtype=args.dtype,
                                 make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                 timeout=args.timeout)
        else:
            out = megatron_to_hf(args.ckpt, args.out, arch=args.arch, dtype=args.dtype,
                                 max_shard_bytes=int(args.max_shard_size_gb * 1024**3), timeout=args.timeout)
    except (ConversionError, CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":  # the launcher's forkserver re-imports this module: keep the guard
    sys.exit(main())
