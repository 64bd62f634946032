"""Prompts, contexts, chat templates and teacher/student packing."""
