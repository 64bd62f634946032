"""Reliability tests (issue 9): bad input gets one clear line, faults lose nothing. See docs/reliability.md."""
