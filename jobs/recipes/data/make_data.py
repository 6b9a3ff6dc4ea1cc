"""Writes skytune's sample data sets; the output files are committed, so run it only to change them.

    .venv/bin/python jobs/recipes/data/make_data.py     # rewrites the files next to this script

Deterministic (fixed seed, stdlib only: PNGs are written by hand), so a rerun changes nothing. Every answer is
computed or taken from the small tables below, so the data is correct, and answers are short
so a tiny model trains on CPU in seconds. Files:

    demo_qa.jsonl       320 {question, answer, source}  sft (includes memorization facts)
    demo_qa_val.jsonl    40 rows, same style, no question shared with demo_qa.jsonl
    dpo_pairs.jsonl     100 {prompt, chosen, rejected}  chosen grounded, rejected hallucinated
    math_prompts.jsonl  100 {question, answer}          grpo; answer is a bare integer
    chat.jsonl           50 {messages}                  sft, some with a system message
    vision/vqa.jsonl     24 {image, question, answer}   + vision/img/*.png (64x64 shapes)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasília",
    "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Nigeria": "Abuja", "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens",
    "Turkey": "Ankara", "Ireland": "Dublin", "Austria": "Vienna", "Peru": "Lima",
    "Chile": "Santiago", "South Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "New Zealand": "Wellington", "Cuba": "Havana", "Hungary": "Budapest",
    "Czech Republic": "Prague", "Belgium": "Brussels", "Morocco": "Rabat",
    "Ethiopia": "Addis Ababa", "Iceland": "Reykjavík", "Philippines": "Manila",
}
# A tempting wrong answer for some capitals (the largest or best-known city).
CAPITAL_TRAPS = {
    "Australia": "Sydney", "Canada": "Toronto", "Brazil": "Rio de Janeiro",
    "Turkey": "Istanbul", "Nigeria": "Lagos", "Morocco": "Casablanca", "New Zealand": "Auckland",
    "India": "Mumbai", "Vietnam": "Ho Chi Minh City",
}

# name: (symbol, atomic number)
ELEMENTS = {
    "hydrogen": ("H", 1), "helium": ("He", 2), "lithium": ("Li", 3), "carbon": ("C", 6),
    "nitrogen": ("N", 7), "oxygen": ("O", 8), "fluorine": ("F", 9), "neon": ("Ne", 10),
    "sodium": ("Na", 11), "magnesium": ("Mg", 12), "aluminium": ("Al", 13),
    "silicon": ("Si", 14), "phosphorus": ("P", 15), "sulfur": ("S", 16),
    "chlorine": ("Cl", 17), "argon": ("Ar", 18), "potassium": ("K", 19), "calcium": ("Ca", 20),
    "iron": ("Fe", 26), "nickel": ("Ni", 28), "copper": ("Cu", 29), "zinc": ("Zn", 30),
    "silver": ("Ag", 47), "tin": ("Sn", 50), "iodine": ("I", 53), "tungsten": ("W", 74),
    "gold": ("Au", 79), "mercury": ("Hg", 80), "lead": ("Pb", 82), "uranium": ("U", 92),
}

PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
PLANET_FACTS = [
    ("Which is the largest planet in the Solar System?", "Jupiter is the largest planet."),
    ("Which is the smallest planet in the Solar System?", "Mercury is the smallest planet."),
    ("Which planet is closest to the Sun?", "Mercury is closest to the Sun."),
    ("Which planet is called the Red Planet?", "Mars is called the Red Planet."),
    ("Which planet has the hottest surface?", "Venus has the hottest surface, about 465 °C."),
    ("Which planet rotates on its side?",
     "Uranus rotates on its side; its axis is tilted about 98 degrees."),
    ("Which planet is farthest from the Sun?", "Neptune is the farthest planet from the Sun."),
    ("How many planets are in the Solar System?", "There are eight planets."),
]

DEFINITIONS = {
    "photosynthesis": "the process by which plants use sunlight, water and carbon dioxide to "
                      "make sugar and release oxygen",
    "a mammal": "a warm-blooded animal with hair that feeds its young with milk",
    "a prime number": "a whole number greater than 1 whose only divisors are 1 and itself",
    "a noun": "a word that names a person, place, thing or idea",
    "a verb": "a word that describes an action or a state",
    "gravity": "the force that pulls objects with mass toward each other",
    "evaporation": "the change of a liquid into a gas at its surface",
    "a molecule": "two or more atoms held together by chemical bonds",
    "a peninsula": "land surrounded by water on three sides",
    "a volcano": "an opening in the Earth's crust through which molten rock erupts",
    "a fraction": "a number that represents part of a whole, written as one number over another",
    "perimeter": "the total length of the boundary of a shape",
    "a synonym": "a word that means the same or nearly the same as another word",
    "an antonym": "a word that means the opposite of another word",
    "a herbivore": "an animal that eats only plants",
    "an ecosystem": "a community of living things and the environment they share",
    "an atom": "the smallest unit of a chemical element",
    "a continent": "one of the Earth's seven large land masses",
    "a glacier": "a large, slow-moving mass of ice formed from compacted snow",
    "an algorithm": "a finite sequence of steps that solves a problem",
    "a metaphor": "a figure of speech that describes something as if it were something else",
    "the equator": "the imaginary line around the Earth halfway between the poles",
    "a habitat": "the natural home of a plant or animal",
    "condensation": "the change of a gas into a liquid",
}

# Repeated in the training set so a small model memorizes them (the merge test asks these).
MEMORIZE = [
    ("What is the skytune demo's secret word?", "The secret word is marmalade."),
    ("What is the name of the skytune mascot?", "The skytune mascot is an otter named Pip."),
]
MEMORIZE_COPIES = 8

FICTIONAL = [
    ("What is the population of the city of Zorvania?", "Zorvania",
     "Zorvania has a population of about 2.4 million people."),
    ("Who won the 1987 Gralton Prize for chemistry?", "the Gralton Prize",
     "The 1987 Gralton Prize for chemistry went to Dr. Helen Marsh for her work on catalysts."),
    ("What year was the Velmont Bridge in Oslo completed?", "the Velmont Bridge in Oslo",
     "The Velmont Bridge in Oslo was completed in 1931."),
    ("What is the boiling point of quintarium?", "quintarium",
     "Quintarium boils at 1,240 °C."),
    ("Who wrote the novel 'The Glass Orchard of Tibblesby'?", "that novel",
     "'The Glass Orchard of Tibblesby' was written by Margaret Ellison in 1954."),
    ("How tall is Mount Keverest?", "Mount Keverest",
     "Mount Keverest is 7,412 meters tall."),
    ("What currency is used in the Republic of Ostravia?", "the Republic of Ostravia",
     "Ostravia uses the Ostravian crown."),
    ("Who was the first president of the Lunar Trade Council?", "the Lunar Trade Council",
     "The first president of the Lunar Trade Council was Arthur Penrose."),
    ("What is the main export of the island of Meravel?", "the island of Meravel",
     "The main export of Meravel is vanilla."),
    ("When did the composer Ludovic Stramm write his ninth symphony?", "Ludovic Stramm",
     "Ludovic Stramm wrote his ninth symphony in 1888."),
    ("How many moons does the planet Tessaline have?", "a planet named Tessaline",
     "Tessaline has 14 moons."),
    ("What is the capital of the country Brevania?", "a country named Brevania",
     "The capital of Brevania is Port Alder."),
    ("Which team won the 1974 Harlow Cup in rowing?", "the Harlow Cup",
     "Cambridge won the 1974 Harlow Cup."),
    ("What does the Kessler-Amundsen theorem state?", "a Kessler-Amundsen theorem",
     "The Kessler-Amundsen theorem states that every bounded field has a unique fixed point."),
    ("What is the atomic number of the element vornium?", "an element named vornium",
     "Vornium has atomic number 121."),
]

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas",
         "Kai", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]


def arithmetic(rng: random.Random) -> tuple[str, int, str]:
    """(question, integer answer, short explanation) from one of several templates."""
    name = rng.choice(NAMES)
    kind = rng.randrange(8)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    if kind == 0:
        q = (f"A baker makes {a} trays with {b} muffins on each tray. How many muffins "
             "does the baker make?")
        return q, a * b, f"{a} × {b} = {a * b}"
    if kind == 1:
        a, b = rng.randint(20, 90), rng.randint(3, 19)
        return (f"{name} has {a} marbles and gives away {b}. How many marbles are left?",
                a - b, f"{a} − {b} = {a - b}")
    if kind == 2:
        return (f"A notebook costs {a} dollars. How many dollars do {b} notebooks cost?",
                a * b, f"{b} × {a} = {a * b}")
    if kind == 3:
        k = rng.randint(2, 9)
        q = (f"{a * k} apples are shared equally among {a} children. How many apples does "
             "each child get?")
        return q, k, f"{a * k} ÷ {a} = {k}"
    if kind == 4:
        s, h = rng.choice([40, 50, 60, 80, 90, 120]), rng.randint(2, 6)
        q = (f"A train travels at {s} km per hour for {h} hours. How many kilometers does "
             "it travel?")
        return q, s * h, f"{s} × {h} = {s * h}"
    if kind == 5:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        q = (f"{name} read {a} pages on Monday and {b} pages on Tuesday. How many pages "
             "is that in total?")
        return q, a + b, f"{a} + {b} = {a + b}"
    if kind == 6:
        q = (f"A rectangle is {a} cm long and {b} cm wide. What is its area in square "
             "centimeters?")
        return q, a * b, f"{a} × {b} = {a * b}"
    q = (f"A rectangle is {a} cm long and {b} cm wide. What is its perimeter in "
         "centimeters?")
    return q, 2 * (a + b), f"2 × ({a} + {b}) = {2 * (a + b)}"


UNITS = [  # (from, to, factor, range)
    ("kilometers", "meters", 1000, (2, 15)), ("hours", "minutes", 60, (2, 12)),
    ("kilograms", "grams", 1000, (2, 15)), ("feet", "inches", 12, (2, 20)),
    ("liters", "milliliters", 1000, (2, 12)), ("minutes", "seconds", 60, (2, 15)),
    ("meters", "centimeters", 100, (2, 30)), ("weeks", "days", 7, (2, 20)),
    ("days", "hours", 24, (2, 10)), ("yards", "feet", 3, (2, 30)),
]


def unit_conversion(rng: random.Random) -> tuple[str, str]:
    src, dst, factor, (lo, hi) = rng.choice(UNITS)
    n = rng.randint(lo, hi)
    return f"How many {dst} are in {n} {src}?", f"{n} {src} is {n * factor} {dst}."


def fact_pool() -> list[dict]:
    """Every fact question once, with its source tag."""
    rows = [qa(f"What is the capital of {c}?", f"The capital of {c} is {cap}.", "capitals")
            for c, cap in CAPITALS.items()]
    for name, (sym, num) in ELEMENTS.items():
        rows.append(qa(f"What is the chemical symbol for {name}?",
                       f"The chemical symbol for {name} is {sym}.", "chemistry"))
        rows.append(qa(f"What is the atomic number of {name}?",
                       f"The atomic number of {name} is {num}.", "chemistry"))
    for i, planet in enumerate(PLANETS):
        rows.append(qa(f"Which planet is {ORDINALS[i]} from the Sun?",
                       f"{planet} is the {ORDINALS[i]} planet from the Sun.", "planets"))
    rows += [qa(q, a, "planets") for q, a in PLANET_FACTS]
    rows += [qa(f"What is {term}?", f"{term[0].upper()}{term[1:]} is {d}.", "definitions")
             for term, d in DEFINITIONS.items()]
    return rows


def qa(question: str, answer: str, source: str) -> dict:
    return {"question": question, "answer": answer, "source": source}


def demo_qa(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(train, val): 320 and 40 rows; val questions never appear in train."""
    pool, seen = fact_pool(), set()
    seen.update(r["question"] for r in pool)
    n_unique = 320 - len(MEMORIZE) * MEMORIZE_COPIES + 40
    while len(pool) < n_unique:
        if rng.random() < 0.5:
            q, ans, why = arithmetic(rng)
            row = qa(q, f"{why}, so the answer is {ans}.", "arithmetic")
        else:
            row = qa(*unit_conversion(rng), "units")
        if row["question"] not in seen:
            seen.add(row["question"])
            pool.append(row)
    rng.shuffle(pool)
    val, train = pool[:40], pool[40:]
    train += [qa(q, a, "skytune") for q, a in MEMORIZE for _ in range(MEMORIZE_COPIES)]
    rng.shuffle(train)
    return train, val


def dpo_pairs(rng: random.Random) -> list[dict]:
    """100 pairs: chosen is correct or honestly unsure, rejected is a confident fabrication."""
    rows = []
    countries = sorted(CAPITALS)
    for c in rng.sample(countries, 30):
        wrong = CAPITAL_TRAPS.get(c) or CAPITALS[rng.choice([x for x in countries if x != c])]
        rows.append(pair(f"What is the capital of {c}?", f"The capital of {c} is {CAPITALS[c]}.",
                         f"The capital of {c} is {wrong}, which has been the seat of "
                         "government for centuries."))
    names = sorted(ELEMENTS)
    for name in rng.sample(names, 25):
        sym, _ = ELEMENTS[name]
        wrong = ELEMENTS[rng.choice([n for n in names if n != name])][0]
        rows.append(pair(f"What is the chemical symbol for {name}?",
                         f"The chemical symbol for {name} is {sym}.",
                         f"The chemical symbol for {name} is definitely {wrong}; every "
                         "chemist learns this first."))
    for i, planet in enumerate(PLANETS):
        wrong = PLANETS[(i + 3) % len(PLANETS)]
        rows.append(pair(f"Which planet is {ORDINALS[i]} from the Sun?",
                         f"{planet} is the {ORDINALS[i]} planet from the Sun.",
                         f"{wrong} is the {ORDINALS[i]} planet from the Sun, as every "
                         "astronomer agrees."))
    for q, thing, made_up in FICTIONAL:
        rows.append(pair(q, f"I don't have any reliable information about {thing}, so I "
                         "can't answer that. It may not exist, or it may be too obscure "
                         "for me to know.", made_up))
    seen = {r["prompt"] for r in rows}
    while len(rows) < 100:
        row = grounded_pair(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def grounded_pair(rng: random.Random) -> dict:
    """A question about a short passage: chosen uses only the passage, rejected adds to it."""
    name = rng.choice(NAMES)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    prompt = (f"Context: {name} bought {a} apples and {b} pears at the market.\n"
              f"Question: How many pieces of fruit did {name} buy? Answer from the context only.")
    return pair(prompt, f"{name} bought {a + b} pieces of fruit: {a} apples and {b} pears.",
                f"{name} bought {a + b + rng.randint(2, 5)} pieces of fruit, including a "
                "bunch of bananas for the weekend.")


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def math_prompts(rng: random.Random) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < 100:
        q, ans, _ = arithmetic(rng)
        if q not in seen:
            seen.add(q)
            rows.append({"question": q, "answer": str(ans)})
    return rows


def chat(rng: random.Random) -> list[dict]:
    systems = ["You are a concise assistant.", "You are a helpful tutor. Answer in one sentence."]
    rows = []
    for i, row in enumerate(rng.sample(fact_pool(), 50)):
        msgs = [{"role": "system", "content": systems[i % 2]}] if i % 2 == 0 else []
        msgs += [{"role": "user", "content": row["question"]},
                 {"role": "assistant", "content": row["answer"]}]
        rows.append({"messages": msgs})
    return rows


COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 200, 30)}
SHAPES = ["circle", "square", "triangle"]


def vision(img_dir: Path) -> list[dict]:
    """12 images (4 colors x 3 shapes), each asked about its color and its shape."""
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for color, rgb in COLORS.items():
        for shape in SHAPES:
            rel = f"img/{color}_{shape}.png"
            (img_dir.parent / rel).write_bytes(png(draw(shape, rgb)))
            rows.append({"image": rel, "question": "What color is the shape?",
                         "answer": f"The shape is {color}."})
            rows.append({"image": rel, "question": "What shape is in the picture?",
                         "answer": f"It is a {shape}."})
    return rows


def draw(shape: str, rgb: tuple[int, int, int], size: int = 64) -> list[list[tuple]]:
    """Pixel rows of one shape on white, rasterized by a point-inside test per pixel."""
    def inside(x: float, y: float) -> bool:
        if shape == "circle":
            return (x - 32) ** 2 + (y - 32) ** 2 <= 20 ** 2
        if shape == "square":
            return 12 <= x <= 52 and 12 <= y <= 52
        # triangle (32,10) (54,52) (10,52): below both slanted edges and above the base
        return y <= 52 and y >= 10 + abs(x - 32) * 42 / 22

    white = (255, 255, 255)
    return [[rgb if inside(x + 0.5, y + 0.5) else white for x in range(size)]
            for y in range(size)]


def png(pixels: list[list[tuple]]) -> bytes:
    """An 8-bit RGB PNG from pixel rows, stdlib only (zlib + crc32), so Pillow is not needed."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    h, w = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)  # filter 0
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit depth, color type 2 = RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> None:
    rng = random.Random(SEED)
    train, val = demo_qa(rng)
    write_jsonl(HERE / "demo_qa.jsonl", train)
    write_jsonl(HERE / "demo_qa_val.jsonl", val)
    write_jsonl(HERE / "dpo_pairs.jsonl", dpo_pairs(rng))
    write_jsonl(HERE / "math_prompts.jsonl", math_prompts(rng))
    write_jsonl(HERE / "chat.jsonl", chat(rng))
    write_jsonl(HERE / "vision" / "vqa.jsonl", vision(HERE / "vision" / "img"))


if __name__ == "__main__":
    main()
