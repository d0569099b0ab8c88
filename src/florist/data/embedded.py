"""A generated instruction dataset whose answers can be checked exactly.

The categories are ones SmolLM2-135M-Instruct gets 0% right before training and learns within a few dozen
examples (see the project's EMBEDDED notes): five fast ones and three slower arithmetic/comparison ones, so
that methods separate. Answers are 1-4 tokens long. Everything is built from the word lists below: no download.

The held-out test split is fixed per category, independently of the seed: a subject (a letter, a noun, a
sentence, a pair of numbers) lands in exactly one split, so no test prompt, nor any rephrasing of it, is ever
seen in training, whichever seeds train and test were drawn with.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from florist.data.prompts import Example

EMBEDDED_TEMPLATE = "chatml"
SPLITS = ("train", "test")
TEST_FRACTION = 0.2

NOUN_PLURALS: dict[str, str] = {
    "apple": "apples", "river": "rivers", "table": "tables", "window": "windows", "garden": "gardens",
    "pencil": "pencils", "rocket": "rockets", "planet": "planets", "flower": "flowers", "bottle": "bottles",
    "candle": "candles", "castle": "castles", "dragon": "dragons", "forest": "forests", "island": "islands",
    "jacket": "jackets", "kitten": "kittens", "ladder": "ladders", "mirror": "mirrors", "needle": "needles",
    "orange": "oranges", "pillow": "pillows", "rabbit": "rabbits", "sailor": "sailors", "tiger": "tigers",
    "violin": "violins", "wagon": "wagons", "button": "buttons", "camera": "cameras", "doctor": "doctors",
    "engine": "engines", "farmer": "farmers", "guitar": "guitars", "hammer": "hammers", "insect": "insects",
    "jungle": "jungles", "kettle": "kettles", "lemon": "lemons", "monkey": "monkeys", "nurse": "nurses",
    "office": "offices", "parrot": "parrots", "queen": "queens", "robot": "robots", "spoon": "spoons",
    "turtle": "turtles", "umbrella": "umbrellas", "valley": "valleys", "whale": "whales", "yacht": "yachts",
    "zebra": "zebras", "anchor": "anchors", "basket": "baskets", "carpet": "carpets", "desert": "deserts",
    "eagle": "eagles", "feather": "feathers", "goat": "goats", "helmet": "helmets", "jewel": "jewels",
    "king": "kings", "lamp": "lamps", "mountain": "mountains", "nest": "nests", "ocean": "oceans",
    "pirate": "pirates", "rose": "roses", "shoe": "shoes", "tower": "towers", "uncle": "uncles",
    "village": "villages", "wizard": "wizards", "bridge": "bridges", "cloud": "clouds", "door": "doors",
    "friend": "friends", "horse": "horses", "letter": "letters", "market": "markets", "painter": "painters",
    "road": "roads", "singer": "singers", "ticket": "tickets", "wall": "walls", "cookie": "cookies",
    "banana": "bananas", "train": "trains", "chair": "chairs", "song": "songs", "book": "books",
    "box": "boxes", "fox": "foxes", "bus": "buses", "dish": "dishes", "brush": "brushes",
    "church": "churches", "watch": "watches", "glass": "glasses", "class": "classes", "bench": "benches",
    "match": "matches", "peach": "peaches", "witch": "witches", "wish": "wishes", "kiss": "kisses",
    "tax": "taxes", "beach": "beaches", "coach": "coaches", "lunch": "lunches", "dress": "dresses",
    "city": "cities", "baby": "babies", "lady": "ladies", "party": "parties", "story": "stories",
    "cherry": "cherries", "puppy": "puppies", "berry": "berries", "army": "armies", "family": "families",
    "country": "countries", "penny": "pennies", "pony": "ponies", "body": "bodies", "fly": "flies",
    "key": "keys", "toy": "toys", "boy": "boys", "day": "days", "tray": "trays",
    "leaf": "leaves", "knife": "knives", "wolf": "wolves", "wife": "wives", "shelf": "shelves",
    "loaf": "loaves", "half": "halves", "calf": "calves", "thief": "thieves", "scarf": "scarves",
    "child": "children", "mouse": "mice", "goose": "geese", "tooth": "teeth", "foot": "feet",
    "man": "men", "woman": "women", "person": "people", "ox": "oxen", "cactus": "cacti",
    "sheep": "sheep", "fish": "fish", "deer": "deer", "moose": "moose", "potato": "potatoes",
    "tomato": "tomatoes", "hero": "heroes", "echo": "echoes", "piano": "pianos", "photo": "photos",
    "radio": "radios", "zoo": "zoos", "kangaroo": "kangaroos", "video": "videos", "bamboo": "bamboos",
}
ADJECTIVES = (
    "red", "blue", "green", "yellow", "purple", "silver", "golden", "small", "large", "tiny", "huge", "quiet",
    "loud", "happy", "sad", "brave", "clever", "gentle", "angry", "calm", "bright", "dark", "warm", "cold",
    "old", "young", "fast", "slow", "soft", "hard", "sweet", "bitter", "fresh", "empty", "heavy", "light",
    "lazy", "proud", "shy", "wild", "strange", "famous", "lucky", "hungry", "sleepy", "funny", "round",
    "square", "shiny", "dusty",
)
NAMES = (
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo", "Maya",
    "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tina", "Victor", "Wendy", "Oscar", "Lucy", "Max", "Nina",
    "Hugo", "Alice", "Tom", "Sara", "Mark",
)
PAST_VERBS = (
    "found", "painted", "watched", "carried", "opened", "cleaned", "moved", "bought", "sold", "fixed",
    "visited", "drew", "liked", "saw", "heard", "followed", "kept", "lost", "washed", "chose",
)
OPENERS = ("Yesterday", "Today", "Later", "Suddenly", "Sometimes", "Often", "Then", "Finally", "Again", "Once")
DETERMINERS = ("The", "One", "My", "Our", "Every", "This", "That", "Some", "Her", "His")
MANNERS = ("quickly", "slowly", "happily", "quietly", "carefully", "loudly", "gladly", "softly", "twice", "today")
SENTENCE_COUNT = 800


@dataclass(frozen=True)
class Category:
    """A task: its subjects, its phrasings, and the answer each subject has."""

    subjects: Callable[[], tuple]
    phrasings: tuple[str, ...]
    answer: Callable[[object], str]
    show: Callable[[object], dict[str, object]]


@cache
def _sentences() -> tuple[str, ...]:
    # Built from a fixed seed so the subject list, and therefore the held-out split, never depends on the user's seed.
    rng = random.Random("florist-embedded-sentences")
    patterns = (
        "{name} {verb} the {adjective} {noun}.",
        "{opener} {name} {verb} the {noun}.",
        "{determiner} {adjective} {noun} moved {manner}.",
    )
    nouns = tuple(NOUN_PLURALS)
    found: dict[str, None] = {}
    while len(found) < SENTENCE_COUNT:
        sentence = rng.choice(patterns).format(
            name=rng.choice(NAMES),
            verb=rng.choice(PAST_VERBS),
            adjective=rng.choice(ADJECTIVES),
            noun=rng.choice(nouns),
            opener=rng.choice(OPENERS),
            determiner=rng.choice(DETERMINERS),
            manner=rng.choice(MANNERS),
        )
        found[sentence] = None
    return tuple(found)


def _number_pairs(low: int, high: int) -> tuple[tuple[int, int], ...]:
    return tuple((a, b) for a in range(low, high + 1) for b in range(low, high + 1) if a != b)


CATEGORIES: dict[str, Category] = {
    "next_letter": Category(
        subjects=lambda: tuple(string.ascii_lowercase[:-1] + string.ascii_uppercase[:-1]),
        phrasings=(
            "What letter comes after {subject} in the alphabet?",
            "Which letter follows {subject} in the alphabet?",
            "Name the letter right after {subject} in the alphabet.",
        ),
        answer=lambda letter: chr(ord(letter) + 1),
        show=lambda letter: {"subject": letter},
    ),
    "plural": Category(
        subjects=lambda: tuple(NOUN_PLURALS),
        phrasings=(
            "What is the plural of the noun {subject}?",
            "Give the plural form of {subject}.",
            "Write the word {subject} in its plural form.",
        ),
        answer=lambda noun: NOUN_PLURALS[noun],
        show=lambda noun: {"subject": noun},
    ),
    "first_word": Category(
        subjects=_sentences,
        phrasings=(
            "What is the first word of this sentence? {subject}",
            "Repeat only the first word of the following sentence: {subject}",
            "Sentence: {subject}\nWhich word comes first?",
        ),
        answer=lambda sentence: sentence.split()[0],
        show=lambda sentence: {"subject": sentence},
    ),
    "last_word": Category(
        subjects=_sentences,
        phrasings=(
            "What is the last word of this sentence? {subject}",
            "Repeat only the last word of the following sentence: {subject}",
            "Sentence: {subject}\nWhich word comes last?",
        ),
        answer=lambda sentence: sentence.split()[-1].rstrip("."),
        show=lambda sentence: {"subject": sentence},
    ),
    "lowercase": Category(
        subjects=lambda: tuple(
            shown for word in (*NOUN_PLURALS, *ADJECTIVES) for shown in (word.capitalize(), word.upper())
        ),
        phrasings=(
            "Write {subject} in lowercase letters.",
            "Convert the word {subject} to lowercase.",
            "Rewrite {subject} using only small letters.",
        ),
        answer=lambda word: word.lower(),
        show=lambda word: {"subject": word},
    ),
    "larger_number": Category(
        subjects=lambda: _number_pairs(1, 99),
        phrasings=(
            "Which number is larger, {a} or {b}?",
            "Of {a} and {b}, which is bigger?",
            "Name the greater number: {a} or {b}.",
        ),
        answer=lambda pair: str(max(pair)),
        show=lambda pair: {"a": pair[0], "b": pair[1]},
    ),
    "smaller_number": Category(
        subjects=lambda: _number_pairs(1, 99),
        phrasings=(
            "Which number is smaller, {a} or {b}?",
            "Of {a} and {b}, which is less?",
            "Name the lower number: {a} or {b}.",
        ),
        answer=lambda pair: str(min(pair)),
        show=lambda pair: {"a": pair[0], "b": pair[1]},
    ),
    "sum": Category(
        subjects=lambda: tuple((a, b) for a in range(1, 21) for b in range(1, 21)),
        phrasings=(
            "What is {a} plus {b}?",
            "Add {a} and {b}.",
            "Compute the sum of {a} and {b}.",
        ),
        answer=lambda pair: str(sum(pair)),
        show=lambda pair: {"a": pair[0], "b": pair[1]},
    ),
}
EMBEDDED_CATEGORIES = tuple(CATEGORIES)


@cache
def _split_subjects(name: str, split: str) -> tuple:
    subjects = list(CATEGORIES[name].subjects())
    random.Random(f"florist-embedded-holdout-{name}").shuffle(subjects)
    test_count = round(len(subjects) * TEST_FRACTION)
    return tuple(subjects[:test_count] if split == "test" else subjects[test_count:])


def _category_examples(name: str, split: str, count: int, rng: random.Random) -> list[Example]:
    category = CATEGORIES[name]
    subjects = _split_subjects(name, split)
    available = len(subjects) * len(category.phrasings)
    if count > available:
        raise ValueError(
            f"embedded category {name!r} has {available} distinct {split} prompts; "
            f"ask for at most {available} per category"
        )
    # Sampling (subject, phrasing) indices without replacement keeps every prompt distinct.
    picks = rng.sample(range(available), count)
    examples = []
    for pick in picks:
        subject = subjects[pick // len(category.phrasings)]
        instruction = category.phrasings[pick % len(category.phrasings)].format(**category.show(subject))
        examples.append(Example(instruction=instruction, response=category.answer(subject), category=name))
    return examples


def generate_embedded(num_per_category: int, seed: int, split: str = "train") -> list[Example]:
    """`num_per_category` distinct examples of every category from one split, shuffled; the same for the same seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown embedded split {split!r}; choose from {', '.join(SPLITS)}")
    if num_per_category < 1:
        raise ValueError(f"num_per_category must be at least 1, got {num_per_category}")
    rng = random.Random(f"florist-embedded-{split}-{seed}")
    examples = [
        example for name in EMBEDDED_CATEGORIES for example in _category_examples(name, split, num_per_category, rng)
    ]
    rng.shuffle(examples)
    return examples
