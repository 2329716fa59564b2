"""A small probabilistic grammar of child-directed English, deterministic from a seed.

The default corpus of the repository: it needs no download, and it has structure that a
unigram model cannot see but a contextual model can learn:

- subject-verb agreement ("the dog runs" / "the dogs run", "is" / "are", "does" / "do"),
- article choice ("a ball", "an apple"),
- question word order and the matching final punctuation ("?" after questions, "!" after
  exclamations, "." after statements),
- a topic per document: the document's first noun comes back in later sentences ("it",
  "the ball"), so there is structure across sentences as well as within them.

One document is one line of 1 to 4 sentences, like one utterance group of a CHILDES
transcript.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ["Mommy", "Daddy", "Anna", "Ben", "Lily", "Max", "Grandma", "Sam", "Mia", "Leo"]

# (singular, plural, animate)
NOUNS = [
    ("ball", "balls", False), ("cup", "cups", False), ("truck", "trucks", False),
    ("book", "books", False), ("apple", "apples", False), ("block", "blocks", False),
    ("shoe", "shoes", False), ("spoon", "spoons", False), ("box", "boxes", False),
    ("egg", "eggs", False), ("orange", "oranges", False), ("hat", "hats", False),
    ("dog", "dogs", True), ("cat", "cats", True), ("bird", "birds", True),
    ("duck", "ducks", True), ("baby", "babies", True), ("bunny", "bunnies", True),
    ("puppy", "puppies", True), ("fish", "fish", True),
]
ADJECTIVES = ["red", "big", "little", "blue", "soft", "yellow", "new", "old", "green", "round"]
ANIMATE_ADJECTIVES = ["happy", "sleepy", "hungry", "little", "big", "funny"]

# (base, third person singular, progressive)
INTRANSITIVE = [
    ("run", "runs", "running"), ("jump", "jumps", "jumping"), ("sleep", "sleeps", "sleeping"),
    ("sing", "sings", "singing"), ("play", "plays", "playing"), ("cry", "cries", "crying"),
    ("swim", "swims", "swimming"), ("eat", "eats", "eating"),
]
TRANSITIVE = [
    ("want", "wants", "wanting"), ("see", "sees", "seeing"), ("like", "likes", "liking"),
    ("have", "has", "having"), ("throw", "throws", "throwing"), ("find", "finds", "finding"),
    ("hold", "holds", "holding"), ("push", "pushes", "pushing"), ("need", "needs", "needing"),
]
PLACES = ["in the box", "on the table", "under the bed", "in the bath", "on the floor", "outside"]


@dataclass(frozen=True)
class NounPhrase:
    text: str
    plural: bool
    noun: tuple


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class ChildDirectedGrammar:
    """Samples documents from the grammar with a private `random.Random(seed)`."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    # --- phrases -------------------------------------------------------------------------
    def noun_phrase(self, noun=None, plural=None, definite=None) -> NounPhrase:
        r = self.rng
        noun = noun or r.choice(NOUNS)
        plural = r.random() < 0.3 if plural is None else plural
        word = noun[1] if plural else noun[0]
        if r.random() < 0.35:
            adjective = r.choice(ANIMATE_ADJECTIVES if noun[2] else ADJECTIVES)
            word = f"{adjective} {word}"
        definite = r.random() < 0.6 if definite is None else definite
        if definite:
            det = r.choice(["the", "the", "your", "my"])
        elif plural:
            det = r.choice(["some", "two", "three"])
        else:
            det = _article(word)
        return NounPhrase(f"{det} {word}", plural, noun)

    def subject(self, topic):
        """A name, a pronoun for the topic, or an animate noun phrase."""
        r = self.rng
        u = r.random()
        if topic is not None and topic[2] and u < 0.3:
            return NounPhrase("it" if r.random() < 0.5 else f"the {topic[0]}", False, topic)
        if u < 0.6:
            return NounPhrase(r.choice(NAMES), False, None)
        animate = [n for n in NOUNS if n[2]]
        return self.noun_phrase(noun=r.choice(animate), definite=True)

    def obj(self, topic):
        if topic is not None and self.rng.random() < 0.4:
            return NounPhrase(self.rng.choice(["it", f"the {topic[0]}"]), False, topic)
        return self.noun_phrase()

    # --- sentences -----------------------------------------------------------------------
    def sentence(self, topic):
        r = self.rng
        kind = r.choices(
            ["statement", "progressive", "yes_no", "wh_object", "where", "imperative", "copula"],
            weights=[4, 2, 3, 2, 2, 2, 2],
        )[0]
        if kind == "statement":
            s = self.subject(topic)
            verb = r.choice(TRANSITIVE)
            v = verb[0] if s.plural else verb[1]
            return f"{s.text} {v} {self.obj(topic).text} .", s.noun or topic
        if kind == "progressive":
            s = self.subject(topic)
            be = "are" if s.plural else "is"
            return f"{s.text} {be} {r.choice(INTRANSITIVE)[2]} .", s.noun or topic
        if kind == "yes_no":
            if r.random() < 0.5:
                o = self.obj(topic)
                return f"do you {r.choice(TRANSITIVE)[0]} {o.text} ?", o.noun or topic
            s = self.subject(topic)
            aux = "do" if s.plural else "does"
            return f"{aux} {s.text} {r.choice(TRANSITIVE)[0]} {self.obj(topic).text} ?", topic
        if kind == "wh_object":
            s = self.subject(topic)
            aux = "do" if s.plural else "does"
            return f"what {aux} {s.text} {r.choice(TRANSITIVE)[0]} ?", s.noun or topic
        if kind == "where":
            np = self.noun_phrase(noun=topic, definite=True) if topic else self.noun_phrase()
            be = "are" if np.plural else "is"
            if r.random() < 0.5:
                return f"where {be} {np.text} ?", np.noun
            return f"{np.text} {be} {r.choice(PLACES)} .", np.noun
        if kind == "imperative":
            o = self.obj(topic)
            form = r.randrange(3)
            if form == 0:
                return f"look at {o.text} !", o.noun or topic
            if form == 1:
                return f"give {r.choice(NAMES)} {o.text} .", o.noun or topic
            return f"put {o.text} {r.choice(PLACES)} .", o.noun or topic
        # copula: "the ball is red ." / "the dogs are happy !"
        np = self.noun_phrase(noun=topic, definite=True) if topic else self.noun_phrase(definite=True)
        be = "are" if np.plural else "is"
        adjectives = ANIMATE_ADJECTIVES if np.noun[2] else ADJECTIVES
        return f"{np.text} {be} {r.choice(adjectives)} {r.choice(['.', '!'])}", np.noun

    def document(self) -> str:
        topic, sentences = None, []
        for _ in range(self.rng.choice([1, 1, 2, 2, 3, 4])):
            text, topic = self.sentence(topic)
            sentences.append(_written(text))
        return " ".join(sentences)


def _written(text: str) -> str:
    """Capitalise the first word and attach the final punctuation mark."""
    text = text[0].upper() + text[1:]
    return text[:-2] + text[-1]


def generate_documents(n_words: int, seed: int) -> list[str]:
    """Documents from the grammar until at least `n_words` whitespace words are produced."""
    if n_words <= 0:
        raise ValueError(f"n_words must be positive, got {n_words}")
    grammar = ChildDirectedGrammar(seed)
    documents, words = [], 0
    while words < n_words:
        doc = grammar.document()
        documents.append(doc)
        words += doc.count(" ") + 1
    return documents
