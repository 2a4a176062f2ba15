"""Generate fastpref's bundled default data, tokenizer and tiny model config (deterministic).

    python scripts/make_assets.py [--out fastpref/assets]

writes, under the output directory:

    data/pair_rationale.jsonl  prompt/chosen/rejected/rationale  (rorpo, rdpo; dpo family, rm)
    data/kto.jsonl             prompt/completion/label           (kto)
    data/list.jsonl            prompt/responses[4]/scores[4]     (lipo)
    data/sft.jsonl             prompt/completion                 (sft)
    data/aepo_responses.jsonl  prompt/responses[16]              (fastpref-aepo's default input)
    data/rerank.jsonl          qid/query/passages[20-30]/relevance (rankllm; 10% held out)
    data/rerank_dev.jsonl      the same kind of lists, other queries (fastpref-rerank)
    tokenizer_rerank/          a BPE like tokenizer/, trained on the reranking prompts (rankllm)
    data/retrieval_triples.jsonl  query/positives/negatives[5]   (infonce; 10% held out)
    data/retrieval_pairs.jsonl    query/passage1/passage2/preferred (rankpo)
    data/retrieval_corpus.jsonl   text: 2800 passages the held-out queries are ranked in
    data/retrieval_queries.jsonl  query/positives: held-out queries for rankpo's ranking
    tokenizer/                 byte-level BPE (AutoTokenizer.from_pretrained loads it offline)
    model/config.json          a 2-layer, 128-wide Llama sized to the tokenizer

The preference is made to be learnable by a tiny model in minutes and to generalise to
held-out prompts. Every prompt names one of TOPICS. A good answer is polite and stays on
that topic (it uses the topic's own words); a bad answer is rude (a rude opener or closer),
or drifts to another topic, or both. These are lexical cues: "rude" words never occur in a
good answer, and the topic words of a good answer match the topic named in the prompt.
Templates, topic words and openers are drawn independently, so held-out rows are new
combinations rather than copies. The rationale explains the preference in the same words.

Everything is drawn from one `random.Random(SEED)` and the BPE is trained on the generated
text, so running the script twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1234
N_PAIR = 2000
N_KTO = 1600
N_LIST = 1000
N_SFT = 1500
N_AEPO = 100  # instructions of the bundled fastpref-aepo input
AEPO_RESPONSES = 16  # responses per instruction (N)
N_RERANK = 400  # queries of the bundled reranking lists (rankllm), and a dev set of
N_RERANK_DEV = 50  # other queries for fastpref-rerank
VOCAB_SIZE = 1024  # a multiple of 64, so the model's vocab_size equals the tokenizer's

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Each turn is "<|role|>content<|eos|>"; a generation prompt ends with "<|assistant|>", so a
# completion rendered as the assistant turn's text is followed by exactly the EOS the data
# layer appends.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>"
    "{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TOPICS: dict[str, list[str]] = {
    "gardening": ["soil", "seeds", "watering", "sunlight", "compost", "roots"],
    "astronomy": ["stars", "planets", "telescopes", "orbits", "galaxies", "the moon"],
    "cooking": ["recipes", "the oven", "spices", "flavor", "pans", "sauces"],
    "music": ["melody", "rhythm", "guitars", "notes", "chords", "songs"],
    "soccer": ["the ball", "goals", "the team", "the pitch", "players", "passing"],
    "chess": ["the board", "pawns", "knights", "checkmate", "openings", "the king"],
    "painting": ["canvas", "brushes", "colors", "paint", "portraits", "the easel"],
    "swimming": ["the pool", "strokes", "breathing", "lanes", "kicking", "laps"],
    "cycling": ["bikes", "pedals", "gears", "helmets", "the road", "wheels"],
    "photography": ["cameras", "lenses", "light", "the shutter", "photos", "focus"],
    "history": ["the past", "empires", "records", "dates", "kings", "archives"],
    "chemistry": ["atoms", "molecules", "reactions", "elements", "acids", "the lab"],
    "baking": ["flour", "bread", "yeast", "butter", "cakes", "sugar"],
    "hiking": ["trails", "boots", "mountains", "maps", "backpacks", "forests"],
    "programming": ["code", "functions", "bugs", "variables", "loops", "compilers"],
    "birds": ["feathers", "nests", "wings", "eggs", "birdsong", "flight"],
    "weather": ["rain", "clouds", "wind", "storms", "forecasts", "temperature"],
    "fishing": ["rods", "bait", "lakes", "hooks", "boats", "fish"],
    "poetry": ["verses", "rhyme", "poems", "meter", "imagery", "stanzas"],
    "medicine": ["doctors", "health", "patients", "treatment", "symptoms", "nurses"],
    "trains": ["railways", "tracks", "stations", "engines", "tickets", "passengers"],
    "volcanoes": ["lava", "magma", "eruptions", "ash", "craters", "rock"],
    "coffee": ["beans", "espresso", "roasting", "grinders", "milk", "caffeine"],
    "dogs": ["puppies", "leashes", "barking", "training", "walks", "breeds"],
}

PROMPTS = [
    "Tell me about {t}.",
    "Can you explain {t} to me?",
    "What should a beginner know about {t}?",
    "I want to learn about {t}. Where do I start?",
    "Give me a tip about {t}.",
    "Why do people enjoy {t}?",
    "What is interesting about {t}?",
    "Could you help me with a question on {t}?",
    "Share one fact about {t}, please.",
    "How do I get better at {t}?",
    "My friend loves {t}. What is it about?",
    "Teach me something new about {t}.",
]
POLITE_OPENERS = [
    "Sure!",
    "Happy to help.",
    "Of course!",
    "Great question.",
    "Gladly.",
    "Good question!",
    "Thanks for asking.",
    "With pleasure.",
]
RUDE_OPENERS = [
    "Ugh, fine.",
    "What a dumb question.",
    "Whatever.",
    "Stop bothering me.",
    "Figure it out yourself.",
    "That is a stupid thing to ask.",
    "Go away.",
    "Seriously?",
]
POLITE_CLOSERS = [
    "",
    "",
    "I hope this helps.",
    "Let me know if you have more questions.",
    "Have fun!",
    "Enjoy learning!",
]
RUDE_CLOSERS = ["", "Now leave me alone.", "Don't ask me again.", "Not my problem.", ""]
BODIES = [
    "{T} is mostly about {a} and {b}.",
    "In {t}, {a} and {b} matter most.",
    "A good start in {t} is to learn about {a}, then {b}.",
    "People who love {t} talk about {a} and {b} all the time.",
    "The heart of {t} is {a}, together with {b}.",
    "To get better at {t}, practice with {a} and pay attention to {b}.",
    "One fun fact: {t} depends on {a} as much as on {b}.",
]
# An off-topic answer announces its drift, so "off topic" is a lexical cue as well as a
# mismatch between the topic words of the answer and the topic of the prompt.
DRIFTS = [
    "Let's talk about {o} instead.",
    "Forget that, {o} is more fun.",
    "I would rather discuss {o}.",
    "Never mind that, here is something on {o}.",
]
RATIONALES = {
    "rude": [
        "The chosen answer is polite and stays on {t}, while the rejected answer is rude.",
        "Both answers talk about {t}, but the rejected one is rude and the chosen one is kind.",
        "The chosen answer helps politely with {t}; the rejected answer insults the user.",
    ],
    "off": [
        "The chosen answer stays on {t}, while the rejected answer drifts to {o}.",
        "The question is about {t}, but the rejected answer talks about {o} instead.",
        "The chosen answer is about {t} as asked; the rejected answer is about {o}.",
    ],
    "both": [
        "The chosen answer is polite and about {t}; the rejected one is rude and about {o}.",
        "The rejected answer is rude and talks about {o}, not {t}; the chosen one helps kindly.",
        "The chosen answer stays on {t} politely, while the rejected answer is rude and off topic.",
    ],
}


def _sentence(rng: random.Random, topic: str) -> str:
    a, b = rng.sample(TOPICS[topic], 2)
    body = rng.choice(BODIES)
    return body.format(t=topic, T=topic[0].upper() + topic[1:], a=a, b=b)


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def answer(rng: random.Random, topic: str, *, polite: bool, drift: bool = False) -> str:
    """An answer about `topic`: polite (opener + body + closer) or rude; `drift` announces
    that `topic` is not the one asked about."""
    lead = rng.choice(DRIFTS).format(o=topic) if drift else ""
    if polite:
        opener, closer = rng.choice(POLITE_OPENERS), rng.choice(POLITE_CLOSERS)
    else:
        opener, closer = rng.choice(RUDE_OPENERS), rng.choice(RUDE_CLOSERS)
    return _join(opener, lead, _sentence(rng, topic), closer)


def _prompt(rng: random.Random) -> tuple[str, str]:
    topic = rng.choice(sorted(TOPICS))
    return topic, rng.choice(PROMPTS).format(t=topic)


def _other(rng: random.Random, topic: str) -> str:
    return rng.choice([t for t in sorted(TOPICS) if t != topic])


def make_pair_rationale(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        topic, prompt = _prompt(rng)
        kind = rng.choice(["rude", "off", "both"])
        other = _other(rng, topic)
        rejected_topic = topic if kind == "rude" else other
        rows.append(
            {
                "prompt": prompt,
                "chosen": answer(rng, topic, polite=True),
                "rejected": answer(rng, rejected_topic, polite=kind == "off", drift=kind != "rude"),
                "rationale": rng.choice(RATIONALES[kind]).format(t=topic, o=other),
            }
        )
    return rows


def make_kto(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        topic, prompt = _prompt(rng)
        label = rng.random() < 0.5
        if label:
            completion = answer(rng, topic, polite=True)
        else:
            kind = rng.choice(["rude", "off", "both"])
            completion = answer(
                rng,
                topic if kind == "rude" else _other(rng, topic),
                polite=kind == "off",
                drift=kind != "rude",
            )
        rows.append({"prompt": prompt, "completion": completion, "label": label})
    return rows


def make_list(rng: random.Random, n: int) -> list[dict]:
    # score = 2 * on_topic + polite: polite on-topic 3 > rude on-topic 2 > polite off-topic 1
    # > rude off-topic 0, in a shuffled order.
    rows = []
    for _ in range(n):
        topic, prompt = _prompt(rng)
        other = _other(rng, topic)
        graded = [
            (answer(rng, topic, polite=True), 3.0),
            (answer(rng, topic, polite=False), 2.0),
            (answer(rng, other, polite=True, drift=True), 1.0),
            (answer(rng, other, polite=False, drift=True), 0.0),
        ]
        rng.shuffle(graded)
        rows.append(
            {
                "prompt": prompt,
                "responses": [r for r, _ in graded],
                "scores": [s for _, s in graded],
            }
        )
    return rows


def make_sft(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        topic, prompt = _prompt(rng)
        rows.append({"prompt": prompt, "completion": answer(rng, topic, polite=True)})
    return rows


def make_aepo_responses(rng: random.Random, n: int, per_prompt: int) -> list[dict]:
    """`per_prompt` distinct responses per prompt, of visibly varying quality: polite and on
    topic (best), rude on topic, polite off topic, rude off topic (worst), in shuffled order,
    about a third of them of the best kind."""
    kinds = [(True, False), (False, False), (True, True), (False, True)]  # (polite, drift)
    weights = [5, 3, 2, 2]
    rows = []
    for _ in range(n):
        topic, prompt = _prompt(rng)
        seen: set[str] = set()
        responses: list[str] = []
        while len(responses) < per_prompt:
            polite, drift = rng.choices(kinds, weights)[0]
            about = _other(rng, topic) if drift else topic
            text = answer(rng, about, polite=polite, drift=drift)
            if text not in seen:
                seen.add(text)
                responses.append(text)
        rows.append({"prompt": prompt, "responses": responses})
    return rows


RERANK_QUERIES = ["{a} in {t}", "{t}: {a}", "how {a} matters in {t}", "{t} and {a}", "{a} for {t}"]
# Short passages that start with their topic, written as the query writes it: the topic word
# sits right after the passage's identifier, where a 2-layer model finds it most easily.
RERANK_BODIES = [
    "{t}: {a} and {b}.",
    "{t}: {a}, then {b}.",
    "{t}: {a} with {b}.",
    "{t} means {a} and {b}.",
]


def make_rerank(rng: random.Random, n: int, prefix: str) -> list[dict]:
    """Candidate lists for a listwise reranker. A query names a topic t and one of its words a;
    each of its 20-30 candidates is a short sentence: relevance 2 if it is about t and
    names a, 1 if it is about t without a, 0 if it is about another topic (1-2, 2-4 and the rest).
    The candidates come in a first-stage order that leans relevant ones to the front, as a
    retriever's would: sorted by relevance + N(0, 2), so reranking has much to gain."""
    rows = []
    for i in range(n):
        topic = rng.choice(sorted(TOPICS))
        word = rng.choice(TOPICS[topic])
        others = [w for w in TOPICS[topic] if w != word]
        size, n2, n1 = rng.randint(20, 30), rng.randint(1, 2), rng.randint(2, 4)
        graded: list[tuple[str, int]] = []
        seen: set[str] = set()
        while len(graded) < size:
            rel = 2 if len(graded) < n2 else 1 if len(graded) < n2 + n1 else 0
            about = topic if rel else _other(rng, topic)
            if rel == 2:
                a, b = rng.sample([word, rng.choice(others)], 2)
            elif rel == 1:
                a, b = rng.sample(others, 2)
            else:
                a, b = rng.sample(TOPICS[about], 2)
            body = rng.choice(RERANK_BODIES)
            text = body.format(t=about, a=a, b=b)
            if text not in seen:
                seen.add(text)
                graded.append((text, rel))
        keyed = sorted(graded, key=lambda g: g[1] + rng.gauss(0.0, 2.0), reverse=True)
        rows.append(
            {
                "qid": f"{prefix}{i}",
                "query": rng.choice(RERANK_QUERIES).format(t=topic, a=word),
                "passages": [text for text, _ in keyed],
                "relevance": [rel for _, rel in keyed],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Retrieval data for the embedding family (--loss infonce / rankpo with all-MiniLM-L6-v2).
#
# A parts catalogue: every part has a code ("LEN-018") and one catalogue entry (type, material,
# spec, depot). A query asks about a part by its code from some city ("Does LEN-018 ship to
# Oslo this week?"); its relevant passages are the part's catalogue entry and any shipping notice
# about that code. Its hard negatives are shipping notices about *other* codes from the query's
# city, which share everything with the query but the code (plus two random catalogue entries).
# Zero-shot, MiniLM ranks by those shared words and the notices win (held-out nDCG@10 ~0.04);
# what training teaches is a skill, not a lookup: match the code and ignore the rest, which
# carries over to held-out queries about parts it never saw.

N_PARTS = 2000  # catalogue entries (the corpus holds them all, and the shipping notices)
N_NOTICES = 800
N_RETRIEVAL_TRAIN = 1200  # stage-1 queries (parts 0..1199), 10% held out by the trainer
N_RETRIEVAL_PAIRS = 1200  # stage-2 preference pairs (parts 300..1499)
N_RETRIEVAL_EVAL = 200  # held-out queries (parts 1800..1999) for --loss rankpo's ranking
PART_TYPES = (
    "valve pump bearing gasket sensor relay fuse filter hinge spring bracket nozzle clamp "
    "coupling switch motor"
).split()
PART_MATERIALS = "steel brass copper nylon ceramic aluminium rubber titanium bronze zinc".split()
PART_SPECS = "12 mm,24 V,3/4 inch,heavy duty,food grade,high pressure,low noise,marine".split(",")
DEPOTS = (
    "Lisbon Oslo Cairo Lima Osaka Denver Krakow Nairobi Perth Quito Tallinn Hanoi Accra Bergen "
    "Seville Tampere"
).split()
CATALOGUE = [
    "{c}: {m} {t}, {s}, stocked in {city}.",
    "Catalog entry {c} - {s} {m} {t} ({city} depot).",
    "{t} {c}, {m}, {s}; warehouse {city}.",
]
NOTICES = [
    "Customers in {city} report that {c} ships late this week.",
    "Order update for {city}: {c} arrives by Friday.",
    "{city} branch: part {c} is back in stock and ships today.",
    "Shipping notice, {city}: delivery of {c} is delayed.",
]
PART_QUERIES = [
    "A customer in {city} asks when {c} ships.",
    "Will {c} arrive in {city} by Friday?",
    "Order from {city}: is part {c} in stock?",
    "Does {c} ship to {city} this week?",
]


def make_retrieval(rng: random.Random) -> dict[str, list[dict]]:
    """``corpus`` ({text}), ``triples`` (query/positives/negatives[5]), ``pairs``
    (query/passage1/passage2/preferred) and ``queries`` (held-out query/positives)."""
    letters = "ABCDEFGHJKLMNPRSTUVWXZ"
    codes: list[str] = []
    while len(codes) < N_PARTS:
        code = "".join(rng.choice(letters) for _ in range(3)) + f"-{rng.randrange(1000):03d}"
        if code not in codes:
            codes.append(code)
    entry = {}
    for c in codes:
        t, m, s = rng.choice(PART_TYPES), rng.choice(PART_MATERIALS), rng.choice(PART_SPECS)
        entry[c] = rng.choice(CATALOGUE).format(c=c, t=t, m=m, s=s, city=rng.choice(DEPOTS))
    notices: list[tuple[str, str, str]] = []  # (code, city, text)
    while len(notices) < N_NOTICES:
        c, city = rng.choice(codes), rng.choice(DEPOTS)
        text = rng.choice(NOTICES).format(c=c, city=city)
        if all(text != n[2] for n in notices):
            notices.append((c, city, text))
    about = {c: [] for c in codes}
    from_city = {city: [] for city in DEPOTS}
    for c, city, text in notices:
        about[c].append(text)
        from_city[city].append((c, text))

    def query(c: str) -> tuple[str, str, list[str]]:
        city = rng.choice(DEPOTS)
        return rng.choice(PART_QUERIES).format(c=c, city=city), city, [entry[c], *about[c]]

    def hard(c: str, city: str, n: int) -> list[str]:
        return rng.sample([t for other, t in from_city[city] if other != c], n)

    triples = []
    for c in codes[:N_RETRIEVAL_TRAIN]:
        q, city, positives = query(c)
        others = rng.sample([o for o in codes if o != c], 2)
        negatives = hard(c, city, 3) + [entry[o] for o in others]
        triples.append({"query": q, "positives": positives, "negatives": negatives})
    pairs = []
    for c in codes[300 : 300 + N_RETRIEVAL_PAIRS]:
        q, city, positives = query(c)
        good, bad = rng.choice(positives), hard(c, city, 1)[0]
        row = {"query": q, "passage1": good, "passage2": bad, "preferred": "A"}
        if rng.random() < 0.5:
            row.update(passage1=bad, passage2=good, preferred="B")
        pairs.append(row)
    held_out = []
    for c in codes[N_PARTS - N_RETRIEVAL_EVAL :]:
        q, _, positives = query(c)
        held_out.append({"query": q, "positives": positives})
    corpus = [{"text": entry[c]} for c in codes] + [{"text": n[2]} for n in notices]
    return {"corpus": corpus, "triples": triples, "pairs": pairs, "queries": held_out}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _corpus(datasets: dict[str, list[dict]]) -> list[str]:
    texts: list[str] = []
    for rows in datasets.values():
        for row in rows:
            for value in row.values():
                if isinstance(value, str):
                    texts.append(value)
                elif isinstance(value, list):
                    texts.extend(v for v in value if isinstance(v, str))
    return texts


def _rerank_corpus(rows: list[dict]) -> list[str]:
    """The prompts and targets fastpref-train --loss rankllm builds from `rows` (its template)."""
    from fastpref.families.reranker_formats import IDENTIFIERS, PROMPT, build_user_prompt

    names = IDENTIFIERS["alpha"]
    texts = []
    for row in rows:
        k = min(20, len(row["passages"]))
        order = sorted(range(k), key=lambda j: -row["relevance"][j])
        texts.append(PROMPT.system)
        texts.append(build_user_prompt(row["query"], row["passages"][:k], names, "alpha", 300))
        texts.append(" > ".join(f"[{names[j]}]" for j in order))
    return texts


def make_tokenizer(texts: list[str], out: Path) -> tuple[int, dict[str, int]]:
    """Train a byte-level BPE on `texts`; write tokenizer.json + config.

    Returns (vocab size, ids of pad/bos/eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [PAD, BOS, EOS, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # add_special_tokens=True prepends BOS (Llama convention); EOS is added by the data layer.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    # Written by hand (not save_pretrained) so the files do not depend on the transformers
    # version that generated them.
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "additional_special_tokens": ROLE_TOKENS,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 512,
            "padding_side": "right",
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "additional_special_tokens": ROLE_TOKENS,
        },
    )
    return tok.get_vocab_size(), {t: tok.token_to_id(t) for t in (PAD, BOS, EOS)}


def make_model_config(out: Path, vocab_size: int, ids: dict[str, int]) -> None:
    _write_json(
        out / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": -(-vocab_size // 64) * 64,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "hidden_act": "silu",
            "max_position_embeddings": 512,
            "initializer_range": 0.02,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "use_cache": True,
            "torch_dtype": "float32",
            "pad_token_id": ids[PAD],
            "bos_token_id": ids[BOS],
            "eos_token_id": ids[EOS],
        },
    )


def generate(out: Path) -> None:
    rng = random.Random(SEED)
    datasets = {
        "pair_rationale": make_pair_rationale(rng, N_PAIR),
        "kto": make_kto(rng, N_KTO),
        "list": make_list(rng, N_LIST),
        "sft": make_sft(rng, N_SFT),
    }
    for name, rows in datasets.items():
        _write_jsonl(out / "data" / f"{name}.jsonl", rows)
    vocab_size, ids = make_tokenizer(_corpus(datasets), out / "tokenizer")
    make_model_config(out / "model", vocab_size, ids)
    # Its own generator, and not part of the tokenizer's corpus, so the files above stay
    # byte-identical to the ones written before this file existed.
    aepo = make_aepo_responses(random.Random(SEED + 1), N_AEPO, AEPO_RESPONSES)
    _write_jsonl(out / "data" / "aepo_responses.jsonl", aepo)
    # The reranking lists likewise: their own generator, outside the tokenizer's corpus (their
    # words are TOPICS', which the corpus already holds).
    rng = random.Random(SEED + 2)
    _write_jsonl(out / "data" / "rerank.jsonl", make_rerank(rng, N_RERANK, "q"))
    _write_jsonl(out / "data" / "rerank_dev.jsonl", make_rerank(rng, N_RERANK_DEV, "dev"))
    # The reranker's own tokenizer (same size, special tokens and chat template, so the same model
    # config fits): trained on its prompts, a 20-passage prompt is ~340 tokens, ~550 with
    # tokenizer/, whose BPE never saw the prompt's words. Passage identifiers stay single tokens
    # after "[" (the byte-level pre-tokenizer splits letters from brackets).
    rows = make_rerank(random.Random(SEED + 2), N_RERANK, "q")
    make_tokenizer(_rerank_corpus(rows), out / "tokenizer_rerank")
    # The embedding family's retrieval data: its own generator; the model is MiniLM, with its
    # own tokenizer, so nothing of it enters a BPE corpus.
    for name, rows in make_retrieval(random.Random(SEED + 3)).items():
        _write_jsonl(out / "data" / f"retrieval_{name}.jsonl", rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent.parent / "fastpref" / "assets"
    parser.add_argument("--out", type=Path, default=default, help="output directory")
    args = parser.parse_args(argv)
    generate(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
