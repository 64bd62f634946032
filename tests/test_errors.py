"""megatron_opcd/errors.py: the user-facing error classes and run_cli's one-line ending.

No model and no megatron-core: the CLIs' end-to-end cases are in tests/reliability/.
"""

from __future__ import annotations

import pytest

from megatron_opcd import errors

# Each class and the built-in error it derived from before errors.py held them all: code that
# catches ValueError around a config or data file, or RuntimeError around a run, still catches it.
BUILTIN_BASE = {
    "ConfigError": ValueError,
    "DataError": ValueError,
    "TokenizerError": ValueError,
    "TemplateError": ValueError,
    "ConversionError": ValueError,
    "CheckpointError": RuntimeError,
    "NonFiniteError": RuntimeError,
    "DemoError": RuntimeError,
}


def test_every_error_class_is_an_opcd_error_with_its_builtin_base():
    defined = sorted(name for name, obj in vars(errors).items()
                     if isinstance(obj, type) and issubclass(obj, Exception) and obj is not errors.OPCDError)
    assert defined == sorted(BUILTIN_BASE), "a new error class of errors.py needs its row in BUILTIN_BASE"
    for name, base in BUILTIN_BASE.items():
        cls = getattr(errors, name)
        assert issubclass(cls, errors.OPCDError) and issubclass(cls, base), name


@pytest.mark.parametrize("name", sorted(BUILTIN_BASE))
def test_run_cli_ends_every_user_error_with_one_line(name, capsys):
    def fail():
        raise getattr(errors, name)("the problem\n  spread over lines; the fix")

    assert errors.run_cli(fail) == 1
    assert capsys.readouterr().err == "error: the problem spread over lines; the fix\n"


def test_run_cli_debug_shows_the_traceback(capsys):
    def fail():
        raise errors.ConfigError("bad")

    assert errors.run_cli(fail, debug=True) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: bad\n")


def test_run_cli_lets_a_bug_keep_its_traceback(capsys):
    def bug():
        raise ValueError("not a user error")

    def runtime_bug():
        raise RuntimeError("neither a user error nor a lost peer")

    with pytest.raises(ValueError, match="not a user error"):
        errors.run_cli(bug)
    with pytest.raises(RuntimeError, match="neither"):
        errors.run_cli(runtime_bug)


def test_run_cli_names_a_lost_peer_and_an_interrupt(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    def lost():
        raise RuntimeError("[gloo] Connection reset by peer")

    assert errors.is_peer_failure(RuntimeError("Connection reset by peer"))
    assert not errors.is_peer_failure(ValueError("Connection reset by peer"))
    assert errors.run_cli(lost) == 1
    assert capsys.readouterr().err.startswith("[rank 1] error: lost contact with another rank (RuntimeError: ")

    def interrupted():
        raise KeyboardInterrupt

    assert errors.run_cli(interrupted) == 130
    assert capsys.readouterr().err == "[rank 1] interrupted\n"
