"""The built-in task of `lorakit train` with no arguments: sentences about a person → a strict record line.

    "Oslo is home to Mia Chen, 34, who works as a pilot."  →  "name=Chen, Mia; age=34; city=Oslo; job=pilot"

The data is generated (deterministic for a seed), short (~60 tokens an example, so a 2-core CPU trains on
hundreds of examples in a few minutes), and the base model fails it zero-shot even though the prompt spells
out the format: it paraphrases, drops fields or keeps "First Last" order. After a few minutes of LoRA it
follows the format exactly. Scored by exact match and by field accuracy.
"""

from __future__ import annotations

import random
import re
from typing import Any

FIRST = ("Mia Noah Lena Omar Ava Liam Zoe Ivan Sara Yuki Ana Leo Nora Raj Eva Hugo Ines Tariq Maya Felix Alma Kofi "
         "Elif Dario Hana Lars Priya Jonas Nadia Marco Aiko Emil Sofia Karim Lucia Anton Amara Pavel Rosa Theo").split()
LAST = ("Chen Garcia Novak Okafor Silva Berg Kowalski Haddad Tanaka Moreau Rossi Patel Lindqvist Mensah Duarte "
        "Ivanova Schmidt Nakamura Oyelaran Brennan Castillo Fischer Horvat Jansen Kaur Larsen Mbeki Ortega Petrov "
        "Quinn Romero Sato Varga Weber Yilmaz Zhou Abbas Dubois Eriksen Ferreira").split()
CITIES = ("Oslo Lima Porto Kyoto Dakar Quito Graz Leeds Pune Perth Turin Bergen Accra Cusco Malmo Nantes Krakow "
          "Osaka Tunis Hobart Gdansk Seville Lyon Davao Bremen Tartu Ghent Cork Split Utrecht").split()
JOBS = ("teacher nurse baker pilot chemist farmer lawyer plumber architect dentist editor engineer florist "
        "geologist jeweler librarian mechanic optician painter surgeon tailor translator veterinarian welder").split()
TEMPLATES = (
    "{first} {last}, {age}, works as {a_job} in {city}.",
    "{city} is home to {first} {last}, {age}, who works as {a_job}.",
    "Meet {first} {last}: {a_job} from {city}, aged {age}.",
    "{first} {last} is {age} years old and lives in {city}, working as {a_job}.",
    "Our new {job} is {first} {last} ({age}), based in {city}.",
    "Age {age}, {job}, {city}: that is {first} {last}.",
    "In {city}, {a_job} named {first} {last} just turned {age}.",
    "{last}, {first} ({age}) - {job} - {city}.",
)
SYSTEM = "Reply with one record line: name=<last>, <first>; age=<age>; city=<city>; job=<job>"
FIELDS = ("name", "age", "city", "job")


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def make_record(rng: random.Random) -> tuple[str, str]:
    """(sentence, record line) for one random person."""
    first, last, city, job = rng.choice(FIRST), rng.choice(LAST), rng.choice(CITIES), rng.choice(JOBS)
    age = rng.randint(19, 88)
    sentence = rng.choice(TEMPLATES).format(first=first, last=last, age=age, city=city, job=job, a_job=_article(job))
    return sentence, f"name={last}, {first}; age={age}; city={city}; job={job}"


def as_chat(sentence: str, record: str) -> dict[str, Any]:
    """A chat-messages row: the format instruction as system turn, the sentence, the record as the answer."""
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": sentence},
                         {"role": "assistant", "content": record}]}


def builtin_rows(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows in the chat-messages format. Held-out sentences never occur in training."""
    rng = random.Random(f"lorakit-builtin-{seed}")
    seen: set[str] = set()
    train, held_out = [], []
    while len(held_out) < n_eval:
        sentence, record = make_record(rng)
        if sentence not in seen:
            seen.add(sentence)
            held_out.append(as_chat(sentence, record))
    while len(train) < n_train:
        sentence, record = make_record(rng)
        if sentence not in seen:
            seen.add(sentence)
            train.append(as_chat(sentence, record))
    return train, held_out


def parse_record(text: str) -> dict[str, str]:
    """Fields of a record line; tolerant of spacing so that field accuracy credits near misses."""
    out = {}
    for part in text.strip().split(";"):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip().lower()] = re.sub(r"\s+", " ", value.strip())
    return out


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    """exact_match: the whole line; field_accuracy: share of the 4 fields with the right value."""
    if not references:
        return {"exact_match": 0.0, "field_accuracy": 0.0}
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    fields = 0
    for p, r in zip(predictions, references):
        got, want = parse_record(p), parse_record(r)
        fields += sum(got.get(k) == want[k] for k in FIELDS)
    return {"exact_match": exact / len(references), "field_accuracy": fields / (len(FIELDS) * len(references))}


# The recipe used when no --data is given; any option set in a config file or on the command line wins.
BUILTIN_PRESET: dict[str, Any] = {
    "train_examples": 320,
    "eval_examples": 40,
    "batch_size": 8,
    "epochs": 1.0,
    "lr": 2e-3,
    "warmup": 0.1,
    "schedule": "cosine",
    "r": 8,
    "lora_alpha": 16,
    "target_modules": ["all-linear"],
    "max_new_tokens": 32,
    "log_every": 2,
    "seed": 0,
}


def preset_for(settings: dict[str, Any]) -> dict[str, Any]:
    """Defaults that depend on the user's settings: the built-in recipe when no training data is given."""
    return dict(BUILTIN_PRESET) if not settings.get("data") else {}
