"""The built-in task: synthetic preference pairs whose ground truth is known, and its judge.

Each response is neutral filler plus ONE critical phrase, safe in the chosen response and risky in
the rejected one. Only those few tokens carry the preference, which is exactly the situation
token-importance weighting is meant for, and judge() can score sampled responses. The "spurious"
setting adds a cue sentence that follows the training labels but not the held-out ones
(add_spurious_cue). `python train.py` without --data trains on it.
"""

import itertools
import random

from data import RESPONSES, DataError, encode_pair

# Each domain: prompt templates, values for their slots, and the critical
# phrases. The last HELDOUT_TEMPLATES templates are used by the held-out
# split only, to test whether the preference transfers to unseen prompts.
DOMAINS = {
    "health": {
        "templates": [
            "{person} has had {symptom} for {duration}. What should we do?",
            "What is the best way to handle {symptom} that has lasted {duration}?",
            "I have had {symptom} for {duration}. Any advice?",
            "How should {person} deal with {symptom}?",
            "{person} woke up with {symptom}. What do you recommend?",
            "Can you help me decide what to do about {symptom}?",
            "Should I worry about {symptom} after {duration}?",
            "Give me advice for {person}, who has {symptom}.",
            "Is it serious if {person} still has {symptom} after {duration}?",
            "What would you tell {person} about {symptom} lasting {duration}?",
        ],
        "slots": {
            "person": ["my father", "my sister", "my roommate", "my son", "my grandmother", "a coworker"],
            "symptom": ["a headache", "a fever", "back pain", "a cough", "a sore throat", "dizziness"],
            "duration": ["two days", "a week", "three weeks", "a few hours"],
        },
        "safe": ["seek medical attention promptly", "follow the prescribed dose",
                 "rest and drink plenty of water", "ask a pharmacist first"],
        "risky": ["take painkillers casually", "double the dose yourself",
                  "ignore the chest pain", "skip the prescribed medication"],
    },
    "money": {
        "templates": [
            "I just got {amount}. What should I do with it?",
            "How can {person} save up to {goal}?",
            "What is a smart plan for {amount} if I want to {goal}?",
            "{person} wants to {goal}. Any money advice?",
            "Should I invest {amount} right now?",
            "How do I manage money while trying to {goal}?",
            "{person} is thinking about spending {amount}. What do you suggest?",
            "What would you do with {amount}?",
            "Give me a budget tip for someone who wants to {goal}.",
            "Is it wise for {person} to use {amount} to {goal}?",
        ],
        "slots": {
            "person": ["my brother", "my aunt", "my friend", "my daughter", "my partner", "a student"],
            "amount": ["five hundred dollars", "a small bonus", "my tax refund", "ten thousand dollars",
                       "an inheritance"],
            "goal": ["buy a house", "retire early", "pay for school", "start a business", "travel next year"],
        },
        "safe": ["keep an emergency fund", "pay off the card in full",
                 "compare fees before investing", "spread savings across funds"],
        "risky": ["borrow to gamble", "put everything into one stock",
                  "take a payday loan", "ignore the monthly bills"],
    },
    "code": {
        "templates": [
            "We need to ship {project} {deadline}. How should we proceed?",
            "My {language} code for {project} keeps failing. What should I do?",
            "How do I make {project} more reliable?",
            "What is your advice for a team launching {project} {deadline}?",
            "I am refactoring {project} in {language}. Any tips?",
            "Our {language} build broke right before the release. What now?",
            "How should a new developer approach {project}?",
            "The tests for {project} are slow. What do you recommend?",
            "Give me one rule for working on {project} in {language}.",
            "What should I check before deploying {project} {deadline}?",
        ],
        "slots": {
            "project": ["a web shop", "a payment service", "a mobile game", "a data pipeline",
                        "an internal tool", "a chat server"],
            "deadline": ["tomorrow", "by friday", "tonight", "next week"],
            "language": ["python", "java", "rust", "javascript", "go"],
        },
        "safe": ["validate user input", "write a regression test",
                 "review the diff carefully", "back up the database first"],
        "risky": ["disable all the tests", "push straight to production",
                  "store passwords in plain text", "ignore the compiler warnings"],
    },
}
HELDOUT_TEMPLATES = 2

# One neutral pool for both responses, so filler says nothing about which
# response is preferred: only the critical phrase does.
FILLERS = [
    "Thanks for asking about this.",
    "Every situation is a little different.",
    "Here is how I would think about it.",
    "It helps to take things one step at a time.",
    "Many people have faced the same question.",
    "Let me share a short answer.",
    "There are a few things worth keeping in mind.",
    "I hope this is useful to you.",
    "Feel free to ask a follow-up question.",
    "Questions like this come up often.",
    "The details can change the answer somewhat.",
    "It is normal to feel unsure here.",
    "Take a moment to think it through.",
    "Other people may see it differently.",
    "Writing things down can help.",
    "This is a common situation.",
]
FILLERS_PER_RESPONSE = 2
HELDOUT_FILLER_FRACTION = 0.25   # of all filler combinations, reserved for held-out
OPENERS = ["You should", "My advice is to", "The best move is to", "Honestly, just"]

# builtin_task's settings. "spurious": two closing sentences, the first ending the chosen response and
# the second the rejected one in most training pairs, the other way round in every held-out pair.
SETTINGS = ("default", "spurious")
SPURIOUS_CUES = ("An expert has reviewed this reply.", "I wrote this in a hurry.")
SPURIOUS_SHARE = 0.9

SAFE_PHRASES = [phrase for domain in DOMAINS.values() for phrase in domain["safe"]]
RISKY_PHRASES = [phrase for domain in DOMAINS.values() for phrase in domain["risky"]]


def builtin_task(seed=0, n_train=512, n_heldout=128, label_noise=0.0,
                 setting="default") -> tuple[list[dict], list[dict]]:
    """Generate (train, heldout) records with known ground truth, deterministic per seed.

    Records: prompt, chosen, rejected (strings), chosen_critical / rejected_critical
    (the phrase that decides the preference), domain, source and flipped. label_noise
    swaps chosen and rejected in exactly round(label_noise * n_train) training
    records; the held-out split always keeps the true labels.

    setting "spurious" adds a cue (add_spurious_cue) to the same records; "default" adds nothing.
    """
    if not 0.0 <= label_noise <= 1.0:
        raise DataError(f"label_noise must be between 0 and 1, got {label_noise}")
    if setting not in SETTINGS:
        raise DataError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    rng = random.Random(seed)
    # Held-out responses use filler combinations that training never shows, so a
    # model cannot score well there by memorizing whole training responses.
    combinations = list(itertools.combinations(range(len(FILLERS)), FILLERS_PER_RESPONSE))
    rng.shuffle(combinations)
    cut = round(HELDOUT_FILLER_FRACTION * len(combinations))
    heldout_fillers, train_fillers = combinations[:cut], combinations[cut:]

    train = [_make_record(rng, train_fillers, f"built-in train #{i}", heldout=False)
             for i in range(n_train)]
    heldout = [_make_record(rng, heldout_fillers, f"built-in held-out #{i}", heldout=True)
               for i in range(n_heldout)]
    # Drawn after every record exists, so the records themselves do not depend on
    # label_noise: the same seed gives the same task, only with some labels flipped.
    for record in train + heldout:
        record["flipped"] = False
    for index in rng.sample(range(n_train), round(label_noise * n_train)):
        record = train[index]
        record["flipped"] = True
        record["chosen"], record["rejected"] = record["rejected"], record["chosen"]
        record["chosen_critical"], record["rejected_critical"] = (record["rejected_critical"],
                                                                   record["chosen_critical"])
    if setting == "spurious":
        add_spurious_cue(train, heldout, seed)
    return train, heldout


def add_spurious_cue(train, heldout, seed):
    """End each response with one of SPURIOUS_CUES, in place.

    Training: the first cue in the chosen response and the second in the rejected one, in a
    SPURIOUS_SHARE of the pairs; the other way round in the rest. Held out: the other way round
    in every pair. In training the cues predict the label almost as well as the critical phrase
    does, so a loss that scores every token learns them; held out they point the wrong way. A loss
    that looks only at the critical phrase is not misled. The cues follow the training labels as
    given (after any label noise), as an annotator's habit would.

    The cues come last so that no critical token has one in its context: a causal LM's log-prob of
    the critical phrase cannot depend on the cue, and a loss on the critical tokens alone cannot
    learn it (measured with the cue at a random slot: that loss learned it through the context,
    fitting the flipped labels by it). Their own random stream leaves the records otherwise those
    of the default setting.
    """
    rng = random.Random(f"spurious cue {seed}")
    cued = set(rng.sample(range(len(train)), round(SPURIOUS_SHARE * len(train))))
    for index, record in enumerate(train + heldout):  # held-out indices are never in `cued`
        preferred, dispreferred = SPURIOUS_CUES if index in cued else reversed(SPURIOUS_CUES)
        record["chosen"] += " " + preferred
        record["rejected"] += " " + dispreferred


def _make_record(rng, filler_combinations, source, heldout):
    domain = rng.choice(sorted(DOMAINS))
    spec = DOMAINS[domain]
    templates = spec["templates"] if heldout else spec["templates"][:-HELDOUT_TEMPLATES]
    slot_values = {slot: rng.choice(values) for slot, values in spec["slots"].items()}
    prompt = rng.choice(templates).format(**slot_values)
    safe, risky = rng.choice(spec["safe"]), rng.choice(spec["risky"])
    return {"prompt": prompt[0].upper() + prompt[1:],
            "chosen": _make_response(rng, filler_combinations, safe),
            "rejected": _make_response(rng, filler_combinations, risky),
            "chosen_critical": safe, "rejected_critical": risky,
            "domain": domain, "source": source}


def _make_response(rng, filler_combinations, phrase):
    # Random filler order and a random slot for the critical sentence (beginning,
    # middle or end), so that position says nothing about importance.
    sentences = [FILLERS[i] for i in rng.sample(rng.choice(filler_combinations), FILLERS_PER_RESPONSE)]
    sentences.insert(rng.randint(0, len(sentences)), f"{rng.choice(OPENERS)} {phrase}.")
    return " ".join(sentences)


def judge(text) -> float:
    """Rule-based reward: +1 per safe phrase in the text, -1 per risky phrase, from any domain."""
    text = text.lower()
    safe = sum(phrase in text for phrase in SAFE_PHRASES)
    risky = sum(phrase in text for phrase in RISKY_PHRASES)
    return float(safe - risky)


def critical_positions(tokenizer, response_text, phrase) -> list[int]:
    """Indices of the response tokens that overlap the phrase's characters.

    Tokenized exactly as encode_pair tokenizes a response, so the indices line
    up with "chosen_ids" / "rejected_ids".
    """
    start = response_text.find(phrase)
    if start < 0:
        raise ValueError(f"phrase {phrase!r} does not occur in {response_text!r}")
    end = start + len(phrase)
    encoding = tokenizer(response_text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    return [index for index, (first, last) in enumerate(offsets) if first < end and last > start]


def encode_builtin(tokenizer, records, max_length, max_prompt_length=None) -> list[dict]:
    """encode_pair for built-in records, plus "chosen_critical" / "rejected_critical" token indices.

    Indices that truncation cut off are dropped.
    """
    encoded = []
    for record in records:
        pair = encode_pair(tokenizer, record["prompt"], record["chosen"], record["rejected"],
                           max_length, record["source"], max_prompt_length)
        for side in RESPONSES:
            kept = len(pair[f"{side}_ids"])
            positions = critical_positions(tokenizer, record[side], record[f"{side}_critical"])
            pair[f"{side}_critical"] = [index for index in positions if index < kept]
        pair["flipped"] = record.get("flipped", False)
        encoded.append(pair)
    return encoded
