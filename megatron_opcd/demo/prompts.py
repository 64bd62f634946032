"""The demo's rules and prompts: one rule to distil, one rule to keep, and two disjoint prompt sets.

The rule to distil is one SmolLM2-135M-Instruct follows only when it sees it (measured with the
model's chat template, greedy, context at the start of the user turn: 0% without, ~86% with; as a
system message it is much weaker, ~10%). The rule to keep is given in context before and after
training: distillation that damages in-context instruction following shows up there.

Training prompts are templated (4 templates x 10 topics); evaluation prompts are hand-written
questions on other topics, so the evaluation measures a rule learned, not prompts memorised.
"""

from __future__ import annotations

PIRATE_RULE = "You are a pirate. Every reply must start with 'Ahoy!' followed by your answer."
"""The context the student is distilled from (graded: the reply starts with "Ahoy")."""

PIRATE_PREFIX = "Ahoy"

FRENCH_RULE = "Always reply in French. Réponds toujours en français."
"""Another rule, given in context before and after training (the forgetting check)."""

TRAIN_TEMPLATES = (
    "What is {}?",
    "Tell me something interesting about {}.",
    "Explain {} to a child.",
    "Why do people like {}?",
)

TRAIN_TOPICS = (
    "the ocean", "coffee", "the moon", "volcanoes", "bicycles",
    "chess", "rainbows", "bread", "thunderstorms", "music",
)

EVAL_PROMPTS = (
    "How do plants make their food?",
    "What is the capital of Japan?",
    "Give me a tip for sleeping better.",
    "How many legs does a spider have?",
    "What should I cook for dinner tonight?",
    "Why is the sky blue?",
    "Can you recommend a good book?",
    "How does a refrigerator keep food cold?",
    "What is two plus two?",
    "Describe a cat in one sentence.",
    "How do airplanes stay in the air?",
    "What is your favourite colour?",
    "How can I learn to play the guitar?",
    "What do bees make?",
    "Who painted the Mona Lisa?",
    "How far away is the sun?",
    "What is a good name for a dog?",
    "How do I make a cup of tea?",
    "What is the tallest mountain in the world?",
    "Why do leaves change colour in autumn?",
    "How does a computer work?",
    "What is the best way to save money?",
    "Write a short greeting for a birthday card.",
    "What animals live in the desert?",
    "How do fish breathe underwater?",
    "What is the weather like in winter?",
    "Suggest a fun weekend activity.",
    "How do I stay motivated when studying?",
    "What is the largest planet in our solar system?",
    "Why do we need to drink water?",
    "How are clouds formed?",
    "What is a healthy breakfast?",
    "How do magnets work?",
    "What language is spoken in Brazil?",
    "Tell me a fun fact about elephants.",
    "How do I tie a shoelace?",
    "What is the purpose of a library?",
    "How long does it take to boil an egg?",
    "What makes a good friend?",
    "How do trains run on tracks?",
    "What is the difference between a frog and a toad?",
    "Why do birds migrate?",
    "How should I prepare for a job interview?",
    "What is photosynthesis?",
    "How many days are in a leap year?",
    "What is the fastest land animal?",
    "How can I reduce stress?",
    "What do you know about the pyramids of Egypt?",
    "How do I plant a tree?",
    "What is the main ingredient of guacamole?",
)


def train_prompts() -> list[str]:
    """The 40 training prompts, every template over every topic."""
    return [t.format(topic) for topic in TRAIN_TOPICS for t in TRAIN_TEMPLATES]


def eval_prompts() -> list[str]:
    """The 50 held-out evaluation prompts."""
    return list(EVAL_PROMPTS)
