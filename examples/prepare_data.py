#!/usr/bin/env python
"""Turn local copies of the paper's datasets into the trainer's JSONL (no downloads here).

    python examples/prepare_data.py dapo-math  --input dapo-math-17k.parquet --out $OPCD_DATA
    python examples/prepare_data.py medmcqa    --input train.parquet --eval-input validation.parquet --out $OPCD_DATA
    python examples/prepare_data.py safety     --tweeteval hate/train.parquet --hatecheck hatecheck.csv \
                                                --ethos Ethos_Dataset_Binary.csv --out $OPCD_DATA
    python examples/prepare_data.py experience --input my_experience.txt --out $OPCD_DATA/dapo-math-17k
    python examples/prepare_data.py prompts    --out $OPCD_DATA

Writes, under --out, the layout the sbatch scripts and recipes expect:
    dapo-math-17k/{train,eval}.jsonl   medmcqa/{train,eval}.jsonl   safety/{train,eval}.jsonl
    prompts/{medical,safety}_system_prompt.txt   <folder>/experience.json
Each line is {"prompt": ..., "answer": ...}. Inputs may be .jsonl, .json (a list), .csv/.tsv (the
delimiter is detected, e.g. Ethos' ";") or .parquet (needs pyarrow). Where to get the data:
examples/README.md. Duplicated prompts are dropped (DAPO-Math-17K's parquet repeats each problem).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional

PROMPTS = Path(__file__).resolve().parent / "prompts"
LETTERS = "ABCD"


class PrepareError(ValueError):
    """An input that cannot be converted; the message names the file and the fix."""


def read_rows(path: str | Path) -> Iterator[dict]:
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{path} does not exist (see examples/README.md for where to get the data)")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        yield from (data if isinstance(data, list) else data.get("data", []))
    elif suffix in (".csv", ".tsv"):
        text = path.read_text(encoding="utf-8")
        try:
            dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
        except csv.Error:
            dialect = csv.excel_tab if suffix == ".tsv" else csv.excel
        yield from csv.DictReader(text.splitlines(), dialect=dialect)
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PrepareError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                               "or convert the file to JSONL first") from None
        yield from pq.read_table(path).to_pylist()
    else:
        raise PrepareError(f"{path}: unknown format {suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet")


def _first(row: dict, *names: str):
    for n in names:
        if n in row and row[n] not in (None, ""):
            return row[n]
    return None


# ------------------------------------------------------------------------------------------------
# One converter per dataset: row -> {"prompt", "answer"} or None (skip).


def dapo_math(row: dict) -> Optional[dict]:
    """DAPO-Math-17K: prompt = a chat list [{role, content}] (or a string), answer = reward_model.ground_truth."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        prompt = "\n".join(m.get("content", "") for m in prompt if m.get("role", "user") == "user")
    answer = (row.get("reward_model") or {}).get("ground_truth") if isinstance(row.get("reward_model"), dict) else None
    answer = answer if answer is not None else _first(row, "answer", "solution", "ground_truth")
    if not isinstance(prompt, str) or not prompt.strip():
        return None
    return {"prompt": prompt.strip(), "answer": None if answer is None else str(answer)}


def medmcqa(row: dict) -> Optional[dict]:
    """MedMCQA: question, opa..opd, cop (the correct option, 0-3; -1 or missing on the unlabeled test split)."""
    options = [row.get(k) for k in ("opa", "opb", "opc", "opd")]
    try:
        cop = int(row.get("cop"))
    except (TypeError, ValueError):
        return None
    if cop not in range(4) or not row.get("question") or any(o in (None, "") for o in options):
        return None
    lines = [f"Question: {str(row['question']).strip()}"]
    lines += [f"{LETTERS[i]}. {str(o).strip()}" for i, o in enumerate(options)]
    lines.append("Answer with the letter of the correct option.")
    return {"prompt": "\n".join(lines), "answer": LETTERS[cop]}


def _safety(text, hateful: bool, source: str) -> Optional[dict]:
    if not isinstance(text, str) or not text.strip():
        return None
    prompt = f"Text: {text.strip()}\nIs this text hateful?"
    return {"prompt": prompt, "answer": "hateful" if hateful else "not hateful", "source": source}


def tweeteval(row: dict) -> Optional[dict]:
    """TweetEval `hate`: text, label (1 = hate)."""
    return _safety(row.get("text"), int(row.get("label", 0)) == 1, "tweeteval")


def hatecheck(row: dict) -> Optional[dict]:
    """HateCheck: test_case, label_gold ("hateful" / "non-hateful")."""
    return _safety(_first(row, "test_case", "text"), str(row.get("label_gold", "")).strip() == "hateful", "hatecheck")


def ethos(row: dict) -> Optional[dict]:
    """Ethos binary: comment (or text), isHate (a score in [0, 1]; or label 0/1); hateful when >= 0.5."""
    score = _first(row, "isHate", "label")
    try:
        score = float(score)
    except (TypeError, ValueError):
        return None
    return _safety(_first(row, "comment", "text"), score >= 0.5, "ethos")


# ------------------------------------------------------------------------------------------------


def convert(paths: Iterable[str], fn) -> list[dict]:
    out, seen = [], set()
    for path in paths:
        for row in read_rows(path):
            item = fn(row)
            if item is None or item["prompt"] in seen:
                continue
            seen.add(item["prompt"])
            out.append(item)
    return out


def split(rows: list[dict], eval_rows: Optional[list[dict]], eval_size: int, seed: int) -> tuple[list, list]:
    if eval_rows is not None:
        held = {r["prompt"] for r in eval_rows}
        return [r for r in rows if r["prompt"] not in held], eval_rows
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n = min(eval_size, len(rows) // 10)  # never more than a tenth of the data
    return rows[n:], rows[:n]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_split(folder: Path, train: list[dict], held: list[dict]) -> None:
    if not train:
        raise PrepareError(f"no usable rows for {folder.name}: check the input files and their columns")
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "eval.jsonl", held)
    print(f"{folder}: {len(train)} train, {len(held)} eval")


def write_experience(src: str, folder: Path) -> None:
    """A JSON list of experience texts; from a JSON list, or plain text with entries separated by blank lines."""
    text = Path(src).read_text(encoding="utf-8").strip()
    items = json.loads(text) if text.startswith("[") else [e.strip() for e in text.split("\n\n") if e.strip()]
    if not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise PrepareError(f"{src}: expected non-empty experience entries (a JSON list of strings, or blank-line-separated text)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "experience.json").write_text(json.dumps(items, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"{folder / 'experience.json'}: {len(items)} entries")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="dataset", required=True)
    for name in ("dapo-math", "medmcqa"):
        p = sub.add_parser(name)
        p.add_argument("--input", nargs="+", required=True)
        p.add_argument("--eval-input", nargs="+", help="a held-out split (e.g. MedMCQA validation); else --eval-size rows")
    p = sub.add_parser("safety")
    p.add_argument("--tweeteval", nargs="*", default=[])
    p.add_argument("--hatecheck", nargs="*", default=[])
    p.add_argument("--ethos", nargs="*", default=[])
    p = sub.add_parser("experience")
    p.add_argument("--input", required=True)
    sub.add_parser("prompts")
    for p in sub.choices.values():
        p.add_argument("--out", required=True, help="the data root ($OPCD_DATA), or the target folder for experience")
        p.add_argument("--eval-size", type=int, default=500)
        p.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        if args.dataset in ("dapo-math", "medmcqa"):
            fn, folder = (dapo_math, "dapo-math-17k") if args.dataset == "dapo-math" else (medmcqa, "medmcqa")
            held = convert(args.eval_input, fn) if args.eval_input else None
            write_split(out / folder, *split(convert(args.input, fn), held, args.eval_size, args.seed))
        elif args.dataset == "safety":
            rows = convert(args.tweeteval, tweeteval) + convert(args.hatecheck, hatecheck) + convert(args.ethos, ethos)
            write_split(out / "safety", *split(rows, None, args.eval_size, args.seed))
        elif args.dataset == "experience":
            write_experience(args.input, out)
        else:
            (out / "prompts").mkdir(parents=True, exist_ok=True)
            for f in sorted(PROMPTS.glob("*.txt")):
                shutil.copy(f, out / "prompts" / f.name)
                print(out / "prompts" / f.name)
    except (PrepareError, json.JSONDecodeError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
