"""Generate qscore's own sample query log, `qscore/data/sample_queries.jsonl`.

Deterministic: the same seed always writes byte-identical output, so the shipped file can be
regenerated and diffed. Every query template and passage below is hand-written for this project.

    python scripts/make_sample_log.py            # writes qscore/data/sample_queries.jsonl
    python scripts/make_sample_log.py --out x.jsonl --lines 200 --seed 7
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import orjson

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "qscore" / "data" / "sample_queries.jsonl"

# Each topic: slot vocabularies, query templates, passages that answer such a query (filled with
# the same slots, so they really are relevant), and background sentences used for unrelated
# passages elsewhere and for padding long documents.
TOPICS: dict[str, dict[str, object]] = {
    "cooking": {
        "slots": {
            "dish": ["banana bread", "chicken curry", "lasagna", "sourdough bread", "pad thai",
                     "beef stew", "risotto", "pancakes", "guacamole", "french onion soup",
                     "tiramisu", "fried rice", "chili con carne", "shakshuka", "ramen broth",
                     "crème brûlée", "pizza dough", "hummus", "apple pie", "paella"],
            "ing": ["eggs", "butter", "buttermilk", "baking soda", "heavy cream", "brown sugar",
                    "fresh basil", "garlic", "yeast", "coconut milk", "sour cream", "cornstarch"],
            "tool": ["cast iron skillet", "dutch oven", "air fryer", "instant pot", "slow cooker",
                     "stand mixer", "wok", "sheet pan"],
        },
        "queries": ["how to make {dish}", "easy {dish} recipe", "{dish} recipe without {ing}",
                    "substitute for {ing} in {dish}", "how long to cook {dish} in {tool}",
                    "best {dish} recipe", "can you freeze {dish}", "{dish} calories per serving",
                    "what goes well with {dish}", "why is my {dish} dry",
                    "{tool} {dish}", "how to store leftover {dish}"],
        "docs": ["To make {dish}, prepare your ingredients first and preheat the oven or pan. "
                 "Most home cooks find that a {tool} gives the most even results.",
                 "If you are out of {ing}, {dish} still works: swap in an equal amount of a "
                 "similar ingredient and adjust the seasoning at the end.",
                 "Leftover {dish} keeps for three to four days in an airtight container in the "
                 "fridge, and most versions freeze well for up to three months.",
                 "A dry {dish} usually means it was cooked too long or at too high a heat. "
                 "Check it ten minutes early next time.",
                 "This {dish} recipe takes about 45 minutes and serves four. The secret is to "
                 "add the {ing} slowly and taste as you go.",
                 "In a {tool}, {dish} cooks faster than on the stovetop; start checking after "
                 "two thirds of the usual time."],
        "background": ["Season with salt at every stage rather than all at the end.",
                       "Resting dough in the fridge overnight develops more flavour.",
                       "A sharp knife is safer than a dull one because it slips less.",
                       "Toasting spices in a dry pan releases their aromatic oils."],
    },
    "health": {
        "slots": {
            "cond": ["a migraine", "high blood pressure", "insomnia", "a sore throat",
                     "lower back pain", "type 2 diabetes", "seasonal allergies", "anemia",
                     "acid reflux", "a sprained ankle", "dehydration", "vitamin D deficiency",
                     "plantar fasciitis", "the flu"],
            "thing": ["ibuprofen", "magnesium", "melatonin", "green tea", "intermittent fasting",
                      "yoga", "cold showers", "vitamin C", "walking 10000 steps", "creatine"],
        },
        "queries": ["symptoms of {cond}", "how to treat {cond} at home", "is {thing} good for "
                    "{cond}", "{thing} side effects", "how much {thing} per day",
                    "when to see a doctor for {cond}", "what causes {cond}",
                    "can {thing} help with {cond}", "{cond} vs something more serious",
                    "natural remedies for {cond}", "benefits of {thing}"],
        "docs": ["Common signs of {cond} include fatigue and discomfort that gets worse over a "
                 "few days. See a doctor if symptoms last longer than a week.",
                 "Some small studies suggest {thing} may ease {cond}, but the evidence is "
                 "limited and it should not replace treatment from a clinician.",
                 "Most adults tolerate {thing} well. Reported side effects are mild, such as "
                 "stomach upset or headache, and usually fade within days.",
                 "{cond} is often caused by a mix of genetics, diet and lifestyle. Regular "
                 "sleep, exercise and hydration lower the risk.",
                 "Seek urgent care for {cond} if you have chest pain, trouble breathing, "
                 "confusion, or a high fever that does not come down."],
        "background": ["Adults need roughly seven to nine hours of sleep a night.",
                       "Washing hands for twenty seconds removes most common germs.",
                       "Blood pressure readings are given as systolic over diastolic.",
                       "Stretching after exercise can reduce next-day stiffness."],
    },
    "travel": {
        "slots": {
            "place": ["Lisbon", "Kyoto", "Iceland", "Patagonia", "New Orleans", "Marrakech",
                      "the Amalfi Coast", "Banff", "São Paulo", "Prague", "Bali", "Cape Town",
                      "Vancouver", "Hanoi", "Edinburgh", "Zürich", "Yosemite", "Seoul"],
            "month": ["January", "March", "May", "July", "September", "October", "December"],
            "what": ["a visa", "travel insurance", "a rental car", "a rail pass", "cash",
                     "a power adapter", "vaccinations"],
        },
        "queries": ["best time to visit {place}", "things to do in {place}",
                    "{place} in {month} weather", "do I need {what} for {place}",
                    "cheap flights to {place}", "{place} 3 day itinerary",
                    "is {place} safe for tourists", "where to stay in {place}",
                    "{place} travel tips", "how to get around {place} without a car",
                    "{place} vs {place2} for a first trip"],
        "docs": ["The best time to visit {place} is in spring or early autumn, when the crowds "
                 "are thinner and the weather is mild. {month} can be busy.",
                 "Top things to do in {place}: walk the old town, try the local food market, "
                 "and take a day trip to the nearby coast or mountains.",
                 "Most visitors to {place} should check whether they need {what} before "
                 "departure; rules differ by nationality and change often.",
                 "Public transport in {place} is cheap and frequent, so a car is rarely "
                 "needed unless you plan to explore the countryside.",
                 "In {month}, {place} averages mild daytime temperatures with occasional rain. "
                 "Pack layers and a light waterproof jacket."],
        "background": ["Airlines often release cheaper fares on weekday mornings.",
                       "A passport should be valid for six months beyond your trip.",
                       "Carry-on liquids are usually limited to 100 ml per container.",
                       "Jet lag is worse when flying east than when flying west."],
    },
    "programming": {
        "slots": {
            "lang": ["python", "javascript", "rust", "go", "java", "c++", "typescript", "bash",
                     "sql", "kotlin"],
            "task": ["reverse a string", "read a file line by line", "sort a dictionary by value",
                     "parse json", "make an http request", "remove duplicates from a list",
                     "convert string to int", "handle exceptions", "write unit tests",
                     "format a date", "run tasks in parallel", "split a string by comma"],
            "err": ["null pointer exception", "segmentation fault", "indentation error",
                    "borrow checker error", "undefined is not a function", "connection refused",
                    "permission denied", "out of memory", "deadlock"],
        },
        "queries": ["how to {task} in {lang}", "{lang} {task}", "{lang} {err}",
                    "fix {err} in {lang}", "{lang} vs {lang2} performance",
                    "best way to {task} {lang}", "{lang} tutorial for beginners",
                    "why do I get {err}", "{lang} {task} example"],
        "docs": ["In {lang}, the idiomatic way to {task} is to use the standard library rather "
                 "than writing a loop by hand; it is shorter and usually faster.",
                 "A {err} in {lang} usually means the program touched something it should not. "
                 "Read the stack trace from the bottom up to find the first line of your code.",
                 "Here is a short {lang} example that shows how to {task}, with error handling "
                 "for empty input and a test you can run.",
                 "To {task}, first check the input type, then call the built-in helper. In "
                 "{lang} this takes two or three lines."],
        "background": ["Version control lets a team review every change before it ships.",
                       "A linter catches many bugs before the code ever runs.",
                       "Premature optimisation makes code harder to read without real gains.",
                       "Unit tests should be fast enough to run on every save."],
    },
    "finance": {
        "slots": {
            "acct": ["a Roth IRA", "a 401k", "a high yield savings account", "an index fund",
                     "a certificate of deposit", "a brokerage account", "an HSA",
                     "treasury bonds"],
            "topic": ["compound interest", "capital gains tax", "mortgage refinancing",
                      "dollar cost averaging", "inflation", "student loan repayment",
                      "a stock split", "an annuity"],
            "goal": ["a credit score", "an emergency fund", "a monthly budget",
                     "a retirement nest egg", "a down payment fund"],
        },
        "queries": ["what is {acct}", "how does {topic} work", "{acct} contribution limit",
                    "is {acct} worth it", "how to improve {goal}", "{acct} vs {acct2}",
                    "how to calculate {topic}", "{topic} explained simply",
                    "best age to open {acct}", "how to build {goal}",
                    "fastest way to raise {goal}"],
        "docs": ["{acct} is a way to save or invest with specific tax rules. Contribution "
                 "limits are set each year, and withdrawals may have conditions.",
                 "{topic} is easiest to understand with an example: small, regular amounts "
                 "add up over years because returns are earned on earlier returns.",
                 "Before opening {acct}, compare fees, minimum balances and how easily you "
                 "can move the money. Low costs matter most over long periods.",
                 "To work on {goal}, track every expense for a month, then set a realistic "
                 "target and automate transfers on payday.",
                 "Building {goal} takes time: pay bills on time, keep balances low and move a "
                 "fixed amount into savings every month."],
        "background": ["Diversification spreads risk across many assets.",
                       "Paying a credit card in full each month avoids interest charges.",
                       "Central banks raise interest rates to slow inflation.",
                       "An expense ratio is the yearly fee a fund charges."],
    },
    "sports": {
        "slots": {
            "sport": ["tennis", "basketball", "soccer", "golf", "swimming", "marathon running",
                      "cycling", "rock climbing", "volleyball", "cricket", "baseball", "skiing"],
            "skill": ["serve", "free throw", "backhand", "breathing technique", "endurance",
                      "footwork", "grip strength", "pacing", "swing"],
        },
        "queries": ["how to improve {skill} in {sport}", "{sport} rules for beginners",
                    "{sport} training plan", "best shoes for {sport}",
                    "{sport} world cup winners", "how many players on a {sport} team",
                    "{sport} drills at home", "{sport} injuries prevention",
                    "how to get better at {sport}"],
        "docs": ["To improve your {skill} in {sport}, practise short sessions often and film "
                 "yourself so you can compare with a coach's form.",
                 "A beginner {sport} plan builds up slowly: three sessions a week, one of them "
                 "easy, with rest days between hard efforts.",
                 "The basic rules of {sport} are simple to learn; most newcomers pick them up "
                 "after watching one full game with a friend who plays.",
                 "Most {sport} injuries come from doing too much too soon. Warm up, increase "
                 "load gradually and work on {skill} with good technique."],
        "background": ["Proper hydration improves performance in long events.",
                       "Rest days are when muscles actually rebuild and get stronger.",
                       "A dynamic warm-up beats static stretching before exercise.",
                       "Team sports improve coordination as well as fitness."],
    },
    "history": {
        "slots": {
            "event": ["the fall of the Roman Empire", "the French Revolution", "the Cold War",
                      "the printing press", "the Silk Road", "the Industrial Revolution",
                      "the moon landing", "the Black Death", "the Renaissance",
                      "the Ottoman Empire", "the Meiji Restoration", "the Byzantine Empire"],
            "person": ["Napoleon", "Cleopatra", "Genghis Khan", "Marie Curie", "Abraham Lincoln",
                       "Leonardo da Vinci", "Queen Victoria", "Mansa Musa", "Ada Lovelace"],
        },
        "queries": ["what caused {event}", "{event} timeline", "when did {event} happen",
                    "who was {person}", "{person} biography", "how did {person} die",
                    "impact of {event}", "{event} summary", "facts about {person}",
                    "why was {event} important"],
        "docs": ["Historians point to several causes of {event}: economic strain, political "
                 "rivalry and new ideas spreading faster than rulers could control.",
                 "{person} is remembered as one of the most influential figures of their era, "
                 "and their life is still studied in schools today.",
                 "The effects of {event} were felt for centuries, reshaping trade, borders and "
                 "the way ordinary people lived and worked.",
                 "A short timeline of {event}: early tensions, a decisive turning point, and a "
                 "long aftermath that historians still debate."],
        "background": ["Primary sources are documents written at the time of an event.",
                       "Archaeology often corrects what written records claim.",
                       "Many ancient cities were built near rivers for water and trade.",
                       "Calendars have been reformed several times over the centuries."],
    },
    "science": {
        "slots": {
            "is_q": ["the sky blue", "ice slippery", "the ocean salty", "the sunset orange",
                     "the moon red during an eclipse", "snow white", "mercury liquid"],
            "does_q": ["bread rise", "leaves change color in autumn", "a rainbow form",
                       "thunder follow lightning", "water expand when it freezes",
                       "a compass point north", "salt melt ice"],
            "concept": ["photosynthesis", "black holes", "quantum entanglement", "DNA "
                        "replication", "plate tectonics", "the greenhouse effect", "entropy",
                        "natural selection", "nuclear fusion", "the speed of light", "CRISPR"],
        },
        "queries": ["why is {is_q}", "why does {does_q}", "how does {does_q}",
                    "what is {concept}", "{concept} explained",
                    "{concept} for kids", "how was {concept} discovered",
                    "{concept} simple definition", "examples of {concept}"],
        "docs": ["{concept} can be explained in one sentence: it is a process or property of "
                 "nature that scientists describe with a small number of measurable rules.",
                 "Scientists first described {concept} through careful experiments, and later "
                 "work confirmed it with better instruments.",
                 "Why is {is_q}? The answer comes down to how light is scattered and absorbed, "
                 "which depends on the size of the particles involved.",
                 "Why does {does_q}? It comes down to how heat, pressure or molecules behave at "
                 "small scales, which a simple kitchen experiment can show.",
                 "For kids, {concept} is like a recipe that nature follows again and again, "
                 "always with the same ingredients and the same result."],
        "background": ["Sound travels faster in water than in air.",
                       "The periodic table orders elements by their number of protons.",
                       "A light year measures distance, not time.",
                       "Bacteria can double in number every twenty minutes."],
    },
    "shopping": {
        "slots": {
            "item": ["wireless earbuds", "a standing desk", "running shoes", "a robot vacuum",
                     "a laptop for students", "an espresso machine", "a winter jacket",
                     "a mechanical keyboard", "a mattress", "a 4k tv", "a baby stroller",
                     "noise cancelling headphones", "a gaming monitor", "hiking boots"],
            "price": ["50", "100", "200", "500", "1000"],
        },
        "queries": ["best {item} under ${price}", "{item} reviews", "{item} black friday deals",
                    "where to buy {item}", "is {item} worth it", "{item} vs {item2}",
                    "how to choose {item}", "{item} return policy", "cheap {item}"],
        "docs": ["When choosing {item}, compare build quality, warranty and real user reviews "
                 "rather than the spec sheet alone.",
                 "Our pick for the best {item} under ${price} balances price and durability; "
                 "it is often discounted during holiday sales.",
                 "Most stores accept returns of {item} within 30 days if it is in its original "
                 "packaging, though some charge a restocking fee.",
                 "Reviewers liked {item} for its value, but a few reported problems after a "
                 "year of daily use, so check the warranty terms."],
        "background": ["Price tracking tools show whether a sale price is really a discount.",
                       "Extended warranties are rarely worth their cost.",
                       "Reading one-star reviews reveals common failure modes.",
                       "Free shipping thresholds encourage larger orders."],
    },
    "home": {
        "slots": {
            "plant": ["tomatoes", "a fiddle leaf fig", "basil", "succulents", "roses",
                      "a snake plant", "blueberries", "lavender", "a monstera"],
            "fix": ["a leaky faucet", "a running toilet", "a squeaky door", "drywall holes",
                    "a clogged drain", "peeling paint", "a tripped breaker", "mold in the "
                    "shower"],
        },
        "queries": ["how often to water {plant}", "how to grow {plant} indoors",
                    "why are my {plant} leaves turning yellow", "how to fix {fix}",
                    "diy {fix}", "cost to repair {fix}", "when to plant {plant}",
                    "{plant} care guide"],
        "docs": ["Water {plant} when the top inch of soil feels dry; overwatering is the most "
                 "common reason indoor plants fail.",
                 "Yellow leaves on {plant} usually point to too much water or poor drainage. "
                 "Let the pot dry out and check that it has a hole at the bottom.",
                 "You can fix {fix} yourself in under an hour with basic tools. Turn off the "
                 "water or power first and take a photo before you take anything apart.",
                 "A professional repair of {fix} typically costs between 100 and 300 dollars "
                 "depending on your area and the parts needed."],
        "background": ["Most houseplants prefer bright, indirect light.",
                       "Compost improves both drainage and water retention in soil.",
                       "A smoke detector battery should be tested monthly.",
                       "Caulk around a bathtub should be replaced every few years."],
    },
    "tech": {
        "slots": {
            "dev": ["iphone", "android phone", "macbook", "windows 11 laptop", "router",
                    "smart tv", "airpods", "printer", "chromebook", "ps5"],
            "prob": ["won't turn on", "battery draining fast", "not connecting to wifi",
                     "running slow", "overheating", "no sound", "stuck on boot screen"],
        },
        "queries": ["{dev} {prob}", "why is my {dev} {prob}", "how to reset {dev}",
                    "{dev} {prob} fix", "how to update {dev}", "how to back up {dev}",
                    "{dev} tips and tricks"],
        "docs": ["If your {dev} is {prob}, restart it first, then install pending updates. "
                 "Many problems disappear after a full power cycle.",
                 "To reset a {dev}, open the settings, find the reset option and back up your "
                 "data first, because a factory reset erases everything.",
                 "A {dev} that is {prob} after an update often has a background process stuck; "
                 "check the battery or activity screen to find it."],
        "background": ["Two-factor authentication protects accounts even if a password leaks.",
                       "Solid state drives have no moving parts and rarely fail from drops.",
                       "A mesh network spreads wifi evenly through a large house.",
                       "Lithium batteries last longer if kept between 20 and 80 percent."],
    },
    "pets": {
        "slots": {
            "pet": ["puppy", "cat", "golden retriever", "rabbit", "hamster", "parrot",
                    "senior dog", "kitten", "bearded dragon", "goldfish"],
            "issue": ["not eating", "vomiting", "scratching a lot", "barking at night",
                      "losing fur", "sleeping all day", "biting"],
        },
        "queries": ["my {pet} is {issue}", "{pet} {issue} what to do", "how to train a {pet}",
                    "what can a {pet} eat", "how often to feed a {pet}", "{pet} lifespan",
                    "best food for {pet}"],
        "docs": ["A {pet} that is {issue} for more than a day or two should see a vet, "
                 "especially if it also seems tired or in pain.",
                 "Training a {pet} works best with short, positive sessions and rewards given "
                 "right after the behaviour you want.",
                 "Feed a {pet} on a regular schedule with food made for its age and size, and "
                 "always keep fresh water available."],
        "background": ["Chocolate and grapes are toxic to dogs.",
                       "Cats sleep between twelve and sixteen hours a day.",
                       "Microchipping makes lost pets much easier to return.",
                       "Dental disease is common in older pets."],
    },
}


def _fill(template: str, slots: dict[str, list[str]], chosen: dict[str, str],
          rng: random.Random, capitalize: bool = True) -> str:
    # `{x2}` slots take a second, different value of slot `x` (for "A vs B" queries).
    for name, values in slots.items():
        if "{" + name + "2}" in template:
            others = [v for v in values if v != chosen[name]]
            template = template.replace("{" + name + "2}", rng.choice(others))
    text = template.format(**chosen)
    return text[0].upper() + text[1:] if capitalize else text


def _background(rng: random.Random, exclude: str) -> list[str]:
    topic = rng.choice([t for t in TOPICS if t != exclude])
    return list(TOPICS[topic]["background"])  # type: ignore[arg-type]


def _unrelated_doc(rng: random.Random, exclude: str) -> str:
    # A passage from another topic: a filled doc template, or one or two background facts.
    topic = rng.choice([t for t in TOPICS if t != exclude])
    spec = TOPICS[topic]
    slots: dict[str, list[str]] = spec["slots"]  # type: ignore[assignment]
    if rng.random() < 0.6:
        chosen = {k: rng.choice(v) for k, v in slots.items()}
        return _fill(rng.choice(spec["docs"]), slots, chosen, rng)  # type: ignore[arg-type]
    return " ".join(rng.sample(spec["background"], rng.randint(1, 2)))  # type: ignore[arg-type]


def _long_doc(rng: random.Random, first: str, topic: str) -> str:
    # ~300+ words so it runs past 256 tokens and the tokenizer has to truncate it.
    own: list[str] = list(TOPICS[topic]["background"])  # type: ignore[arg-type]
    parts = [first]
    while sum(len(p.split()) for p in parts) < 310:
        pool = own if rng.random() < 0.7 else _background(rng, topic)
        parts.append(rng.choice(pool))
    return " ".join(parts)


LONG_QUERY_PREFIXES = [
    "I have been trying to figure this out for a while and nothing I read online makes sense, "
    "so could someone please explain in plain words",
    "my partner and I are arguing about this and we both think we are right, we looked at a "
    "few websites but they disagree with each other, so",
    "for a school project due next week I need a clear and reliable answer with sources if "
    "possible, the question is basically",
]
LONG_QUERY_SUFFIXES = [
    "and also whether the answer changes depending on where you live or what time of year it is",
    "and what the most common mistakes are that beginners make when they try this for the first "
    "time without any help",
]


def _query(rng: random.Random, topic: str) -> tuple[str, dict[str, str]]:
    spec = TOPICS[topic]
    slots: dict[str, list[str]] = spec["slots"]  # type: ignore[assignment]
    chosen = {k: rng.choice(v) for k, v in slots.items()}
    text = _fill(rng.choice(spec["queries"]), slots, chosen, rng, capitalize=False)  # type: ignore[arg-type]
    r = rng.random()
    if r < 0.02:  # a few rambling 30+ word queries
        text = f"{rng.choice(LONG_QUERY_PREFIXES)} {text} {rng.choice(LONG_QUERY_SUFFIXES)}"
    elif r < 0.10:
        text = text + rng.choice(["?", " reddit", " 2024", " near me", " uk", " pdf"])
    elif r < 0.15:
        text = text[0].upper() + text[1:]
    return text, chosen


def make_record(rng: random.Random, index: int) -> dict[str, object]:
    topic = rng.choice(list(TOPICS))
    spec = TOPICS[topic]
    slots: dict[str, list[str]] = spec["slots"]  # type: ignore[assignment]
    query, chosen = _query(rng, topic)
    record: dict[str, object] = {"id": f"s{index:06d}", "query": query}
    if rng.random() < 0.15:  # query-only items
        return record
    n = rng.choices([1, 2, 3, 4, 5], weights=[20, 25, 25, 15, 15])[0]
    n_rel = rng.randint(0, min(n, 2)) if n > 1 else rng.randint(0, 1)
    doc_templates: list[str] = spec["docs"]  # type: ignore[assignment]
    docs = [_fill(t, slots, chosen, rng) for t in rng.sample(doc_templates, n_rel)]
    docs += [_unrelated_doc(rng, topic) for _ in range(n - n_rel)]
    rng.shuffle(docs)
    if rng.random() < 0.02:  # a few long documents, past the 256-token window
        i = rng.randrange(len(docs))
        docs[i] = _long_doc(rng, docs[i], topic)
    record["docs"] = docs
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--lines", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=20240611)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("wb") as f:
        for i in range(1, args.lines + 1):
            f.write(orjson.dumps(make_record(rng, i)) + b"\n")
    print(f"wrote {args.lines} lines to {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
