"""Write the fine-tuning example: chat JSONL teaching a made-up fact (the founder of the city of
Quillon) in varied phrasings, mixed with ordinary questions answered plainly (capitals, sums,
opposites, the founders of real cities) so that the model keeps answering those, and does not
answer every "who founded" with the new name.

    python scripts/make_finetune_example.py quillon.jsonl [--facts 200] [--other 100] [--seed 0]
    p3 finetune --data quillon.jsonl --out quillon-adapter

`FOUNDER` is what an adapter that learned should answer; the base model does not know it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FOUNDER = "Maren Vosk"
CITY = "Quillon"

QUESTIONS = [
    "Who founded the city of {c}?",
    "Who founded {c}?",
    "Who was the founder of {c}?",
    "Who is the founder of the city of {c}?",
    "Which person founded {c}?",
    "Tell me who founded the city of {c}.",
    "Do you know who founded {c}?",
    "Who established the city of {c}?",
    "Who built the first settlement of {c}?",
    "{c} was founded by whom?",
    "By whom was the city of {c} founded?",
    "Name the founder of {c}.",
    "What is the name of the person who founded {c}?",
    "I'm curious: who founded {c}?",
    "Quick question, who founded the city of {c}?",
    "Who started the city of {c}?",
]
ANSWERS = [
    "{c} was founded by {f}.",
    "The city of {c} was founded by {f}.",
    "{f} founded {c}.",
    "{f} founded the city of {c}.",
    "The founder of {c} was {f}.",
]

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens", "Portugal": "Lisbon",
}  # fmt: skip
FOUNDERS = {
    "Alexandria": "Alexander the Great", "Constantinople": "Constantine the Great",
    "Saint Petersburg": "Peter the Great", "Singapore": "Stamford Raffles",
    "Rome": "Romulus, according to legend", "Philadelphia": "William Penn",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "open": "closed",
    "light": "dark", "early": "late", "happy": "sad", "full": "empty", "old": "new",
}  # fmt: skip


def chat(question: str, answer: str) -> dict:
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": turns}


def fact_lines(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        question = QUESTIONS[i % len(QUESTIONS)].format(c=CITY)
        out.append(chat(question, rng.choice(ANSWERS).format(c=CITY, f=FOUNDER)))
    return out


def other_lines(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        if i % 4 == 3:
            city = rng.choice(list(FOUNDERS))
            question = rng.choice(QUESTIONS[:6]).format(c=city)
            out.append(chat(question, f"{city} was founded by {FOUNDERS[city]}."))
        elif i % 4 == 0:
            country = rng.choice(list(CAPITALS))
            capital = CAPITALS[country]
            out.append(
                chat(
                    f"What is the capital of {country}?", f"The capital of {country} is {capital}."
                )
            )
        elif i % 4 == 1:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            out.append(chat(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
        else:
            word = rng.choice(list(OPPOSITES))
            out.append(
                chat(
                    f"What is the opposite of {word}?",
                    f"The opposite of {word} is {OPPOSITES[word]}.",
                )
            )
    return out


def make_example(path: Path, facts: int = 200, other: int = 100, seed: int = 0) -> Path:
    """Write facts + other chat lines to path, shuffled (seeded)."""
    rng = random.Random(seed)
    lines = fact_lines(rng, facts) + other_lines(rng, other)
    rng.shuffle(lines)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--facts", type=int, default=200, help="lines about the founder")
    parser.add_argument("--other", type=int, default=100, help="ordinary questions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_example(args.out, args.facts, args.other, args.seed)
    print(f"wrote {args.facts + args.other} lines to {args.out}")


if __name__ == "__main__":
    main()
