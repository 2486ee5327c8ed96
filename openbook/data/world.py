"""The default "world": a synthetic knowledge base where answering REQUIRES retrieval.

Made-up people (unique pronounceable names built from syllables) each have five facts drawn at
random: home town (made-up place), birth year, occupation, employer (made-up organisation) and
instrument. Each fact is one passage (title = the person's name, text = one or two sentences from
varied templates) and one question whose answer is the fact's value and whose gold passage is that
passage. Because values are drawn independently and uniformly from large pools, a closed-book model
can do no better than guess (~1/50 at best, for occupations), while a retriever that finds the
passage for (name, relation) makes the question easy. Names never contain an answer word, so an
answer never appears in its question.

``generate_world`` is deterministic in its config (same seed → byte-identical files) and reuses
existing files when ``world.json`` says they were made from the same config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from json.encoder import encode_basestring
from pathlib import Path

import numpy as np

from openbook.config import opt
from openbook.progress import Progress

log = logging.getLogger(__name__)
WORLD_VERSION = 1  # bump when generation changes, so cached worlds are regenerated
PROGRESS_EVERY = 10_000  # passages between progress updates
MIN_PASSAGES, MAX_PASSAGES = 100, 2_000_000

ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "tr",
    "th",
    "sh",
    "st",
)
VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
CODAS = ("", "", "n", "r", "l", "s", "m")  # "" twice: open syllables read more easily
PLACE_SUFFIXES = (
    "ford",
    "ton",
    "vale",
    "holm",
    "mouth",
    "bury",
    "wick",
    "stead",
    "dale",
    "field",
    "moor",
    "haven",
    "by",
    "thorpe",
)
PLACE_PREFIXES = ("Port", "North", "East", "Upper", "Lower", "Old", "New", "Saint")
ORG_KINDS = (
    "Institute", "Foundry", "Works", "Company", "Group", "Observatory", "Mills", "Press", "Bank",
    "Shipyard", "Guild", "Academy", "Laboratories", "Hospital", "Brewery", "Railway", "Museum", "Trust",
)  # fmt: skip
OCCUPATIONS = (
    "baker", "carpenter", "surgeon", "cartographer", "astronomer", "blacksmith", "librarian", "architect",
    "pilot", "sculptor", "chemist", "tailor", "farmer", "beekeeper", "glassblower", "locksmith", "potter",
    "watchmaker", "translator", "geologist", "botanist", "jeweller", "engineer", "nurse", "teacher",
    "journalist", "lawyer", "painter", "poet", "shipwright", "brewer", "stonemason", "weaver", "miner",
    "diver", "surveyor", "mathematician", "historian", "accountant", "photographer", "dentist",
    "pharmacist", "veterinarian", "archivist", "economist", "zoologist", "mechanic", "electrician",
    "gardener", "florist", "barber", "banker", "printer", "sailor", "judge", "chef", "dancer", "actor",
)  # fmt: skip
INSTRUMENTS = (
    "violin", "cello", "viola", "harp", "flute", "oboe", "clarinet", "bassoon", "trumpet", "trombone",
    "tuba", "piano", "organ", "accordion", "banjo", "mandolin", "sitar", "lute", "bagpipes", "harmonica",
    "saxophone", "xylophone", "marimba", "ukulele", "zither", "dulcimer", "guitar", "drums", "tambourine",
    "bugle", "piccolo", "double bass", "harpsichord", "recorder", "cornet", "glockenspiel", "koto", "oud",
)  # fmt: skip
ADJECTIVES = (
    "quiet",
    "cheerful",
    "stubborn",
    "generous",
    "curious",
    "patient",
    "restless",
    "meticulous",
    "witty",
    "shy",
    "ambitious",
    "gentle",
)
YEARS = (1650, 2006)  # half-open range of birth years

# Per attribute: fact sentences ({name}, {v}, {a} = article for {v}) and questions ({name}).
FACTS: dict[str, tuple[str, ...]] = {
    "hometown": (
        "{name} was born in {v}.",
        "{name} grew up in {v}, where the family had lived for generations.",
        "Born in {v}, {name} spent a whole childhood there.",
        "{name} is a native of {v}.",
        "The town of {v} is where {name} was born.",
    ),
    "birth_year": (
        "{name} was born in {v}.",
        "{name} came into the world in the year {v}.",
        "Parish records show that {name} was born in {v}.",
        "In {v}, {name} was born into a large family.",
    ),
    "occupation": (
        "{name} works as {a} {v}.",
        "By profession, {name} is {a} {v}.",
        "{name} earned a living as {a} {v} for many years.",
        "{name} trained as {a} {v} and never changed careers.",
    ),
    "employer": (
        "{name} is employed by the {v}.",
        "{name} has worked at the {v} since joining as a young adult.",
        "The {v} is where {name} works.",
        "For most of a long career, {name} worked for the {v}.",
    ),
    "instrument": (
        "{name} plays the {v}.",
        "In spare time, {name} enjoys playing the {v}.",
        "{name}'s favourite instrument is the {v}.",
        "{name} learned to play the {v} as a child.",
    ),
}
QUESTIONS: dict[str, tuple[str, ...]] = {
    "hometown": (
        "Where was {name} born?",
        "What is the home town of {name}?",
        "In which town did {name} grow up?",
    ),
    "birth_year": (
        "In what year was {name} born?",
        "When was {name} born?",
        "What is the birth year of {name}?",
    ),
    "occupation": (
        "What does {name} do for a living?",
        "What is the occupation of {name}?",
        "What is {name}'s profession?",
    ),
    "employer": (
        "Who employs {name}?",
        "Which organisation does {name} work for?",
        "For which organisation does {name} work?",
    ),
    "instrument": (
        "Which instrument does {name} play?",
        "What is {name}'s favourite instrument?",
        "What instrument does {name} enjoy playing?",
    ),
}
FILLERS = (
    "Friends describe {first} as {adj}.",
    "Little else is recorded about {first}'s early years.",
    "Neighbours still talk of {first}'s {adj} nature.",
    "{first} is known locally for being {adj}.",
)
ATTRIBUTES = tuple(FACTS)


@dataclass(kw_only=True)
class WorldConfig:
    num_passages: int = opt(
        2000, "passages (= questions) in the generated world; 1k..1M documented, 100..2M allowed"
    )
    seed: int = opt(0, "random seed: same seed → byte-identical files")
    dev_fraction: float = opt(0.1, "fraction of questions in qa_dev.jsonl")
    test_fraction: float = opt(0.1, "fraction of questions in qa_test.jsonl")

    def __post_init__(self) -> None:
        # ValueError: config.from_dict turns it into a ConfigError with the key's dotted path.
        if not MIN_PASSAGES <= self.num_passages <= MAX_PASSAGES:
            raise ValueError(
                f"num_passages must be in {MIN_PASSAGES}..{MAX_PASSAGES}, got {self.num_passages}"
            )
        if not (0 <= self.dev_fraction < 1 and 0 <= self.test_fraction < 1):
            raise ValueError("dev_fraction and test_fraction must be in [0, 1)")
        if self.dev_fraction + self.test_fraction >= 1:
            raise ValueError("dev_fraction + test_fraction must leave some training questions")


@dataclass
class WorldFiles:
    root: Path
    corpus: Path
    train: Path
    dev: Path
    test: Path


def world_files(out_dir: str | os.PathLike) -> WorldFiles:
    root = Path(out_dir)
    return WorldFiles(
        root, root / "corpus.jsonl", root / "qa_train.jsonl", root / "qa_dev.jsonl", root / "qa_test.jsonl"
    )


# ----------------------------------------------------------------------------- vocabularies

SYLLABLES = tuple(o + v + c for o in ONSETS for v in VOWELS for c in CODAS)


def _words(rng: np.random.Generator, count: int, n_syl: int, extra_prob: float = 0.0) -> list[str]:
    """``count`` capitalised words of ``n_syl`` syllables (one more with probability ``extra_prob``)."""
    idx = rng.integers(0, len(SYLLABLES), size=(count, n_syl + 1)).tolist()
    extra = (rng.random(count) < extra_prob).tolist()
    return ["".join(SYLLABLES[j] for j in row[: n_syl + e]).capitalize() for row, e in zip(idx, extra)]


def _unique(make: Callable[[int], Iterable[str]], n: int, banned: frozenset[str] = frozenset()) -> list[str]:
    """``n`` distinct strings from repeated calls of ``make(k)``, skipping any with a banned word.

    Deduplicating the *strings* (not syllable tuples, which can spell the same word) is what
    guarantees unique names at any size.
    """
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        need = n - len(out)
        for s in make(need + need // 10 + 16):
            if s in seen or any(w.lower() in banned for w in s.split()):
                continue
            seen.add(s)
            out.append(s)
            if len(out) == n:
                break
    return out


def _places(rng: np.random.Generator, n: int) -> list[str]:
    def make(k: int) -> list[str]:
        roots = _words(rng, k, 1, extra_prob=0.3)
        suffix = rng.integers(0, len(PLACE_SUFFIXES), k).tolist()
        prefix = rng.integers(0, len(PLACE_PREFIXES), k).tolist()
        use_prefix = (rng.random(k) < 0.2).tolist()
        return [
            f"{PLACE_PREFIXES[p]} {r}" if up else r + PLACE_SUFFIXES[s]
            for r, s, p, up in zip(roots, suffix, prefix, use_prefix)
        ]

    return _unique(make, n)


def _orgs(rng: np.random.Generator, n: int) -> list[str]:
    def make(k: int) -> list[str]:
        kinds = rng.integers(0, len(ORG_KINDS), k).tolist()
        return [f"{r} {ORG_KINDS[i]}" for r, i in zip(_words(rng, k, 2), kinds)]

    return _unique(make, n)


def _names(rng: np.random.Generator, n: int, banned: frozenset[str]) -> list[str]:
    def make(k: int) -> list[str]:
        return [f"{a} {b}" for a, b in zip(_words(rng, k, 2), _words(rng, k, 2, extra_prob=0.35))]

    return _unique(make, n, banned)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------- generation


def _build(cfg: WorldConfig, progress: Progress) -> tuple[list[str], list[str], list[int]]:
    """(corpus JSON lines, QA JSON lines, split of each QA row: 0 train / 1 dev / 2 test)."""
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(5)]
    n_ent = -(-cfg.num_passages // len(ATTRIBUTES))
    pool = max(300, n_ent // 3)  # many distinct values per attribute: answers are not guessable
    places, orgs = _places(rngs[0], pool), _orgs(rngs[0], pool)
    answer_words = {w.lower() for v in (*places, *orgs, *OCCUPATIONS, *INSTRUMENTS) for w in v.split()}
    names = _names(rngs[1], n_ent, frozenset(answer_words))
    values = {
        "hometown": [places[i] for i in rngs[2].integers(0, pool, n_ent)],
        "birth_year": [str(y) for y in rngs[2].integers(*YEARS, n_ent)],
        "occupation": [OCCUPATIONS[i] for i in rngs[2].integers(0, len(OCCUPATIONS), n_ent)],
        "employer": [orgs[i] for i in rngs[2].integers(0, pool, n_ent)],
        "instrument": [INSTRUMENTS[i] for i in rngs[2].integers(0, len(INSTRUMENTS), n_ent)],
    }
    lines, qa = _passages_and_questions(cfg.num_passages, names, values, rngs[3], progress)
    return lines, qa, _splits(cfg, rngs[4])


def _passages_and_questions(
    n: int, names: list[str], values: dict[str, list[str]], rng: np.random.Generator, progress: Progress
) -> tuple[list[str], list[str]]:
    """Corpus and QA JSON lines. Passage ``p`` states attribute ``p % 5`` of entity ``p // 5``; its question asks for it."""
    fact_t = rng.integers(0, 1 << 30, n).tolist()  # template choices, reduced mod each list's length
    q_t = rng.integers(0, len(QUESTIONS["hometown"]), n).tolist()
    filler = rng.integers(0, 2 * len(FILLERS), n).tolist()  # >= len(FILLERS): no filler sentence
    adj = rng.integers(0, len(ADJECTIVES), n).tolist()
    q = encode_basestring  # JSON string literal, as json.dumps(ensure_ascii=False) writes it
    lines, qa = [], []
    for p in range(n):
        ent, attr = divmod(p, len(ATTRIBUTES))
        key, name, v = ATTRIBUTES[attr], names[ent], values[ATTRIBUTES[attr]][ent]
        facts = FACTS[key]
        text = facts[fact_t[p] % len(facts)].format(name=name, v=v, a=_article(v))
        if filler[p] < len(FILLERS):
            text += " " + FILLERS[filler[p]].format(first=name.split()[0], adj=ADJECTIVES[adj[p]])
        pid = f"w{p:07d}"
        question = QUESTIONS[key][q_t[p]].format(name=name)
        # Hand-assembled JSON (same bytes as json.dumps, 2x faster overall at 1M rows; tested).
        lines.append(f'{{"id": "{pid}", "title": {q(name)}, "text": {q(text)}}}')
        qa.append(f'{{"question": {q(question)}, "answers": [{q(v)}], "gold_ids": ["{pid}"]}}')
        if (p + 1) % PROGRESS_EVERY == 0 or p + 1 == n:  # in chunks: a call per row would slow the loop
            progress.update(p + 1 - progress.done)
    return lines, qa


def _splits(cfg: WorldConfig, rng: np.random.Generator) -> list[int]:
    n = cfg.num_passages
    n_test, n_dev = round(n * cfg.test_fraction), round(n * cfg.dev_fraction)
    split = np.zeros(n, dtype=np.int64)
    perm = rng.permutation(n)
    split[perm[:n_test]] = 2
    split[perm[n_test : n_test + n_dev]] = 1
    return split.tolist()


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
                f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _manifest(cfg: WorldConfig) -> dict:
    return {"version": WORLD_VERSION, "config": dataclasses.asdict(cfg)}


def _reusable(files: WorldFiles, cfg: WorldConfig) -> bool:
    """True when world.json records this config and every file still has its recorded size."""
    meta_path = files.root / "world.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if {k: meta.get(k) for k in ("version", "config")} != _manifest(cfg):
        return False
    paths = {"corpus": files.corpus, "train": files.train, "dev": files.dev, "test": files.test}
    return all(p.is_file() and p.stat().st_size == meta.get("sizes", {}).get(k) for k, p in paths.items())


def generate_world(cfg: WorldConfig, out_dir: str | os.PathLike, progress: bool = False) -> WorldFiles:
    """Write (or reuse) ``corpus.jsonl``, ``qa_{train,dev,test}.jsonl`` and ``world.json`` in ``out_dir``,
    logging progress (INFO; a tqdm bar too with ``progress``).

    ``world.json`` is written last, so an interrupted run is regenerated rather than reused.
    """
    files = world_files(out_dir)
    if _reusable(files, cfg):
        log.info("world: reusing %s (%d passages, seed %d)", files.root, cfg.num_passages, cfg.seed)
        return files
    files.root.mkdir(parents=True, exist_ok=True)
    (files.root / "world.json").unlink(missing_ok=True)
    with Progress(log, "world: passages and questions", cfg.num_passages, "passage", bar=progress) as prog:
        lines, qa, split = _build(cfg, prog)
    _write_atomic(files.corpus, lines)
    for code, path in enumerate((files.train, files.dev, files.test)):
        _write_atomic(path, (row for row, s in zip(qa, split) if s == code))
    meta = _manifest(cfg)
    meta["counts"] = {"passages": len(lines), "entities": -(-len(lines) // len(ATTRIBUTES))}
    meta["counts"].update({name: split.count(code) for code, name in enumerate(("train", "dev", "test"))})
    meta["sizes"] = {k: getattr(files, k).stat().st_size for k in ("corpus", "train", "dev", "test")}
    _write_atomic(files.root / "world.json", [json.dumps(meta, indent=1, sort_keys=True)])
    c = meta["counts"]
    log.info("world: wrote %d passages and %d/%d/%d train/dev/test questions to %s in %.1f s", c["passages"],
             c["train"], c["dev"], c["test"], files.root, prog.seconds)
    return files


# ----------------------------------------------------------------------------- real text


def pydoc_text(min_words: int = 8) -> list[tuple[str, str]]:
    """(topic, paragraph) pairs from Python's bundled help topics: real English text available on
    every install, for REALM-style pretraining and kNN-LM tests. Whitespace is collapsed; paragraphs
    shorter than ``min_words`` (headings, rules) are dropped. Sorted by topic, so deterministic.
    """
    from pydoc_data.topics import topics

    out = []
    for title in sorted(topics):
        for para in topics[title].split("\n\n"):
            text = " ".join(para.split())
            if len(text.split()) >= min_words and not set(text) <= set("*=-~^ "):
                out.append((title, text))
    return out
