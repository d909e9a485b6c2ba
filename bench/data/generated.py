"""A larger calibration corpus, generated here from hand-written templates and word lists (nothing downloaded).

Whitened factorisation needs a second moment XᵀX that is well estimated in every input dimension: the FFN
down-projection of MiniLM has 1536 inputs, and ~127 short sentences give only ~1900 token rows. `generate(n)`
makes n distinct, grammatical, varied English sentences (statements, questions, instructions, numbers, names,
code and science talk) with a seeded RNG, so the corpus is the same on every machine. bench/data/text.py's
held-out sentences are never produced (checked in `calibration_corpus`).
"""

from __future__ import annotations

import random

PEOPLE = [
    "my sister",
    "the old fisherman",
    "our neighbour",
    "a young doctor",
    "the new manager",
    "my grandfather",
    "the shy student",
    "a local farmer",
    "the head chef",
    "our landlord",
    "the bus driver",
    "a retired pilot",
    "the mayor",
    "my best friend",
    "the night nurse",
    "a tired engineer",
    "the museum guide",
    "Anna",
    "Tomás",
    "Priya",
    "Mr Okafor",
    "Dr Lindqvist",
    "the twins",
    "the coach",
    "a street musician",
    "the librarian",
]
PLACES = [
    "the harbour",
    "the mountain village",
    "the train station",
    "the city library",
    "the corner shop",
    "the hospital",
    "the airport",
    "the riverbank",
    "the school gym",
    "the night market",
    "the old castle",
    "the office kitchen",
    "the campsite",
    "the concert hall",
    "the laboratory",
    "the football stadium",
    "the bakery",
    "the post office",
    "the greenhouse",
    "the parking garage",
    "Lisbon",
    "Nairobi",
    "Osaka",
    "the Scottish Highlands",
    "the desert highway",
    "a quiet suburb",
]
TIMES = [
    "yesterday",
    "last winter",
    "every Sunday",
    "before dawn",
    "after lunch",
    "on Friday evening",
    "during the storm",
    "in the spring",
    "at midnight",
    "twice a week",
    "three years ago",
    "this morning",
    "over the holidays",
    "by the end of the month",
    "during the power cut",
    "right after the meeting",
]
OBJECTS = [
    "a wooden chair",
    "the broken bicycle",
    "an old photograph",
    "a bag of oranges",
    "the heavy suitcase",
    "a handwritten letter",
    "the spare key",
    "a pot of soup",
    "the laptop charger",
    "a box of books",
    "the garden hose",
    "a cracked mirror",
    "the tax forms",
    "a loaf of rye bread",
    "the first-aid kit",
    "a pair of hiking boots",
    "the violin",
    "a jar of honey",
    "the weather report",
    "a paper map",
]
VERBS_PAST = [
    "repaired",
    "found",
    "carried",
    "sold",
    "painted",
    "forgot",
    "borrowed",
    "returned",
    "opened",
    "wrapped",
    "cleaned",
    "measured",
    "photographed",
    "delivered",
    "hid",
    "dropped",
    "ordered",
    "checked",
]
FEELINGS = [
    "relieved",
    "nervous",
    "delighted",
    "exhausted",
    "curious",
    "annoyed",
    "proud",
    "confused",
    "grateful",
    "surprised",
    "homesick",
    "calm",
]
TOPICS = [
    "climate change",
    "the local election",
    "a new vaccine",
    "quantum computing",
    "the housing shortage",
    "renewable energy",
    "the history of printing",
    "ocean currents",
    "childhood nutrition",
    "the price of coffee",
    "urban gardening",
    "ancient Rome",
    "deep learning",
    "volcanic islands",
    "public transport",
    "sleep and memory",
    "the stock market",
    "bird migration",
    "medieval music",
    "water purification",
]
ANIMALS = [
    "the fox",
    "a stray dog",
    "the owl",
    "a herd of goats",
    "the dolphins",
    "a tiny spider",
    "the horse",
    "two crows",
    "the tortoise",
    "a swarm of bees",
    "the kitten",
    "the wolves",
]
FOODS = [
    "lentil soup",
    "grilled fish",
    "a lemon tart",
    "spicy noodles",
    "roast vegetables",
    "fresh pasta",
    "a cheese omelette",
    "mango chutney",
    "rice pudding",
    "garlic bread",
    "a bean stew",
    "apple crumble",
]
ADJ = [
    "quiet",
    "crowded",
    "bright",
    "narrow",
    "ancient",
    "muddy",
    "modern",
    "chilly",
    "noisy",
    "peaceful",
    "expensive",
    "colourful",
    "empty",
    "slippery",
    "enormous",
    "cosy",
]
CODE = [
    "the parser",
    "the cache layer",
    "this unit test",
    "the login service",
    "the sorting routine",
    "the build script",
    "the database migration",
    "the API endpoint",
    "the memory allocator",
    "the retry loop",
    "the config loader",
    "the image resizer",
]
BUGS = [
    "throws an exception on empty input",
    "leaks memory under load",
    "returns stale results",
    "times out after thirty seconds",
    "fails when the path contains spaces",
    "rounds prices incorrectly",
    "deadlocks when two requests arrive at once",
    "ignores the timezone",
    "crashes on Unicode names",
    "writes the log twice",
]
SCI = [
    "Light bends when it passes from air into water",
    "Enzymes speed up chemical reactions in the body",
    "Glaciers carve deep valleys as they move",
    "Plants release oxygen as a by-product of photosynthesis",
    "Sound travels faster through steel than through air",
    "The moon's gravity drives the ocean tides",
    "Bacteria can exchange genes with one another",
    "Hot air rises because it is less dense",
    "Salt lowers the freezing point of water",
    "Earthquakes release energy stored in the crust",
]

TEMPLATES = [
    "{P} {V} {O} at {L} {T}.",
    "{T}, {p} {V} {o} and felt {F}.",
    "Why did {p} leave {o} at {l}?",
    "Could you ask {p} to bring {o} to {l} {t}?",
    "{L} was {a} and {a2} when we arrived {t}.",
    "I read an article about {X} while waiting at {l}.",
    "{P} gave a short talk on {X} {t}.",
    "The report on {X} will be published {t}.",
    "{N} people attended the meeting about {X} at {l}.",
    "{Z} crossed the road near {l} {t}.",
    "We watched {z} from the window of {l}.",
    "For dinner we made {D} with whatever was left in the fridge.",
    "{P} says that {d} tastes better the next day.",
    "Is {d} on the menu at {l} this week?",
    "{C} {B}.",
    "After the last release, {c} {B} again.",
    "We rewrote {c} because it {B}.",
    "Does anyone know why {c} {B}?",
    "{S}.",
    "{S}, which is why {x} matters.",
    "The ticket to {l} costs {N} euros and includes {o}.",
    "Turn right after {l} and you will see the {a} building.",
    "Remember to pack {o} before the trip to {l}.",
    "{P} was {F} to hear that {p2} had {V} {o}.",
    "It took {p} {N} minutes to find {o} at {l}.",
    "Nobody expected {p} to win the debate on {X}.",
    "The {a} streets around {l} fill up with tourists {t}.",
    "When the lights went out, {p} {V} {o} by candlelight.",
    "Please do not leave {o} in {l} overnight.",
    "{P} has lived near {l} for {N} years.",
]


def _fill(rng: random.Random, t: str) -> str:
    pick = rng.choice
    p, p2 = rng.sample(PEOPLE, 2)
    a, a2 = rng.sample(ADJ, 2)
    vals = dict(
        p=p,
        p2=p2,
        l=pick(PLACES),
        t=pick(TIMES),
        o=pick(OBJECTS),
        V=pick(VERBS_PAST),
        F=pick(FEELINGS),
        a=a,
        a2=a2,
        X=pick(TOPICS),
        z=pick(ANIMALS),
        d=pick(FOODS),
        c=pick(CODE),
        B=pick(BUGS),
        S=pick(SCI),
        N=str(rng.choice([2, 3, 5, 7, 12, 15, 20, 30, 45, 60, 90, 120, 250])),
    )
    vals["x"] = vals["X"]
    for k in ("p", "l", "t", "o", "a", "x", "z", "d", "c"):
        v = vals[k]
        vals[k.upper()] = v[0].upper() + v[1:]
    return t.format(**vals)


def generate(n: int, seed: int = 0) -> list[str]:
    """n distinct sentences from the templates, deterministic for a seed."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        s = _fill(rng, rng.choice(TEMPLATES))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def calibration_corpus(n: int = 2000) -> list[str]:
    """The hand-written calibration sentences followed by n generated ones; never a held-out sentence."""
    from .text import CALIBRATION, HELD_OUT

    held = set(HELD_OUT)
    extra = [s for s in generate(n + len(held)) if s not in held and s not in CALIBRATION][:n]
    return list(CALIBRATION) + extra


def _words(sentences) -> list[str]:
    return sorted({w.strip(".,;:!?\"'()").lower() for s in sentences for w in s.split()} - {""})


def augment(sentences: list[str], n: int, vocab: list[str] = (), p: float = 0.2, seed: int = 1) -> list[str]:
    """n distinct new sentences made from `sentences` (TinyBERT-style augmentation for distillation): splice the
    start of one sentence onto the end of another, then replace each word with probability p by a random word
    (from `vocab` if given, else from the sentences' own words). The teacher's output on any text is a valid
    target, and varied text is what keeps a short healing run from fitting its few templates."""
    rng = random.Random(seed)
    pool = list(vocab) or _words(sentences)
    base = list(sentences)
    out, seen = [], set(base)
    while len(out) < n:
        a, b = rng.choice(base).split(), rng.choice(base).split()
        if rng.random() < 0.5 and len(a) > 3 and len(b) > 3:
            a = a[: rng.randint(2, len(a) - 1)] + b[rng.randint(1, len(b) - 2) :]
        words = [rng.choice(pool) if rng.random() < p else w for w in a]
        s = " ".join(words)
        s = s[0].upper() + s[1:]
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def healing_corpus(n_generated: int = 2000, n_augmented: int = 0, vocab: list[str] = ()) -> list[str]:
    """calibration_corpus(n_generated) followed by n_augmented augmented sentences made from it; never a
    held-out sentence."""
    from .text import HELD_OUT

    base = calibration_corpus(n_generated)
    held = set(HELD_OUT)
    extra = [s for s in augment(base, n_augmented + len(held), vocab) if s not in held][:n_augmented]
    return base + extra
