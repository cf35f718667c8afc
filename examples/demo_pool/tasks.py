"""Tasks of the demo adapter pool: seeded generators with exact answers.

Every task draws a *key* (a number, a date, a phrase, a list) from a seeded
``random.Random``, renders it into one of several instruction templates, and
computes the exact target. Splits are disjoint by key: a test key never
appears in the training items or in the 20 routing samples, whatever the
template.

Prompt format (shared by training, the evaluation harness and the server):
``format_prompt(inputs)`` wraps the instruction in SmolLM2-Instruct's chat
template with its default system message and the assistant header; the model
answers with the target followed by ``<|im_end|>``. Scoring is
``exact_match(prediction, target)``: both sides stripped of surrounding
whitespace and of one trailing period, then compared case-sensitively.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from hilora_core.evaluation.scoring import exact_match, normalize_answer  # noqa: F401  (re-exported)

# SmolLM2-Instruct's chat template for one user turn (it adds this system
# message whenever none is given); tests check it against the tokenizer's.
SYSTEM_MESSAGE = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PROMPT_TEMPLATE = (
    "<|im_start|>system\n" + SYSTEM_MESSAGE + "<|im_end|>\n<|im_start|>user\n{inputs}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
END_OF_TURN = "<|im_end|>"


def format_prompt(inputs: str) -> str:
    """The full model prompt (chat template, generation header included) for a task input."""
    return PROMPT_TEMPLATE.format(inputs=inputs)


# --------------------------------------------------------------------------- converters


def _split(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_ONES = _split(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
)
_TENS = _split("_ _ twenty thirty forty fifty sixty seventy eighty ninety")


def number_to_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000, e.g. 347 -> 'three hundred forty-seven' (no 'and')."""
    assert 0 <= n < 1_000_000, n
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    thousands, rest = divmod(n, 1000)
    return number_to_words(thousands) + " thousand" + ("" if rest == 0 else " " + number_to_words(rest))


_ROMAN = ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
          (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"))


def int_to_roman(n: int) -> str:
    """Roman numeral for 1 <= n <= 3999."""
    assert 1 <= n <= 3999, n
    out = []
    for value, symbol in _ROMAN:
        count, n = divmod(n, value)
        out.append(symbol * count)
    return "".join(out)


def ordinal_suffix(n: int) -> str:
    """'1st', '2nd', '3rd', '11th', '22nd', ..."""
    if n % 100 in (11, 12, 13):
        return f"{n}th"
    return f"{n}" + {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


MONTHS = _split("January February March April May June July August September October November December")

# Common, short English words (nouns and adjectives) for the string and list tasks.
WORDS = _split(
    """
    apple river stone cloud garden window silver orange paper forest candle bridge yellow
    winter summer market pencil rabbit castle planet mirror button dragon pocket ladder
    basket copper hammer island jacket kitten lemon marble needle ocean pepper puzzle
    rocket saddle tiger velvet wagon zebra anchor bottle carpet desert engine falcon
    guitar harbor insect jungle kettle lizard meadow napkin oyster parrot quiet ribbon
    shadow tunnel violet walnut yogurt amber blanket cactus dinner feather glove honey
    iron jelly lantern maple nest olive piano quilt raven sugar tomato umbrella valley
    whale cotton bamboo cherry dolphin eagle fabric ginger helmet igloo jigsaw koala
    lobster mango nickel orbit pillow rose salmon turtle unicorn vessel willow acorn
    beacon cobalt dune ember flint grove hazel ivory jade kernel lagoon moss nectar
    onyx pearl quartz reef slate thistle tundra urchin vapor wheat crystal breeze
    canyon meteor comet galaxy harvest orchard prairie glacier summit spring autumn
    thunder sunset lunar solar coral azure crimson golden purple scarlet green brown
    black white silent gentle brave happy lucky rapid sharp smooth sweet bitter
    """
)
assert len(set(WORDS)) == len(WORDS)


# --------------------------------------------------------------------------- task type


@dataclass(frozen=True)
class Task:
    """One task: a seeded key generator, instruction templates and the exact answer.

    ``draw(rng)`` returns a hashable key; ``render(key)`` returns ``(x, target)``
    where ``x`` fills the ``{x}`` slot of a template. ``test_templates``, when
    given, phrase the test items only, so that the test measures wording the
    adapter was not trained on.
    """

    name: str
    cluster: str
    description: str
    templates: tuple[str, ...]
    draw: Callable[[random.Random], Hashable]
    render: Callable[[Hashable], tuple[str, str]]
    test_templates: tuple[str, ...] = ()

    def example(self, key: Hashable, rng: random.Random, test: bool = False) -> dict[str, str]:
        """One ``{"inputs", "targets"}`` item for ``key`` with a template drawn from ``rng``."""
        x, target = self.render(key)
        templates = self.test_templates if test and self.test_templates else self.templates
        return {"inputs": rng.choice(templates).format(x=x), "targets": target}


def _phrase(rng: random.Random, lo: int, hi: int) -> tuple[str, ...]:
    return tuple(rng.sample(WORDS, rng.randint(lo, hi)))


def _numbers(rng: random.Random, lo: int, hi: int, n_lo: int, n_hi: int) -> tuple[int, ...]:
    return tuple(rng.sample(range(lo, hi + 1), rng.randint(n_lo, n_hi)))


def _date(rng: random.Random) -> tuple[int, int, int]:
    import datetime as dt

    d = dt.date(1900, 1, 1) + dt.timedelta(days=rng.randrange(200 * 365))
    return (d.year, d.month, d.day)


def _iso(key) -> str:
    y, m, d = key
    return f"{y:04d}-{m:02d}-{d:02d}"


CANDIDATES: tuple[Task, ...] = (
    # ---- numbers
    Task(
        "number_to_words", "numbers", "a number (0-999) -> English words",
        ("Write the number {x} in words.", "Spell out {x} in English words.",
         "How do you write {x} in words?", "Convert {x} into English words.",
         "Number: {x}\nWrite it out in words."),
        lambda r: r.randint(0, 999), lambda k: (str(k), number_to_words(k)),
    ),
    Task(
        "words_to_number", "numbers", "English number words -> digits",
        ("Write \"{x}\" as a number using digits.", "Convert {x} to digits.",
         "What number is \"{x}\"? Answer with digits.", "Number in words: {x}\nWrite it in digits."),
        lambda r: r.randint(0, 999), lambda k: (number_to_words(k), str(k)),
    ),
    Task(
        "int_to_roman", "numbers", "a number (1-2999) -> Roman numerals",
        ("Write {x} in Roman numerals.", "Convert the number {x} to Roman numerals.",
         "What is {x} as a Roman numeral?", "Number: {x}\nWrite it as a Roman numeral."),
        lambda r: r.randint(1, 2999), lambda k: (str(k), int_to_roman(k)),
    ),
    Task(
        "roman_to_int", "numbers", "Roman numerals -> digits",
        ("What number is the Roman numeral {x}?", "Convert the Roman numeral {x} to digits.",
         "Write {x} as an ordinary number.", "Roman numeral: {x}\nWrite it in digits."),
        lambda r: r.randint(1, 2999), lambda k: (int_to_roman(k), str(k)),
    ),
    Task(
        "thousands_separator", "numbers", "digits -> digits with comma thousands separators",
        ("Write {x} with commas as thousands separators.", "Add thousands separators to {x}.",
         "Format the number {x} with commas.", "Number: {x}\nFormat it with commas between thousands."),
        lambda r: r.randint(1000, 9_999_999), lambda k: (str(k), f"{k:,}"),
    ),
    Task(
        "ordinal", "numbers", "a number -> its ordinal with suffix (23 -> 23rd)",
        ("Write the ordinal form of {x}.", "What is the ordinal of {x}? Use digits and a suffix.",
         "Turn {x} into an ordinal number.", "Number: {x}\nWrite it as an ordinal."),
        lambda r: r.randint(1, 999), lambda k: (str(k), ordinal_suffix(k)),
    ),
    # ---- strings
    Task(
        "uppercase", "strings", "a phrase -> the phrase in capital letters",
        ("Write this in uppercase: {x}", "Convert to capital letters: {x}",
         "Rewrite \"{x}\" in all caps.", "Text: {x}\nWrite it in uppercase letters."),
        lambda r: _phrase(r, 2, 3), lambda k: (" ".join(k), " ".join(k).upper()),
    ),
    Task(
        "acronym", "strings", "a phrase -> the initial letters of its words, capitalised",
        ("Make an acronym from: {x}", "Write the first letter of each word in capitals: {x}",
         "What is the acronym of \"{x}\"?", "Text: {x}\nForm an acronym from the first letters."),
        lambda r: _phrase(r, 3, 5), lambda k: (" ".join(k), "".join(w[0] for w in k).upper()),
    ),
    Task(
        "reverse_words", "strings", "a phrase -> its words in reverse order",
        ("Reverse the order of the words: {x}", "Write these words backwards, last word first: {x}",
         "Put the words of \"{x}\" in reverse order.", "Text: {x}\nReverse the word order."),
        lambda r: _phrase(r, 3, 4), lambda k: (" ".join(k), " ".join(reversed(k))),
    ),
    Task(
        "sort_words", "strings", "a phrase -> its words in alphabetical order",
        ("Sort these words alphabetically: {x}", "Put the words in alphabetical order: {x}",
         "Arrange \"{x}\" in alphabetical order.", "Words: {x}\nSort them from A to Z."),
        lambda r: _phrase(r, 3, 4), lambda k: (" ".join(k), " ".join(sorted(k))),
    ),
    Task(
        "title_case", "strings", "a phrase -> each word capitalised",
        ("Capitalize each word: {x}", "Write this in title case: {x}",
         "Rewrite \"{x}\" with every word starting with a capital letter.",
         "Text: {x}\nCapitalize the first letter of every word."),
        lambda r: _phrase(r, 2, 4), lambda k: (" ".join(k), " ".join(w.capitalize() for w in k)),
    ),
    Task(
        "spell_word", "strings", "a word -> its letters separated by hyphens",
        ("Spell the word {x} with hyphens between the letters.", "Spell out {x} letter by letter.",
         "Write the letters of \"{x}\" separated by dashes.", "Word: {x}\nSpell it with hyphens."),
        lambda r: r.choice(WORDS), lambda k: (k, "-".join(k)),
    ),
    # ---- dates
    Task(
        "iso_to_us_date", "dates", "YYYY-MM-DD -> MM/DD/YYYY",
        ("Write the date {x} in US format (MM/DD/YYYY).", "Convert {x} to MM/DD/YYYY.",
         "Reformat the date {x} as month/day/year.", "Date: {x}\nWrite it as MM/DD/YYYY."),
        _date, lambda k: (_iso(k), f"{k[1]:02d}/{k[2]:02d}/{k[0]:04d}"),
    ),
    Task(
        "iso_to_long_date", "dates", "YYYY-MM-DD -> 'Month D, YYYY'",
        ("Write the date {x} in words, like March 5, 2020.", "Convert {x} to a long date with the month name.",
         "Spell out the month in the date {x}.", "Date: {x}\nWrite it as Month Day, Year."),
        _date, lambda k: (_iso(k), f"{MONTHS[k[1] - 1]} {k[2]}, {k[0]}"),
    ),
    Task(
        "long_to_iso_date", "dates", "'D Month YYYY' -> YYYY-MM-DD",
        ("Write the date {x} in ISO format (YYYY-MM-DD).", "Convert {x} to YYYY-MM-DD.",
         "Reformat {x} as year-month-day with digits.", "Date: {x}\nWrite it as YYYY-MM-DD."),
        _date, lambda k: (f"{k[2]} {MONTHS[k[1] - 1]} {k[0]}", _iso(k)),
    ),
    Task(
        "date_to_month", "dates", "YYYY-MM-DD -> the month's name",
        ("Which month is the date {x} in?", "Name the month of {x}.",
         "What is the month name in the date {x}?", "Date: {x}\nWrite the name of its month."),
        _date, lambda k: (_iso(k), MONTHS[k[1] - 1]),
    ),
    # ---- arithmetic
    Task(
        "add", "arithmetic", "a + b with 10 <= a, b <= 99",
        ("What is {x}?", "Compute {x}.", "Calculate {x}. Answer with a number.", "Sum: {x} ="),
        lambda r: (r.randint(10, 99), r.randint(10, 99)), lambda k: (f"{k[0]} + {k[1]}", str(k[0] + k[1])),
    ),
    Task(
        "subtract", "arithmetic", "a - b with 10 <= b < a <= 99",
        ("What is {x}?", "Compute {x}.", "Calculate {x}. Answer with a number.", "Difference: {x} ="),
        lambda r: tuple(sorted(r.sample(range(10, 100), 2), reverse=True)),
        lambda k: (f"{k[0]} - {k[1]}", str(k[0] - k[1])),
    ),
    Task(
        "multiply", "arithmetic", "a * b with 2 <= a <= 9 and 2 <= b <= 99",
        ("What is {x}?", "Compute {x}.", "Calculate {x}. Answer with a number.", "Product: {x} ="),
        lambda r: (r.randint(2, 9), r.randint(2, 99)), lambda k: (f"{k[0]} * {k[1]}", str(k[0] * k[1])),
    ),
    Task(
        "modulo", "arithmetic", "a mod b with 10 <= a <= 99, 2 <= b <= 9",
        ("What is {x}?", "Compute {x}.", "Calculate the remainder {x}.", "Remainder: {x} ="),
        lambda r: (r.randint(10, 99), r.randint(2, 9)), lambda k: (f"{k[0]} mod {k[1]}", str(k[0] % k[1])),
    ),
    # ---- lists
    Task(
        "list_max", "lists", "a list of numbers -> the largest",
        ("Which is the largest number in this list: {x}?", "Find the maximum of: {x}",
         "List: {x}\nWhat is the biggest number?", "Give the largest value among {x}."),
        lambda r: _numbers(r, 1, 99, 4, 6), lambda k: (", ".join(map(str, k)), str(max(k))),
    ),
    Task(
        "list_min", "lists", "a list of numbers -> the smallest",
        ("Which is the smallest number in this list: {x}?", "Find the minimum of: {x}",
         "List: {x}\nWhat is the smallest number?", "Give the lowest value among {x}."),
        lambda r: _numbers(r, 1, 99, 4, 6), lambda k: (", ".join(map(str, k)), str(min(k))),
    ),
    Task(
        "list_last", "lists", "a list of words -> its last item",
        ("What is the last item in this list: {x}?", "Give the final element of: {x}",
         "List: {x}\nWhich item comes last?", "Name the last entry of the list {x}."),
        lambda r: _phrase(r, 4, 6), lambda k: (", ".join(k), k[-1]),
    ),
    Task(
        "list_count", "lists", "a list of words -> how many items",
        ("How many items are in this list: {x}?", "Count the elements of: {x}",
         "List: {x}\nHow many entries does it have?", "Give the number of items in {x}."),
        lambda r: _phrase(r, 3, 9), lambda k: (", ".join(k), str(len(k))),
    ),
    Task(
        "list_sort", "lists", "a list of numbers -> sorted ascending",
        ("Sort this list in ascending order: {x}", "Order from smallest to largest: {x}",
         "List: {x}\nSort it in increasing order.", "Arrange {x} from low to high."),
        lambda r: _numbers(r, 1, 99, 3, 5), lambda k: (", ".join(map(str, k)), ", ".join(map(str, sorted(k)))),
    ),
)

# The tasks of the pool (chosen from CANDIDATES by measured base / adapter exact match).
TASK_NAMES: tuple[str, ...] = (
    "number_to_words", "words_to_number", "ordinal",
    "uppercase", "title_case", "reverse_words",
    "iso_to_us_date", "iso_to_long_date", "long_to_iso_date",
    "list_max", "list_min", "list_last",
)

@dataclass(frozen=True)
class TaskSet:
    """A pool's tasks: every candidate generator, and the names that make up the pool."""

    label: str
    candidates: tuple[Task, ...]
    pool: tuple[str, ...]

    def get(self, name: str) -> Task:
        """The task called ``name`` (KeyError quoting it when unknown)."""
        for t in self.candidates:
            if t.name == name:
                return t
        raise KeyError(f"unknown {self.label} task {name!r}; known: {sorted(t.name for t in self.candidates)}")

    def pool_tasks(self) -> list[Task]:
        """The tasks of the pool, in pool order."""
        return [self.get(n) for n in self.pool]


DEMO_TASKS = TaskSet("demo", CANDIDATES, TASK_NAMES)
get_task = DEMO_TASKS.get
pool_tasks = DEMO_TASKS.pool_tasks


def task_seed(seed: int, name: str) -> int:
    """A stable per-task seed (crc32, independent of PYTHONHASHSEED)."""
    return zlib.crc32(f"{seed}:{name}".encode())


def split_keys_and_items(
    task: Task, seed: int = 0, n_train: int = 2000, n_sample: int = 20, n_test: int = 100
) -> dict[str, list[tuple[Hashable, dict[str, str]]]]:
    """Like :func:`make_splits`, with each item's key: ``{split: [(key, item), ...]}``."""
    rng = random.Random(task_seed(seed, task.name))
    held: list[Hashable] = []
    seen: set[Hashable] = set()
    attempts = 0
    while len(held) < n_test + n_sample:
        attempts += 1
        assert attempts < 100 * (n_test + n_sample), f"key space of {task.name} too small"
        key = task.draw(rng)
        if key not in seen:
            seen.add(key)
            held.append(key)
    test = [(k, task.example(k, rng, test=True)) for k in held[:n_test]]
    sample = [(k, task.example(k, rng)) for k in held[n_test:]]
    train = []
    while len(train) < n_train:
        key = task.draw(rng)
        if key not in seen:
            train.append((key, task.example(key, rng)))
    return {"train": train, "sample": sample, "test": test}


def make_splits(
    task: Task, seed: int = 0, n_train: int = 2000, n_sample: int = 20, n_test: int = 100
) -> dict[str, list[dict[str, str]]]:
    """Train / sample / test items for ``task``, disjoint by key.

    Test and sample keys are distinct keys drawn first; training items are
    drawn afterwards (keys may repeat within train) from the remaining keys.
    Returns ``{"train": [...], "sample": [...], "test": [...]}`` of
    ``{"inputs", "targets"}`` dicts; the same arguments give the same items.
    """
    parts = split_keys_and_items(task, seed, n_train, n_sample, n_test)
    return {name: [item for _, item in pairs] for name, pairs in parts.items()}
