"""The tiny demo's text: a procedurally generated corpus and Alpaca-style records (no downloads).

Sentences come from small templates over a fixed world (animals, places, colours, numbers), so
the text is free to redistribute and regular enough that a tiny model's loss visibly drops in a
few dozen steps. Deterministic for a seed. The shipped files in `assets/` were written by
`python -m mindformers_st.data make-corpus`.
"""
from __future__ import annotations

import json
import os
import random
from typing import Dict, List

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
CORPUS_FILE = os.path.join(ASSETS, "tiny_corpus.txt")
ALPACA_FILE = os.path.join(ASSETS, "tiny_alpaca.json")

ANIMALS = ["fox", "owl", "cat", "dog", "horse", "rabbit", "bear", "deer", "duck", "goat"]
PLACES = ["forest", "river", "meadow", "village", "mountain", "garden", "farm", "lake"]
COLOURS = ["red", "brown", "white", "black", "grey", "golden"]
FOODS = ["berries", "apples", "grass", "fish", "seeds", "carrots", "honey", "bread"]
SEASONS = ["spring", "summer", "autumn", "winter"]
CITIES = ["Beijing", "Paris", "Cairo", "Lima", "Oslo", "Delhi", "Rome", "Tokyo"]
REASONS = ["it is a city with a long history", "the food there is good",
           "the people there are kind", "the streets are full of life",
           "the parks are green and quiet", "the old buildings are beautiful"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _paragraph(rng: random.Random) -> str:
    a, p, c, f, s = (rng.choice(ANIMALS), rng.choice(PLACES), rng.choice(COLOURS),
                     rng.choice(FOODS), rng.choice(SEASONS))
    x, y = rng.randrange(0, 6), rng.randrange(0, 5)
    city, reason = rng.choice(CITIES), rng.choice(REASONS)
    sentences = [
        f"The {c} {a} lives near the {p}.",
        f"In {s} the {a} eats {f}.",
        f"{NUMBERS[x].capitalize()} plus {NUMBERS[y]} is {NUMBERS[x + y]}.",
        f"The {a} has {NUMBERS[x]} friends in the {p}.",
        f"I love {city}, because {reason}.",
        f"Every morning the {a} walks to the {rng.choice(PLACES)} and looks for {f}.",
    ]
    rng.shuffle(sentences)
    return " ".join(sentences[:rng.randrange(3, 7)])


def generate_corpus(paragraphs: int = 1500, seed: int = 0) -> str:
    """`paragraphs` generated paragraphs separated by blank lines."""
    rng = random.Random(seed)
    return "\n\n".join(_paragraph(rng) for _ in range(paragraphs)) + "\n"


def generate_alpaca(records: int = 200, seed: int = 0) -> List[Dict[str, str]]:
    """Alpaca-format records (instruction, input, output) about the same small world."""
    rng = random.Random(seed)
    out = []
    for _ in range(records):
        kind = rng.randrange(3)
        if kind == 0:
            x, y = rng.randrange(0, 6), rng.randrange(0, 5)
            out.append({"instruction": "Add the two numbers and answer in words.",
                        "input": f"{NUMBERS[x]} and {NUMBERS[y]}",
                        "output": f"{NUMBERS[x].capitalize()} plus {NUMBERS[y]} is "
                                  f"{NUMBERS[x + y]}."})
        elif kind == 1:
            a, f = rng.choice(ANIMALS), rng.choice(FOODS)
            out.append({"instruction": f"What does the {a} eat?", "input": "",
                        "output": f"The {a} eats {f}."})
        else:
            city, reason = rng.choice(CITIES), rng.choice(REASONS)
            out.append({"instruction": "Complete the sentence.",
                        "input": f"I love {city}, because",
                        "output": f"I love {city}, because {reason}."})
    return out


def write_assets(folder: str = ASSETS, seed: int = 0) -> Dict[str, str]:
    """Write tiny_corpus.txt and tiny_alpaca.json into `folder`; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    corpus = os.path.join(folder, "tiny_corpus.txt")
    alpaca = os.path.join(folder, "tiny_alpaca.json")
    with open(corpus, "w", encoding="utf-8") as fh:
        fh.write(generate_corpus(seed=seed))
    with open(alpaca, "w", encoding="utf-8") as fh:
        json.dump(generate_alpaca(seed=seed), fh, indent=1)
        fh.write("\n")
    return {"corpus": corpus, "alpaca": alpaca}
