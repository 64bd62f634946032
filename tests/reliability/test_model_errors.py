"""Models and checkpoints: differing vocabularies/tokenizers, a checkpoint of another
architecture, corrupted or truncated checkpoints. One line naming the folder; never a traceback."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from _train_fixtures import WORDS
from ._helpers import assert_clean_error, cli_in_process


def _other_tokenizer(folder: Path) -> Path:
    """A 200-piece sentencepiece model trained on other text: the same size as the run's, other pieces."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    words = [w[::-1] + w[:3] for w in WORDS] + list(WORDS)
    (folder / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(400)))
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=200, model_type="bpe",
        character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2,
    )
    return folder / "tokenizer.model"


@pytest.fixture(scope="module")
def ckpts(tiny, tmp_path_factory) -> dict[str, Path]:
    """good: a 1-step checkpoint of the run's student. other: a 2-layer, hidden-96 model with
    another tokenizer of the same size (another architecture, another tokenizer)."""
    root = tmp_path_factory.mktemp("ckpts")
    rc, err = cli_in_process(tiny, f"checkpoint.save={root / 'good'}")
    assert rc == 0, err
    other_tok = _other_tokenizer(root / "other_tok")
    rc, err = cli_in_process(tiny, f"checkpoint.save={root / 'other'}", "model.hidden_size=96", "model.num_layers=2",
                             f"data.tokenizer={other_tok}")
    assert rc == 0, err
    return {"good": root / "good" / "step_0000001", "other": root / "other" / "step_0000001"}


def _variant(ckpts, tmp_path: Path, damage) -> Path:
    d = tmp_path / "step_0000001"
    shutil.copytree(ckpts["good"], d)
    damage(d)
    return d


# --- vocabularies and tokenizers ---------------------------------------------------------------


# 120 s: the first case imports megatron-core in this process (with the registry's CUDA build of
# torch, Python 3.12, that took 60 s on a loaded 2-core box).
@pytest.mark.timeout(120)
def test_teacher_vocab_differs(tiny):
    rc, err = cli_in_process(tiny, "teacher.model.vocab_size=300")
    assert_clean_error(rc, err, "teacher.vocab_size=300 differs from model.vocab_size=200", "share one tokenizer")


@pytest.mark.timeout(60)
def test_tokenizer_larger_than_model_vocab(tiny):
    rc, err = cli_in_process(tiny, "model.vocab_size=100", "teacher.model.vocab_size=100")
    assert_clean_error(rc, err, "has 200 tokens but model.vocab_size=100", "use the model's own tokenizer")


@pytest.mark.timeout(120)
def test_teacher_tokenizer_differs(tiny, ckpts):
    """Same vocabulary size, other pieces: the teacher checkpoint's tokenizer/ is compared id by id."""
    rc, err = cli_in_process(tiny, f"teacher.checkpoint={ckpts['other']}", "teacher.model=null")
    assert_clean_error(rc, err, f"the teacher's tokenizer ({ckpts['other']}/tokenizer) differs from the student's",
                       "for the student but", "must share one tokenizer")


# --- another architecture ------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_pretrained_of_another_architecture(tiny, ckpts):
    rc, err = cli_in_process(tiny, f"checkpoint.pretrained={ckpts['other']}")
    assert_clean_error(rc, err, f"does not match {ckpts['other']}/model_config.yaml", "model.hidden_size=64",
                       "omit it to use the checkpoint's")


@pytest.mark.timeout(120)
def test_teacher_checkpoint_of_another_architecture(tiny, ckpts):
    rc, err = cli_in_process(tiny, f"teacher.checkpoint={ckpts['other']}")
    assert_clean_error(rc, err, f"does not match {ckpts['other']}/model_config.yaml", "teacher.model.num_layers=4")


@pytest.mark.timeout(120)
def test_resume_from_another_architecture(tiny, ckpts):
    """The model section is compared with the checkpoint being resumed (check_resume, before any
    model is built), as it is with checkpoint.pretrained."""
    rc, err = cli_in_process(tiny, f"checkpoint.load={ckpts['other']}")
    assert_clean_error(rc, err, f"does not match {ckpts['other']}/model_config.yaml", "model.num_layers=4 but the "
                       "checkpoint has 2", "must describe the model being resumed")


# --- corrupted and truncated checkpoints --------------------------------------------------------


def _truncate(pattern):
    def damage(d: Path):
        files = sorted(d.glob(pattern))
        assert files, pattern
        for f in files:
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 3)
    return damage


# Caught by the marker's sizes/checksums and required parts (checkpointing.verify_checkpoint).
CORRUPT = {
    "truncated weights": (_truncate("model/*.distcp"), "checkpoint.pretrained",
                          ["is damaged: model/__0_0.distcp has", "were written (truncated or overwritten)"]),
    "missing .metadata": (lambda d: (d / "model" / ".metadata").unlink(), "checkpoint.pretrained",
                          ["is damaged: model/.metadata is missing"]),
    "truncated optimizer": (_truncate("optimizer/*.distcp"), "checkpoint.load",
                            ["is damaged: optimizer/__0_0.distcp has", "were written (truncated or overwritten)"]),
    "truncated RNG state": (_truncate("rng/*.pt"), "checkpoint.load", ["is damaged: rng/rank_00000.pt has"]),
    "corrupted marker": (lambda d: (d / "opcd_checkpoint.json").write_text('{"step": 1, '), "checkpoint.load",
                         ["opcd_checkpoint.json is unreadable", "delete"]),
    "corrupted model_config.yaml": (lambda d: (d / "model_config.yaml").write_text("num_layers: [4\n"),
                                    "checkpoint.pretrained", ["model_config.yaml is not valid YAML", "corrupted"]),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage,how,needles", list(CORRUPT.values()), ids=list(CORRUPT))
def test_corrupted_checkpoint(tiny, ckpts, tmp_path, damage, how, needles):
    d = _variant(ckpts, tmp_path, damage)
    rc, err = cli_in_process(tiny, f"{how}={d}", *(["model=null"] if how == "checkpoint.pretrained" else []))
    message = assert_clean_error(rc, err, *needles)
    assert str(d) in message, f"the error does not name the checkpoint folder: {message}"


@pytest.mark.timeout(30)
def test_cleanup_restores_a_checkpoint_moved_aside(tmp_path):
    """Killed between the two renames of a re-save: `X.old-*` is the only complete copy of X and is
    put back; the half-written `X.tmp-*` is removed."""
    from megatron_opcd.training.state import cleanup_incomplete, find_latest

    old = tmp_path / "step_0000004.old-123"
    (old / "model").mkdir(parents=True)
    (old / "opcd_checkpoint.json").write_text("{}")
    (tmp_path / "step_0000004.tmp-9-9").mkdir()
    (tmp_path / "step_0000002.old-5").mkdir()  # incomplete (no marker): removed
    cleanup_incomplete(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004"]
    assert find_latest(tmp_path) == tmp_path / "step_0000004"
