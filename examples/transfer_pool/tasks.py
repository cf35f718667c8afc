"""Tasks of the transfer pool: four clusters whose tasks share function and answer shape.

Within a cluster the tasks compute the same thing (a date in ISO form, a
sentiment label, an e-mail address, a number in digits) from differently shaped
inputs, phrased differently. An adapter trained on one task of a cluster should
therefore help its siblings, which is what the paper's within-cluster protocol
measures; the demo pool (``examples/demo_pool``) lacks that property.

Each task has training templates and separate ``test_templates``: the test set
is phrased in wording no adapter saw. The prompt format, scoring and split
logic are the demo pool's (``examples.demo_pool.tasks``).
"""

from __future__ import annotations

import random

from examples.demo_pool.tasks import MONTHS, Task, TaskSet, format_prompt, number_to_words, task_seed  # noqa: F401

# --------------------------------------------------------------------------- dates -> ISO


def _date(rng: random.Random) -> tuple[int, int, int]:
    import datetime as dt

    d = dt.date(1900, 1, 1) + dt.timedelta(days=rng.randrange(200 * 365))
    return (d.year, d.month, d.day)


def _iso(k: tuple[int, int, int]) -> str:
    return f"{k[0]:04d}-{k[1]:02d}-{k[2]:02d}"


def _nth(n: int) -> str:
    if n % 100 in (11, 12, 13):
        return f"{n}th"
    return f"{n}" + {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


_ISO_TRAIN = (
    "Convert {x} to YYYY-MM-DD.", "Write {x} in ISO format.", "What is {x} as an ISO 8601 date?",
    "Date: {x}\nGive it as year-month-day in digits.", "Reformat the date {x} as YYYY-MM-DD.",
    "Please express {x} in the form YYYY-MM-DD.", "{x}\nRewrite this date in ISO 8601.",
)
_ISO_TEST = (
    "I need {x} written the ISO way (four-digit year, then month, then day).",
    "Turn this date into ISO 8601 notation: {x}",
)

# --------------------------------------------------------------------------- sentiment

_MOVIE = (
    ("the plot was gripping", "the acting was superb", "the soundtrack was beautiful", "I laughed the whole time",
     "the ending moved me", "the director did a brilliant job", "every scene looked stunning",
     "the cast had wonderful chemistry", "it kept me on the edge of my seat", "I would watch it again"),
    ("the plot made no sense", "the acting was wooden", "the soundtrack was grating", "I almost fell asleep",
     "the ending was a letdown", "the director wasted a good idea", "the effects looked cheap",
     "the dialogue was painful", "it dragged on for far too long", "I walked out halfway through"),
)
_PRODUCT = (
    ("the battery lasts for days", "it arrived quickly and well packed", "the build quality is excellent",
     "setup took two minutes", "it works exactly as described", "the screen is bright and sharp",
     "it was worth every penny", "customer support was very helpful", "it feels solid and sturdy",
     "I use it every day"),
    ("the battery died after a week", "it arrived damaged", "the build quality is flimsy",
     "setup was a nightmare", "it does not work as described", "the screen flickers constantly",
     "it was a waste of money", "customer support never answered", "it broke after two uses",
     "I returned it immediately"),
)
_RESTAURANT = (
    ("the pasta was delicious", "the waiter was friendly and attentive", "the portions were generous",
     "the dessert was heavenly", "the prices were fair", "the room was cozy and quiet",
     "our food came out fast", "the chef clearly cares", "the wine list was excellent", "we will be back soon"),
    ("the pasta was cold and bland", "the waiter was rude", "the portions were tiny",
     "the dessert tasted stale", "the prices were outrageous", "the room was loud and dirty",
     "we waited an hour for our food", "the fish smelled off", "the bill had extra charges",
     "we will never go back"),
)


def _review(parts: tuple[tuple[str, ...], tuple[str, ...]]):
    def draw(rng: random.Random):
        label = rng.randrange(2)
        return (label, *rng.sample(range(len(parts[label])), 3))

    def render(k):
        label, *idx = k
        clauses = [parts[label][i] for i in idx]
        text = f"{clauses[0].capitalize()}, {clauses[1]} and {clauses[2]}."
        return text, ("positive", "negative")[label]

    return draw, render


_SENT_TEST = (
    "Would you say the person who wrote this was happy or unhappy? Reply positive or negative.\n{x}",
    "Here is what a customer said: \"{x}\" Label the feeling as positive or negative.",
)

# --------------------------------------------------------------------------- e-mail extraction

_FIRST = ("maria", "john", "aisha", "chen", "lucas", "emma", "omar", "sofia", "david", "yuki", "peter", "nina",
          "carlos", "fatima", "liam", "olga", "raj", "grace", "tom", "ana", "ivan", "leila", "mark", "zoe")
_LAST = ("lopez", "smith", "khan", "wang", "martin", "brown", "haddad", "rossi", "cohen", "tanaka", "novak",
         "berg", "silva", "ali", "murphy", "petrova", "patel", "kim", "clark", "costa", "ivanov", "nasser")
_DOMAINS = ("northwind.com", "acme.org", "bluepeak.io", "riverside.net", "example.com", "mailhub.co",
            "greenleaf.org", "quantix.com", "harbor.edu", "solstice.net")
_TITLES = ("Sales Manager", "Software Engineer", "Head of Marketing", "Research Assistant", "Account Director",
           "Product Designer", "Office Manager", "Data Analyst")
_CITIES = ("Denver", "Lyon", "Osaka", "Porto", "Nairobi", "Toronto", "Krakow", "Austin", "Dublin", "Seoul")


def _person(rng: random.Random):
    return (rng.randrange(len(_FIRST)), rng.randrange(len(_LAST)), rng.randrange(len(_DOMAINS)),
            rng.randrange(3), rng.randrange(len(_TITLES)), rng.randrange(len(_CITIES)))


def _email(k) -> str:
    f, l_, d, style = _FIRST[k[0]], _LAST[k[1]], _DOMAINS[k[2]], k[3]
    local = (f"{f}.{l_}", f"{f[0]}{l_}", f"{f}_{l_}{k[5]}")[style]
    return f"{local}@{d}"


def _name(k) -> str:
    return f"{_FIRST[k[0]].capitalize()} {_LAST[k[1]].capitalize()}"


def _render_sentence(k):
    n, e, c = _name(k), _email(k), _CITIES[k[5]]
    forms = (f"If you have questions about the {c} office, write to {n} at {e} before Friday.",
             f"{n} said the fastest way to reach her team in {c} is {e}.",
             f"Send the signed contract to {e}; {n} will forward it to the {c} branch.")
    return forms[k[4] % 3], e


def _render_signature(k):
    n, e = _name(k), _email(k)
    return f"Best regards,\n{n}\n{_TITLES[k[4]]}, {_CITIES[k[5]]}\n{e}\n+1 555 01{k[0]:02d}", e


def _render_record(k):
    n, e = _name(k), _email(k)
    return f"name={n}; city={_CITIES[k[5]]}; phone=555-01{k[1]:02d}; email={e}; role={_TITLES[k[4]]}", e


_EMAIL_TEST = (
    "Pull out just the e-mail address from the following and reply with nothing else.\n{x}",
    "Which address should I email? Text:\n{x}",
)

# --------------------------------------------------------------------------- number words -> digits

_ANIMALS = ("sheep", "cows", "chickens", "goats", "ducks", "rabbits", "horses", "pigs")
_ITEMS = ("bike", "sofa", "laptop", "camera", "guitar", "watch", "tent", "printer")


def _render_quantity(k):
    animal = _ANIMALS[k % len(_ANIMALS)]
    return f"A farmer owns {number_to_words(k)} {animal}.", str(k)


def _render_price(k):
    item = _ITEMS[k % len(_ITEMS)]
    return f"The {item} costs {number_to_words(k)} dollars.", str(k)


_DIGITS_TEST = (
    "Using numerals only (no words), what number is given here? {x}",
    "Rewrite the amount in the text below as a plain number.\n{x}",
)

# --------------------------------------------------------------------------- the pool

TASKS: tuple[Task, ...] = (
    Task("us_long_to_iso", "iso_dates", "'Month D, YYYY' -> YYYY-MM-DD", _ISO_TRAIN, _date,
         lambda k: (f"{MONTHS[k[1] - 1]} {k[2]}, {k[0]}", _iso(k)), _ISO_TEST),
    Task("eu_long_to_iso", "iso_dates", "'D Month YYYY' -> YYYY-MM-DD", _ISO_TRAIN, _date,
         lambda k: (f"{k[2]} {MONTHS[k[1] - 1]} {k[0]}", _iso(k)), _ISO_TEST),
    Task("ordinal_to_iso", "iso_dates", "'the Dth of Month, YYYY' -> YYYY-MM-DD", _ISO_TRAIN, _date,
         lambda k: (f"the {_nth(k[2])} of {MONTHS[k[1] - 1]}, {k[0]}", _iso(k)), _ISO_TEST),
    Task("movie_sentiment", "sentiment", "a movie review -> positive / negative",
         ("Movie review: {x}\nIs this review positive or negative?", "What is the sentiment of this film review? {x}",
          "Classify the sentiment of the review as positive or negative: {x}",
          "{x}\nDid the reviewer like the movie? Answer positive or negative.",
          "Review of a film: \"{x}\" Sentiment (positive/negative):"),
         *_review(_MOVIE), _SENT_TEST),
    Task("product_sentiment", "sentiment", "a product review -> positive / negative",
         ("Product review: {x}\nIs this review positive or negative?",
          "A buyer wrote: \"{x}\" Is the sentiment positive or negative?",
          "Classify this customer review as positive or negative: {x}",
          "{x}\nWas the customer satisfied? Answer positive or negative.",
          "Online shop review: {x}\nSentiment:"),
         *_review(_PRODUCT), _SENT_TEST),
    Task("restaurant_sentiment", "sentiment", "a restaurant review -> positive / negative",
         ("Restaurant review: {x}\nIs this review positive or negative?",
          "A diner wrote: \"{x}\" What is the sentiment, positive or negative?",
          "Classify the sentiment of this dining review: {x}",
          "{x}\nDid the guest enjoy the meal? Answer positive or negative.",
          "Review of a restaurant: \"{x}\" Sentiment (positive/negative):"),
         *_review(_RESTAURANT), _SENT_TEST),
    Task("email_in_sentence", "emails", "a sentence -> the e-mail address in it",
         ("Extract the email address from this sentence: {x}", "What email address is mentioned here? {x}",
          "Text: {x}\nWhich e-mail address appears in the text?", "Find the email in: {x}",
          "{x}\nGive the email address only."),
         _person, _render_sentence, _EMAIL_TEST),
    Task("email_in_signature", "emails", "an e-mail signature -> the address in it",
         ("Extract the email address from this signature:\n{x}", "What is the sender's email address?\n{x}",
          "Signature:\n{x}\nWhich e-mail address is listed?", "Find the email in this signature block:\n{x}",
          "{x}\nGive the email address only."),
         _person, _render_signature, _EMAIL_TEST),
    Task("email_in_record", "emails", "a key=value record -> the e-mail address in it",
         ("Extract the email address from this record: {x}", "What email address does this entry contain? {x}",
          "Record: {x}\nWhich e-mail address is stored?", "Find the email field in: {x}",
          "{x}\nGive the email address only."),
         _person, _render_record, _EMAIL_TEST),
    Task("words_to_digits", "digits", "English number words -> digits",
         ("Write \"{x}\" as a number using digits.", "Convert {x} to digits.",
          "What number is \"{x}\"? Answer with digits.", "Number in words: {x}\nWrite it in digits.",
          "Give the digits for {x}."),
         lambda r: r.randint(0, 999), lambda k: (number_to_words(k), str(k)), _DIGITS_TEST),
    Task("quantity_to_digits", "digits", "a count written in words -> digits",
         ("{x} How many animals is that? Answer with digits.", "Sentence: {x}\nWrite the count as a number.",
          "How many animals are mentioned, in digits? {x}", "{x}\nGive the number of animals using digits.",
          "Read this and answer with a number: {x} How many?"),
         lambda r: r.randint(2, 999), _render_quantity, _DIGITS_TEST),
    Task("price_to_digits", "digits", "a price written in words -> digits",
         ("{x} What is the price in digits?", "Sentence: {x}\nWrite the price as a number.",
          "How many dollars, in digits? {x}", "{x}\nGive the price using digits only.",
          "Read this and answer with a number: {x} How much?"),
         lambda r: r.randint(2, 999), _render_price, _DIGITS_TEST),
)

TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
TRANSFER_TASKS = TaskSet("transfer-pool", TASKS, TASK_NAMES)
get_task = TRANSFER_TASKS.get
pool_tasks = TRANSFER_TASKS.pool_tasks
