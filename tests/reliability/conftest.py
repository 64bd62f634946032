"""Fixtures of the reliability suite: one tiny run (tokenizer, prompts, config) shared by the cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from _train_fixtures import make_run


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """Config of a tiny 1-step run (4-layer student, frozen random teacher, sentencepiece tokenizer),
    no checkpoints unless a case asks, logs under the run folder."""
    root = tmp_path_factory.mktemp("reliability")
    return make_run(root, steps=1, extra={"checkpoint.save": None, "logging.dir": str(root / "logs")})
