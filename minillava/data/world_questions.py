"""Text-only questions about the world, each with the rule that checks an answer: what a chat model knows before
it is taught to see, and what `forgetting.py` measures it keeps after.

A rule is a list of accepted phrases: an answer is right when, normalised (`evaluation.normalize`: lower case,
no punctuation or articles, small numbers as digits), it contains one of them as whole words, and contains none
of the `reject` phrases (so "yes and no" is not a yes). `case=True` compares the raw text, case and all (for
instructions about capital letters). The candidates are kept only where the base model answers them right
(`forgetting.select`), so the fixed set measures what training can take away.
"""

from __future__ import annotations

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "England": "London", "the United Kingdom": "London", "Russia": "Moscow", "China": "Beijing",
    "Egypt": "Cairo", "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Hungary": "Budapest", "the Czech Republic": "Prague", "Belgium": "Brussels", "the Netherlands": "Amsterdam",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Peru": "Lima", "Kenya": "Nairobi",
    "South Korea": "Seoul", "Thailand": "Bangkok", "India": "New Delhi", "the United States": "Washington",
    "Australia": "Canberra", "Turkey": "Ankara", "Cuba": "Havana", "Chile": "Santiago",
    "Scotland": "Edinburgh", "Wales": "Cardiff", "Iceland": "Reykjavik", "Switzerland": "Bern",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Ukraine": "Kyiv",
    "Iran": "Tehran", "Iraq": "Baghdad", "Israel": "Jerusalem", "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "the Philippines": "Manila",
    "Malaysia": "Kuala Lumpur", "Singapore": "Singapore", "New Zealand": "Wellington", "Colombia": "Bogota",
    "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo", "Nigeria": "Abuja", "Ghana": "Accra",
    "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "South Africa": "Pretoria", "Taiwan": "Taipei",
    "Lebanon": "Beirut", "Syria": "Damascus", "Afghanistan": "Kabul", "Nepal": "Kathmandu", "Jamaica": "Kingston",
}

FACTS = [  # (question, accepted phrases, rejected phrases)
    ("What colour is the sky on a clear day?", ["blue"], []),
    ("What colour is grass?", ["green"], []),
    ("What colour are ripe bananas?", ["yellow"], []),
    ("What colour is snow?", ["white"], []),
    ("What colour is coal?", ["black"], []),
    ("What colour do you get by mixing blue and yellow?", ["green"], []),
    ("What colour do you get by mixing red and white?", ["pink"], []),
    ("How many legs does a spider have?", ["8", "eight"], []),
    ("How many legs does a dog have?", ["4"], []),
    ("How many legs does a bird have?", ["2"], []),
    ("How many days are there in a week?", ["7"], []),
    ("How many months are there in a year?", ["12", "twelve"], []),
    ("How many hours are there in a day?", ["24"], []),
    ("How many minutes are there in an hour?", ["60"], []),
    ("How many seconds are there in a minute?", ["60"], []),
    ("How many sides does a triangle have?", ["3"], []),
    ("How many sides does a square have?", ["4"], []),
    ("How many sides does a hexagon have?", ["6"], []),
    ("How many continents are there?", ["7"], []),
    ("How many planets are in our solar system?", ["8"], []),
    ("What is the largest planet in our solar system?", ["jupiter"], []),
    ("Which planet is known as the Red Planet?", ["mars"], []),
    ("What is the closest star to Earth?", ["sun"], []),
    ("What does the Moon orbit?", ["earth"], []),
    ("What is the chemical symbol for water?", ["h2o"], []),
    ("What is the chemical symbol for gold?", ["au"], []),
    ("What gas do plants take in from the air?", ["carbon dioxide", "co2"], []),
    ("What gas do humans need to breathe to live?", ["oxygen"], []),
    ("At what temperature in Celsius does water freeze?", ["0", "zero"], []),
    ("At what temperature in Celsius does water boil?", ["100"], []),
    ("What is frozen water called?", ["ice"], []),
    ("What is the largest ocean on Earth?", ["pacific"], []),
    ("What is the longest river in Africa?", ["nile"], []),
    ("What is the tallest mountain in the world?", ["everest"], []),
    ("What is the largest desert in Africa?", ["sahara"], []),
    ("What is the largest mammal?", ["blue whale"], []),
    ("What animal is known as the king of the jungle?", ["lion"], []),
    ("What animal says 'moo'?", ["cow"], []),
    ("What animal says 'meow'?", ["cat"], []),
    ("What do bees make?", ["honey"], []),
    ("What do caterpillars turn into?", ["butterfly", "butterflies", "moth"], []),
    ("What is a baby dog called?", ["puppy"], []),
    ("What is a baby cat called?", ["kitten"], []),
    ("What is the opposite of hot?", ["cold"], []),
    ("What is the opposite of up?", ["down"], []),
    ("What is the opposite of big?", ["small", "little"], []),
    ("What is the opposite of day?", ["night"], []),
    ("What is the opposite of fast?", ["slow"], []),
    ("What is the opposite of happy?", ["sad", "unhappy"], []),
    ("What is the opposite of light?", ["dark", "heavy"], []),
    ("What is the opposite of open?", ["closed", "close", "shut"], []),
    ("What is the opposite of old?", ["young", "new"], []),
    ("What is the opposite of left?", ["right"], []),
    ("What is the opposite of wet?", ["dry"], []),
    ("What is the opposite of rich?", ["poor"], []),
    ("What is the opposite of early?", ["late"], []),
    ("What is the opposite of full?", ["empty"], []),
    ("What is the plural of foot?", ["feet"], []),
    ("What is the plural of tooth?", ["teeth"], []),
    ("What is the plural of man?", ["men"], []),
    ("What is the plural of woman?", ["women"], []),
    ("What is the plural of goose?", ["geese"], []),
    ("What is the chemical symbol for iron?", ["fe"], []),
    ("What is the chemical symbol for sodium?", ["na"], []),
    ("What is the chemical symbol for oxygen?", ["o"], []),
    ("What is the chemical symbol for carbon?", ["c"], []),
    ("What is the chemical symbol for silver?", ["ag"], []),
    ("What is the chemical formula of table salt?", ["nacl"], []),
    ("What is the largest country in the world by area?", ["russia"], []),
    ("What is the largest continent?", ["asia"], []),
    ("What is the smallest planet in our solar system?", ["mercury"], []),
    ("What is the hottest planet in our solar system?", ["venus"], []),
    ("Which planet do we live on?", ["earth"], []),
    ("Who wrote 'Hamlet'?", ["shakespeare"], []),
    ("Who discovered penicillin?", ["fleming"], []),
    ("Who proposed the theory of evolution by natural selection?", ["darwin"], []),
    ("Who invented the telephone?", ["bell"], []),
    ("What is the plural of mouse?", ["mice"], []),
    ("What is the plural of child?", ["children"], []),
    ("Who wrote 'Romeo and Juliet'?", ["shakespeare"], []),
    ("Who painted the Mona Lisa?", ["leonardo", "da vinci"], []),
    ("Who developed the theory of relativity?", ["einstein"], []),
    ("Who was the first president of the United States?", ["washington"], []),
    ("In which country are the pyramids of Giza?", ["egypt"], []),
    ("In which city is the Eiffel Tower?", ["paris"], []),
    ("What language is mainly spoken in Brazil?", ["portuguese"], []),
    ("What language is mainly spoken in Mexico?", ["spanish"], []),
    ("What currency is used in Japan?", ["yen"], []),
    ("What is the main ingredient of guacamole?", ["avocado"], []),
    ("What organ pumps blood through the body?", ["heart"], []),
    ("What organ do humans think with?", ["brain"], []),
    ("How many teeth does an adult human usually have?", ["32"], []),
    ("What is the boiling point of water in Fahrenheit?", ["212"], []),
    ("What is the freezing point of water in Fahrenheit?", ["32"], []),
    ("Which is heavier, a kilogram of iron or a kilogram of feathers?", ["same", "equal", "neither", "both"], []),
    ("Is the Sun a star? Answer yes or no.", ["yes"], ["no"]),
    ("Is a whale a fish? Answer yes or no.", ["no"], ["yes"]),
    ("Is a tomato a fruit? Answer yes or no.", ["yes"], ["no"]),
    ("Can penguins fly? Answer yes or no.", ["no"], ["yes"]),
    ("Is water wet? Answer yes or no.", ["yes"], ["no"]),
    ("Do fish live in water? Answer yes or no.", ["yes"], ["no"]),
    ("Is ice cold? Answer yes or no.", ["yes"], ["no"]),
    ("What is the last letter of the English alphabet?", ["z"], []),
    ("What comes after Monday?", ["tuesday"], []),
    ("What comes before Sunday?", ["saturday"], []),
    ("What month comes after January?", ["february"], []),
    ("What is the first month of the year?", ["january"], []),
    ("What season comes after winter?", ["spring"], []),
    ("What do we call a shape with three sides?", ["triangle"], []),
    ("What shape is a ball?", ["sphere", "round", "circle"], []),
    ("What is the square root of 9?", ["3"], []),
    ("What is the square root of 16?", ["4"], []),
    ("What is 10 squared?", ["100"], []),
]

ARITHMETIC = [(a, op, b) for a, op, b in [
    (2, "+", 2), (3, "+", 4), (5, "+", 5), (7, "+", 8), (10, "+", 10), (12, "+", 15), (20, "+", 30), (9, "+", 6),
    (100, "+", 200), (25, "+", 25), (6, "+", 7), (11, "+", 11), (40, "+", 2), (50, "+", 50), (8, "+", 3),
    (10, "-", 3), (9, "-", 4), (20, "-", 5), (100, "-", 1), (15, "-", 10), (50, "-", 25), (7, "-", 7), (30, "-", 12),
    (2, "*", 3), (3, "*", 3), (4, "*", 5), (6, "*", 7), (10, "*", 10), (5, "*", 5), (2, "*", 8), (9, "*", 9),
    (12, "*", 2), (7, "*", 3), (10, "/", 2), (100, "/", 10), (9, "/", 3), (20, "/", 4), (50, "/", 5), (8, "/", 2),
    (3, "*", 4), (4, "*", 4), (8, "*", 8), (11, "*", 2), (5, "*", 10), (6, "*", 6), (7, "*", 7), (3, "*", 5),
    (12, "/", 3), (30, "/", 6), (81, "/", 9), (16, "/", 4), (1, "+", 1), (30, "+", 40), (15, "+", 5), (60, "-", 20),
]]

INSTRUCTIONS = [  # (instruction, accepted, rejected, case-sensitive[, ignored: the question restated])
    ("Reply with only the word 'yes'.", ["yes"], ["no"], False),
    ("Reply with only the word 'no'.", ["no"], ["yes"], False),
    ("Say 'hello'.", ["hello"], [], False),
    ("Repeat after me: the quick brown fox.", ["quick brown fox"], [], False),
    ("Repeat this word: elephant.", ["elephant"], [], False),
    ("Repeat this sentence: I like green apples.", ["i like green apples"], [], False),
    ("Write the word 'cat' in capital letters.", ["CAT"], [], True),
    ("Write the word 'hello' in capital letters.", ["HELLO"], [], True),
    ("Write the word 'DOG' in lowercase letters.", ["dog"], ["DOG"], True),
    ("Translate 'hello' into French.", ["bonjour", "salut"], [], False),
    ("Translate 'thank you' into Spanish.", ["gracias"], [], False),
    ("Translate 'yes' into German.", ["ja"], [], False),
    ("Translate 'cat' into Spanish.", ["gato"], [], False),
    ("Translate 'water' into French.", ["eau"], [], False),
    ("Name a primary colour.", ["red", "blue", "yellow"], [], False),
    ("Name a fruit that is red.", ["apple", "tomato", "watermelon", "strawberry",
                                   "cherry", "cherries", "strawberries", "raspberry", "raspberries"], [], False),
    ("Name an animal that lives in the sea.", ["fish", "whale", "shark", "dolphin", "octopus", "jellyfish", "seal",
                                               "turtle", "crab", "starfish", "squid"], [], False),
    ("Name a day of the week.", ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"], [],
     False),
    ("Give me a word that rhymes with 'cat'.", ["hat", "bat", "mat", "rat", "sat", "fat", "pat", "flat",
                                                "chat", "vat"], [], False),
    ("Count from 1 to 5.", ["1 2 3 4 5"], [], False),
    ("List the first three letters of the alphabet.", ["a b c"], [], False),
    ("What is the next number: 2, 4, 6, 8, ...?", ["10"], [], False),
    ("What is the next number: 1, 2, 3, 4, ...?", ["5"], [], False),
    ("What is the next number: 5, 10, 15, 20, ...?", ["25"], [], False),
    ("Complete the sentence: The cat sat on the ...", ["mat"], [], False),
    ("Complete the phrase: Once upon a ...", ["time"], [], False),
    ("Spell the word 'cat' letter by letter.", ["c a t"], [], False),
    ("Which word is a colour: table, red, or run?", ["red"], ["table", "run"], False),
    ("Which word is an animal: chair, horse, or blue?", ["horse"], ["chair", "blue"], False),
    ("Which is bigger, 3 or 7?", ["7"], ["3"], False, [r"than 3\b"]),  # (reject the other option; "7 is bigger
    ("Which is smaller, 12 or 5?", ["5"], ["12"], False, [r"than 12\b"]),  # than 3" restates it, ignored)
    ("Which is bigger, an elephant or a mouse?", ["elephant"], ["mouse"], False, [r"than (?:an? )?mouse\b"]),
]

_OPS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b), "*": ("times", lambda a, b: a * b),
        "/": ("divided by", lambda a, b: a // b)}
# The ways an answer restates "a OP b" ("9 divided by 3 is 2", "9 / 3 = 2"): not part of the answer, whose rule
# ignores them (9 / 3 = 3 would otherwise pass on the restated divisor).
_RESTATED = {"+": r"plus|and|\+", "-": r"minus|-|−", "*": r"times|multiplied by|x|×|\*", "/": r"divided by|by|/|÷"}


def _restated(a: int, op: str, b: int) -> list[str]:
    """Patterns of an answer restating "a OP b": "a OP b", "b from a" (subtraction), "of/between a and b"."""
    n = r"(?<![\d.]){}(?![\d.])"
    out = [rf"{n.format(a)}\s*(?:{_RESTATED[op]})\s*{n.format(b)}",
           rf"(?:of|between)\s+{n.format(a)}\s+and\s+{n.format(b)}"]
    return out + ([rf"{n.format(b)}\s+from\s+{n.format(a)}"] if op == "-" else [])


def candidates() -> list[dict]:
    """Every candidate question: {"id", "kind", "question", "accept", "reject", "case"}, and "ignore" (the question
    restated) for arithmetic; `evaluation.rule_holds` reads the rule."""
    out = []
    for country, city in CAPITALS.items():
        out.append(dict(kind="knowledge", question=f"What is the capital of {country}?", accept=[city], reject=[]))
    for question, accept, reject in FACTS:
        out.append(dict(kind="knowledge", question=question, accept=accept, reject=reject))
    for a, op, b in ARITHMETIC:
        word, f = _OPS[op]
        out.append(dict(kind="arithmetic", question=f"What is {a} {word} {b}?", accept=[str(f(a, b))], reject=[],
                        ignore=_restated(a, op, b)))
    for question, accept, reject, case, *ignore in INSTRUCTIONS:
        out.append(dict(kind="instruction", question=question, accept=accept, reject=reject, case=case,
                        **({"ignore": ignore[0]} if ignore else {})))
    return [{"id": f"world-{i:03d}", "case": False, **q} for i, q in enumerate(out)]


# Prompts for text-only conversations to mix into stage 2 (LLaVA-1.5 mixes ShareGPT chats in against forgetting):
# the base model answers them itself, so the mix holds what it already does. No prompt here is a candidate above.
_TOPICS = ["rivers", "volcanoes", "bicycles", "bread", "the ocean", "trees", "music", "libraries", "rain", "bees",
           "mountains", "trains", "gardens", "the moon", "chess", "coffee", "deserts", "elephants", "bridges",
           "painting", "football", "forests", "clouds", "islands", "cheese", "kites", "owls", "castles", "snow",
           "tea", "robots", "maps", "wind", "boats", "soup", "birds", "lighthouses", "apples", "stars", "cities"]
_FORMS = ["Write one sentence about {}.", "Tell me an interesting fact about {}.", "Why do people like {}?",
          "Describe {} in two sentences.", "Give me a short tip about {}.", "What is special about {}?",
          "Write a short poem about {}.", "Explain {} to a child."]


# Short questions and small tasks about other facts than the candidates' (a continent, not a capital; "Calculate
# 14 + 9.", not "What is 14 plus 9?"; a few share a candidate's form, "How many weeks are in a year?"): without
# them every text-only chat above is an essay, and stage 2's only short text-only turns are ShapesWorld's ("Is
# blue a color or a shape?" -> "A color.", and "I don't see an image." for a question about a picture that is not
# there), so a short question about the world gets a one-word or a refusing answer.
_CONTINENTS = ["France", "Japan", "Brazil", "Kenya", "Canada", "Egypt", "India", "Chile", "Norway", "Vietnam",
               "Mexico", "Ghana", "Peru", "Italy", "Nepal", "Australia", "Morocco", "Argentina", "Poland", "Iran",
               "Cuba", "Sweden", "Nigeria", "Thailand", "Colombia", "Greece", "Mongolia", "Bolivia", "Tanzania",
               "Portugal"]
_SUMS = [(14, "+", 9), (23, "+", 18), (31, "+", 12), (45, "+", 27), (16, "+", 16), (70, "+", 35), (13, "+", 6),
         (19, "+", 21), (38, "-", 14), (64, "-", 32), (90, "-", 45), (27, "-", 9), (41, "-", 17), (75, "-", 50),
         (13, "x", 3), (8, "x", 6), (9, "x", 4), (15, "x", 2), (7, "x", 8), (6, "x", 9), (12, "x", 12), (25, "x", 4),
         (72, "÷", 8), (45, "÷", 9), (60, "÷", 12), (36, "÷", 6), (90, "÷", 10), (14, "÷", 7)]
_YOUNG = ["sheep", "cow", "horse", "goat", "duck", "frog", "kangaroo", "bear", "swan", "pig", "deer", "hen"]
_SOUNDS = ["dog", "duck", "sheep", "lion", "owl", "horse", "pig", "snake", "frog", "bee"]
_WORDS = ["happy", "quick", "large", "begin", "smart", "quiet", "angry", "brave", "tiny", "difficult"]
_VERBS = ["run", "eat", "swim", "write", "go", "see", "buy", "think", "sing", "take", "fly", "drink"]
_NUMBERS = [7, 13, 21, 46, 58, 99, 101, 250, 1000, 3500]
_THINGS = ["rose", "tiger", "hammer", "oak", "salmon", "cactus", "spoon", "eagle", "tulip", "chair", "whale",
           "fern"]
_SHORT = ([f"On which continent is {c}?" for c in _CONTINENTS]
          + [f"Calculate {a} {op} {b}." for a, op, b in _SUMS]
          + [f"What do you call a young {a}?" for a in _YOUNG]
          + [f"What sound does a {a} make?" for a in _SOUNDS]
          + [f"Give a synonym for '{w}'." for w in _WORDS]
          + [f"What is the past tense of '{v}'?" for v in _VERBS]
          + [f"Write the number {n} in words." for n in _NUMBERS]
          + [f"Spell '{w}' backwards." for w in _WORDS[:6]]
          + [f"Is {'an' if t[0] in 'aeiou' else 'a'} {t} an animal, a plant or an object?" for t in _THINGS]
          + ["How many centimetres are in a metre?", "How many grams are in a kilogram?",
             "How many years are in a century?", "How many weeks are in a year?", "How many days are in a leap year?",
             "How many players are on a football team?", "How many strings does a standard guitar have?",
             "How many wheels does a tricycle have?"]
          + ["Hi!", "Hello, who are you?", "What can you help me with?", "Thank you!", "Good morning!",
             "Can you keep an answer short?"])


N_OPEN = len(_FORMS) * len(_TOPICS)  # chat_prompts() begins with the open prompts, then `_SHORT`


def chat_prompts() -> list[str]:
    """Prompts for text-only chats: open-ended ones (topics x forms, 320), then short questions and tasks
    (`_SHORT`, 144); none of them a candidate question."""
    asked = {q["question"] for q in candidates()}
    prompts = [form.format(topic) for form in _FORMS for topic in _TOPICS] + _SHORT
    assert not asked & set(prompts) and len(set(prompts)) == len(prompts)
    return prompts
