"""Tasks of the transfer pool: four clusters whose tasks share function and answer shape.

Within a cluster the tasks compute the same thing (a date in ISO form, a
sentiment label, an e-mail address, a number in digits) from differently shaped
inputs, phrased differently. An adapter trained on one task of a cluster should
therefore help its siblings, which is what the paper's within-cluster protocol
measures; the demo pool (``examples/demo_pool``) lacks that property.

Three of the clusters have a **partner cluster** that computes the same function
from another kind of input (dates with month names / dates in digits; reviews /
personal messages; cardinal number words / other number forms). That is where
the paper's cross-cluster protocol (a whole cluster left out) can find transfer:
the left-out cluster's partner is still registered. The e-mail cluster has no
partner, as a control.

Each task has training templates and separate ``test_templates``: the test set
is phrased in wording no adapter saw. The prompt format, scoring and split
logic are the demo pool's (``examples.demo_pool.tasks``).
"""

from __future__ import annotations

import random

from examples.demo_pool.tasks import (  # noqa: F401
    MONTHS,
    Task,
    TaskSet,
    _split,
    format_prompt,
    number_to_words,
    task_seed,
)

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

# --------------------------------------------------------------------------- partner clusters


def _render_us_slash(k):
    return f"{k[1]:02d}/{k[2]:02d}/{k[0]}", _iso(k)


def _render_eu_dot(k):
    return f"{k[2]:02d}.{k[1]:02d}.{k[0]}", _iso(k)


def _render_compact(k):
    return f"{k[0]:04d}{k[1]:02d}{k[2]:02d}", _iso(k)


_POST = (
    ("finally finished my first marathon", "my sister just had a healthy baby girl", "I got the job offer today",
     "the sunset at the beach was amazing", "my team won the final", "I passed my driving test",
     "my garden is full of flowers", "my best friend surprised me with a visit", "I paid off my student loan",
     "the new puppy settled in perfectly"),
    ("my flight got cancelled again", "I lost my wallet on the bus", "the printer jammed before my deadline",
     "it rained all weekend and the roof leaks", "my phone screen cracked", "I missed the last train home",
     "my laptop died with all my notes", "the landlord raised the rent again", "I caught the flu on holiday",
     "someone scratched my new car"),
)
_CHAT = (
    ("the concert last night was incredible", "thanks so much for the lovely dinner",
     "the trip was exactly what I needed", "your cake was the best I have ever had",
     "I had so much fun at the party", "the kids loved the zoo",
     "the new flat is perfect", "the hike was breathtaking", "we should do this again soon",
     "I cannot stop smiling"),
    ("the concert got cancelled at the last minute", "dinner was a total disaster", "the trip was exhausting",
     "the cake fell on the floor", "nobody showed up to the party", "the kids were miserable at the zoo",
     "the new flat has mould everywhere", "the hike was freezing and muddy", "I never want to do that again",
     "I am so fed up"),
)
_FEEDBACK = (
    ("your report was clear and well organised", "the presentation went really well", "the client loved the design",
     "you handled the meeting brilliantly", "the code review was thorough", "the launch was a big success",
     "your notes saved us hours", "the team appreciated your help", "the numbers look great this quarter",
     "you met every deadline"),
    ("your report was full of errors", "the presentation was confusing", "the client rejected the design",
     "the meeting ran badly over time", "the code review missed obvious bugs", "the launch was a mess",
     "your notes were impossible to follow", "the team felt ignored", "the numbers look worrying this quarter",
     "you missed another deadline"),
)


def _message(parts, frame: str):
    """Like ``_review``, but the clauses are framed as a personal message (``frame`` holds ``{t}``)."""
    draw, render = _review(parts)

    def render_message(k):
        text, label = render(k)
        return frame.format(t=text), label

    return draw, render_message


_ORD_ONES = _split("zeroth first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth "
                   "thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth")
_ORD_TENS = _split("_ _ twentieth thirtieth fortieth fiftieth sixtieth seventieth eightieth ninetieth")
_PLACES = ("She finished the race in {w} place.", "Our team came {w} out of one thousand.",
           "He was {w} in line at the bakery.", "The song reached {w} place in the charts.")


def ordinal_words(n: int) -> str:
    """English ordinal words for 1 <= n <= 999, e.g. 83 -> 'eighty-third', 300 -> 'three hundredth'."""
    if n >= 100:
        hundreds, rest = divmod(n, 100)
        head = number_to_words(hundreds) + " hundred"
        return head + "th" if rest == 0 else head + " " + ordinal_words(rest)
    if n < 20:
        return _ORD_ONES[n]
    tens, ones = divmod(n, 10)
    return _ORD_TENS[tens] if ones == 0 else number_to_words(tens * 10) + "-" + _ORD_ONES[ones]


def year_words(y: int) -> str:
    """A year (1000-2099) as it is spoken: 1951 -> 'nineteen fifty-one', 1905 -> 'nineteen oh five',
    2003 -> 'two thousand three', 2012 -> 'twenty twelve'."""
    if 2000 <= y < 2010:
        return number_to_words(y)
    if 2010 <= y < 2100 and y % 100 >= 10:
        return "twenty " + number_to_words(y % 100)
    head, tail = divmod(y, 100)
    if tail == 0:
        return number_to_words(head) + " hundred"
    return number_to_words(head) + " " + (number_to_words(tail) if tail >= 10 else "oh " + number_to_words(tail))


_EVENTS = ("The bridge was built in {w}.", "My grandfather was born in {w}.", "The company was founded in {w}.",
           "The treaty was signed in {w}.")
_CROWDS = ("The stadium holds {w} people.", "About {w} visitors came to the fair.",
           "The library owns {w} books.", "The town has {w} residents.")


def _mixed(k: int) -> str:
    thousands, rest = divmod(k, 1000)
    return f"{thousands} thousand" + (f" {rest}" if rest else "")


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
    Task("us_slash_to_iso", "numeric_dates", "'MM/DD/YYYY' -> YYYY-MM-DD", _ISO_TRAIN, _date, _render_us_slash,
         _ISO_TEST),
    Task("eu_dot_to_iso", "numeric_dates", "'DD.MM.YYYY' -> YYYY-MM-DD", _ISO_TRAIN, _date, _render_eu_dot,
         _ISO_TEST),
    Task("compact_to_iso", "numeric_dates", "'YYYYMMDD' -> YYYY-MM-DD", _ISO_TRAIN, _date, _render_compact,
         _ISO_TEST),
    Task("post_sentiment", "moods", "a social media post -> positive / negative",
         ("Social media post: {x}\nIs the mood positive or negative?", "What is the sentiment of this post? {x}",
          "Classify the feeling of this status update as positive or negative: {x}",
          "{x}\nIs the person having a good time? Answer positive or negative.",
          "Post: \"{x}\" Mood (positive/negative):"),
         *_message(_POST, "Update: {t}"), _SENT_TEST),
    Task("chat_sentiment", "moods", "a message to a friend -> positive / negative",
         ("Message from a friend: {x}\nIs it positive or negative?", "My friend texted: \"{x}\" Positive or negative?",
          "Classify the tone of this chat message as positive or negative: {x}",
          "{x}\nDid my friend enjoy it? Answer positive or negative.",
          "Chat: \"{x}\" Tone (positive/negative):"),
         *_message(_CHAT, "Hey! {t}"), _SENT_TEST),
    Task("feedback_sentiment", "moods", "a manager's comment -> positive / negative",
         ("Manager's comment: {x}\nIs this feedback positive or negative?",
          "My boss wrote: \"{x}\" Is the feedback positive or negative?",
          "Classify this workplace feedback as positive or negative: {x}",
          "{x}\nIs the manager pleased? Answer positive or negative.",
          "Feedback: \"{x}\" Tone (positive/negative):"),
         *_message(_FEEDBACK, "Quick note on last week: {t}"), _SENT_TEST),
    Task("year_to_digits", "number_forms", "a year in spoken words -> digits",
         ("{x} Which year is that, in digits?", "Sentence: {x}\nWrite the year as a number.",
          "What year is mentioned, in digits? {x}", "{x}\nGive the year using digits only.",
          "Read this and answer with a number: {x} Which year?"),
         lambda r: r.randint(1801, 2099), lambda k: (_EVENTS[k % 4].format(w=year_words(k)), str(k)), _DIGITS_TEST),
    Task("ordinal_to_digits", "number_forms", "an ordinal in words -> digits",
         ("{x} Which position is that, in digits?", "Sentence: {x}\nWrite the position as a number.",
          "What rank is mentioned, in digits? {x}", "{x}\nGive the place using digits only.",
          "Read this and answer with a number: {x} Which place?"),
         lambda r: r.randint(1, 999), lambda k: (_PLACES[k % 4].format(w=ordinal_words(k)), str(k)), _DIGITS_TEST),
    Task("mixed_to_digits", "number_forms", "'4 thousand 250' -> 4250",
         ("{x} How many is that, in digits?", "Sentence: {x}\nWrite the amount as a plain number.",
          "What is the count, in digits only? {x}", "{x}\nGive the number without words.",
          "Read this and answer with a number: {x} How many?"),
         lambda r: r.randint(1001, 99999), lambda k: (_CROWDS[k % 4].format(w=_mixed(k)), str(k)), _DIGITS_TEST),
)

TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
TRANSFER_TASKS = TaskSet("transfer-pool", TASKS, TASK_NAMES)
get_task = TRANSFER_TASKS.get
pool_tasks = TRANSFER_TASKS.pool_tasks
