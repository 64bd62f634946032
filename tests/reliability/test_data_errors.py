"""Bad data: the error names the file and the line; over-long examples follow data.too_long."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from ._helpers import assert_clean_error, cli_in_process

GOOD = json.dumps({"prompt": "Question: what is apple?"})
LONG_CONTEXT = "Always answer with the word apple, then explain the river and the stone. " * 30  # ~500 tokens > 128


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


BAD_FILES = {
    "empty prompt file": (b"", ["no prompts (the file is empty)", "add lines like"]),
    "only blank lines": (b"\n  \n\n", ["no prompts (the file is empty)"]),
    "malformed JSONL line": (f"{GOOD}\n{GOOD}\n{{\"prompt\": \"unterminated}}\n".encode(), [":3: malformed JSON", "one JSON object"]),
    "line is not an object": (f"{GOOD}\n[1, 2]\n".encode(), [":2: expected a JSON object"]),
    "line without a prompt": (f"{GOOD}\n{{\"question\": \"hi\"}}\n".encode(), [":2: missing or empty \"prompt\""]),
    "non-UTF-8 text": (f"{GOOD}\n".encode() + b'{"prompt": "caf\xe9"}\n', [":2: not UTF-8 text", "re-encode the file as UTF-8"]),
    # Checked when the file is loaded (data.prompts.check_text), not at the step that draws the line.
    "prompt of invisible characters": (f"{GOOD}\n".encode() + b'{"prompt": "\\u200b\\ufeff \\u2060"}\n',
                                       [":2: the \"prompt\" is empty once invisible characters are removed"]),
    "lone surrogate": (f"{GOOD}\n{GOOD}\n".encode() + b'{"prompt": "caf\\ud800 au lait"}\n',
                       [":3: the \"prompt\" is not valid Unicode", "U+D800"]),
    "invisible per-example context": (f"{GOOD}\n".encode() + b'{"prompt": "hi", "context": "\\u3164\\u200d"}\n',
                                      [":2: the \"context\" is empty once invisible characters are removed"]),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content,needles", list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_bad_prompt_file(tiny, tmp_path, content, needles):
    train = _write(tmp_path / "train.jsonl", content)
    rc, err = cli_in_process(tiny, f"data.train={train}")
    assert_clean_error(rc, err, str(train), *needles)


@pytest.mark.timeout(60)
def test_oversize_line(tiny, tmp_path):
    """A line over data.prompts.MAX_LINE_BYTES (16 MiB) is an error naming it, read in bounded pieces."""
    MAX_LINE_BYTES = 16 * 2**20
    train = tmp_path / "train.jsonl"
    with open(train, "w") as fh:
        fh.write(GOOD + "\n" + '{"prompt": "' + "apple " * (MAX_LINE_BYTES // 6 + 1) + '"}\n')
    rc, err = cli_in_process(tiny, f"data.train={train}")
    assert_clean_error(rc, err, f"{train}:2: the line is longer than 16 MiB")


@pytest.mark.timeout(60)
def test_invisible_context_in_a_pool(tiny, tmp_path):
    pool = _write(tmp_path / "pool.txt", "Answer with apple.\n\u200b\u200c\n")
    rc, err = cli_in_process(tiny, "context.text=null", f"context.pool={pool}")
    assert_clean_error(rc, err, f"{pool}:2: the context is empty once invisible characters are removed")


@pytest.mark.timeout(60)
def test_non_utf8_context_file(tiny, tmp_path):
    ctx = _write(tmp_path / "system.txt", b"Always answer in fran\xe7ais.\n")
    rc, err = cli_in_process(tiny, "context.text=null", f"context.file={ctx}")
    assert_clean_error(rc, err, f"{ctx}:1: not UTF-8 text")


@pytest.mark.timeout(60)
def test_empty_context_file(tiny, tmp_path):
    ctx = _write(tmp_path / "system.txt", "\n\n")
    rc, err = cli_in_process(tiny, "context.text=null", f"context.file={ctx}")
    assert_clean_error(rc, err, f"{ctx}: the context file is empty")


def _long_context_prompts(tmp_path: Path, long_rows: int, short_rows: int) -> Path:
    rows = [{"prompt": f"Question: what is apple {i}?", "context": LONG_CONTEXT} for i in range(long_rows)]
    rows += [{"prompt": f"Question: what is stone {i}?", "context": "Answer with apple."} for i in range(short_rows)]
    return _write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _too_long(tiny, train: Path, policy: str, *extra: str) -> tuple[int, str]:
    return cli_in_process(tiny, f"data.train={train}", "context.selection=per_example", f"data.too_long={policy}",
                          "data.eval=null", "data.max_context_tokens=4096", *extra)


@pytest.mark.timeout(60)
def test_too_long_error(tiny, tmp_path):
    rc, err = _too_long(tiny, _long_context_prompts(tmp_path, 1, 4), "error")
    assert_clean_error(rc, err, "exceeds the model's 128 positions", "set data.too_long=truncate_context|skip")


@pytest.mark.timeout(120)
def test_too_long_skip(tiny, tmp_path):
    """Two of six examples do not fit: they are skipped with a warning, the run trains on the rest."""
    with pytest.warns(UserWarning, match=r"data.too_long=skip: 2 of 6 examples do not fit"):
        rc, err = _too_long(tiny, _long_context_prompts(tmp_path, 2, 4), "skip")
    assert rc == 0, err


@pytest.mark.timeout(60)
def test_too_long_skip_everything(tiny, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc, err = _too_long(tiny, _long_context_prompts(tmp_path, 3, 0), "skip")
    assert_clean_error(rc, err, "no training example fits the length budget", "raise model.max_position_embeddings")


@pytest.mark.timeout(120)
def test_too_long_truncates_the_context(tiny, tmp_path):
    """The default: the context is cut from the end until context + prompt + response fit, with a warning."""
    train = _long_context_prompts(tmp_path, 4, 0)
    with pytest.warns(UserWarning, match=r"truncated a context to \d+ of \d+ characters"):
        rc, err = _too_long(tiny, train, "truncate_context")
    assert rc == 0, err


@pytest.mark.timeout(60)
def test_prompt_alone_too_long(tiny, tmp_path):
    train = _write(tmp_path / "train.jsonl", json.dumps({"prompt": "apple river stone " * 40}) + "\n")
    rc, err = cli_in_process(tiny, f"data.train={train}")
    assert_clean_error(rc, err, f"{train}:1: ", "exceeds data.max_prompt_tokens=48", "raise the limit or shorten the prompt")
