"""IFEval in miniature on a real chat model: verifiable preferences made on-policy, DPO against TI-DPO.

    python -m tools.ifeval prefs --model models/smollm2 --output ifeval_prefs.jsonl
    python -m tools.ifeval eval --model runs/x/policy --output eval.json
    python -m tools.ifeval grid --model models/smollm2 --prefs ifeval_prefs.jsonl --seeds 0 1 2 --steps 32 \\
        --output docs/ifeval_runs.csv
    python -m tools.ifeval grid --report --output docs/ifeval_runs.csv

Each prompt is a base request (a task template on a topic, TEMPLATES x TOPICS) followed by one or two
instructions of IFEval's registry (lm_eval.tasks.ifeval), in the words that the instruction's own checker
builds from random arguments, and scored by that checker. The held-out prompts are built on topics that no
training prompt has (HELDOUT_TOPICS), so their base requests are never trained on.

prefs samples K responses per training prompt from the model itself (temperature 0.8, top-k 50, top-p
0.95), counts the instructions each follows, and keeps one pair per prompt: chosen a sample that follows
the most, rejected one that follows the fewest; a prompt whose samples all follow as many is a tie, and
dropped. It writes TRL's chat format (what train.py --data reads) with IFEval's instruction_id_list and
kwargs kept in each record.

eval scores greedy responses to the held-out prompts as IFEval does: prompt-level (every instruction of a
prompt followed) and instruction-level accuracy, strict and loose (loose: a response also counts as
following when it does with its first line, its last line or both removed, or without asterisks), per
instruction type too; then the diversity of K sampled responses per prompt (Distinct-2 and -4 over their
tokens, Self-BLEU among each prompt's samples) and the greedy responses' length.

grid runs train.main once per (method, seed) on the same preference file (tools/experiments.py's flags and
hooks of each method; "reference" is the model untrained, evaluated once), evaluates each saved policy, and
appends one row per cell to a CSV as soon as it is done: a grid that stops can be run again and skips the
cells it finished. It prints the means over seeds and each method's paired difference from DPO, seed by
seed, with 95% paired-t intervals.

The two instruction types that cannot be checked offline (LEFT_OUT) are left out everywhere; the rest are OFFLINE.
"""

import argparse
import contextlib
import csv
import functools
import io
import json
import logging
import os
import random
import shutil
import statistics
import sys
import time

import torch

import data
import train
from tools import experiments
from training import evaluate, sampling, setup

MISSING = ("error: IFEval's checkers come from lm_eval with its ifeval extra: "
           "pip install lm_eval==0.4.13 langdetect==1.0.9 immutabledict==4.3.1")

# ----------------------------------------------------------------------------- IFEval's instructions

# The 25 instruction types of IFEval's registry, less those whose checker needs nltk's punkt data, which
# no pip package ships and nltk would download: counting sentences (the punkt sentence splitter) and
# counting capitalised words (nltk.word_tokenize).
LEFT_OUT = {"length_constraints:number_sentences": "counts sentences with nltk's punkt data (a download)",
            "change_case:capital_word_frequency": "splits words with nltk's punkt_tab data (a download)"}
OFFLINE = ["keywords:existence", "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency",
           "language:response_language", "length_constraints:number_paragraphs", "length_constraints:number_words",
           "length_constraints:nth_paragraph_first_word", "detectable_content:number_placeholders",
           "detectable_content:postscript", "detectable_format:number_bullet_lists",
           "detectable_format:constrained_response", "detectable_format:number_highlighted_sections",
           "detectable_format:multiple_sections", "detectable_format:json_format", "detectable_format:title",
           "combination:two_responses", "combination:repeat_prompt", "startend:end_checker",
           "change_case:english_capital", "change_case:english_lowercase", "punctuation:no_comma",
           "startend:quotation"]
# Its checker is given the request to repeat (prompt_to_repeat): what the prompt says before this instruction.
REPEAT_PROMPT = "combination:repeat_prompt"


@functools.cache
def registry():
    """IFEval's instruction classes and conflicts (lm_eval.tasks.ifeval.instructions_registry), imported
    offline: on import its helper module asks nltk to download punkt_tab when it is missing, which is kept
    from going out (no checker of OFFLINE reads it). langdetect, which three checkers call, is seeded: it
    draws at random, and the same response must always get the same score. SystemExit with MISSING when
    lm_eval or its ifeval extra is not installed."""
    try:
        import langdetect
        import nltk
    except ImportError:
        raise SystemExit(MISSING) from None
    try:
        nltk.data.find("tokenizers/punkt_tab")
        offline = contextlib.nullcontext()
    except LookupError:
        offline = _no_download(nltk)
    try:
        with offline:
            from lm_eval.tasks.ifeval import instructions, instructions_registry
    except ImportError:
        raise SystemExit(MISSING) from None
    langdetect.DetectorFactory.seed = 0
    # A response whose language cannot be detected counts as following, as IFEval has it; each time, the
    # checker logs an error, which here would bury the progress lines.
    logging.getLogger(instructions.__name__).setLevel(logging.CRITICAL)
    return instructions_registry.INSTRUCTION_DICT, instructions_registry.INSTRUCTION_CONFLICTS


@contextlib.contextmanager
def _no_download(nltk):
    download = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its "Downloaded punkt_tab" line, which is not true
            yield
    finally:
        nltk.download = download


def conflicts(a, b):
    """Whether two instruction types may not share a prompt (IFEval's conflicts, either way round)."""
    table = registry()[1]
    return b in table.get(a, ()) or a in table.get(b, ())


def checker(instruction_id, kwargs):
    """IFEval's checker of one instruction with its arguments (a prompt's kwargs entry)."""
    instruction = registry()[0][instruction_id](instruction_id)
    instruction.build_description(**{k: v for k, v in kwargs.items() if v is not None})
    return instruction


def loose_variants(response):
    """The texts IFEval's loose score tries: the response, without its first line, without its last,
    without both, and each of the four with every asterisk removed."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [text.replace("*", "") for text in cut]


def follows(prompt, response, loose=False):
    """[bool] per instruction of `prompt` (a prompt record): whether `response` follows it. Strict: the
    response as it is; loose: any of loose_variants. An empty (blank) text follows nothing."""
    texts = loose_variants(response) if loose else [response]
    followed = []
    for instruction_id, kwargs in zip(prompt["instruction_id_list"], prompt["kwargs"]):
        check = checker(instruction_id, kwargs)
        followed.append(any(text.strip() and check.check_following(text) for text in texts))
    return followed


def accuracies(prompts, responses):
    """IFEval's scores of one response per prompt: prompt_level_{strict,loose}_acc (the share of prompts
    with every instruction followed), inst_level_{strict,loose}_acc (the share of instructions followed,
    over all prompts' instructions) and inst_level_{strict,loose}_acc/TYPE (the same, instructions of one
    type only; for the types that occur)."""
    result = {}
    for level in ("strict", "loose"):
        followed = [follows(prompt, response, loose=level == "loose") for prompt, response in zip(prompts, responses)]
        result[f"prompt_level_{level}_acc"] = statistics.mean(all(f) for f in followed)
        result[f"inst_level_{level}_acc"] = sum(map(sum, followed)) / sum(map(len, followed))
        by_type = {}
        for prompt, flags in zip(prompts, followed):
            for instruction_id, flag in zip(prompt["instruction_id_list"], flags):
                by_type.setdefault(instruction_id, []).append(flag)
        result.update({f"inst_level_{level}_acc/{t}": statistics.mean(by_type[t]) for t in OFFLINE if t in by_type})
    return result


# ----------------------------------------------------------------------------- the prompts

# Base requests: every template on every topic. Each topic fits every template.
TEMPLATES = ["Describe {topic} to someone who has never seen one.",
             "Explain how {topic} works, in plain words.",
             "List some facts about {topic} that most people do not know.",
             "Write a short note to a neighbour about {topic}.",
             "Write an email to a colleague about {topic}.",
             "Write a very short story in which {topic} plays a part.",
             "Give three tips to someone who wants to learn about {topic}.",
             "Write a description of {topic} for a children's book."]
TOPICS = ["a lighthouse", "a beehive", "a bicycle", "a vegetable garden", "a train station", "a volcano",
          "a public library", "a bakery", "a rain forest", "a sailing boat", "a windmill", "a coral reef"]
# The held-out prompts' topics: no training prompt is built on them, so no held-out base request is trained on.
HELDOUT_TOPICS = ["a windmill", "a coral reef", "a sailing boat"]
# The held-out prompts' seed: the same prompts for every policy and every grid.
HELDOUT_SEED = 12345


def base_requests(split):
    """The base requests of "train" or "heldout": TEMPLATES on the split's topics."""
    topics = [t for t in TOPICS if (t in HELDOUT_TOPICS) == (split == "heldout")]
    return [template.format(topic=topic) for topic in topics for template in TEMPLATES]


@contextlib.contextmanager
def seeded(seed):
    """Python's global `random` seeded inside the block (IFEval's checkers draw their arguments from it),
    and as it was after it."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def instruction_types(count):
    """`count` instruction types of OFFLINE, at random, none conflicting with another."""
    chosen = []
    while len(chosen) < count:
        free = [t for t in OFFLINE if not any(conflicts(t, c) for c in chosen)]
        if not free:
            break
        chosen.append(random.choice(free))
    return chosen


def describe(instruction_id, request):
    """(description, kwargs) of one instruction with random arguments, as its checker words it; `request`
    is what a repeat_prompt instruction asks to repeat. Arguments that the checker, rebuilt from them, would
    not keep (it draws again) are drawn anew: nth_paragraph_first_word's may ask for paragraph n + 1 of n,
    which a rebuild replaces by a random paragraph, so that the prompt and its score would disagree."""
    while True:
        instruction = registry()[0][instruction_id](instruction_id)
        given = {"prompt_to_repeat": request} if instruction_id == REPEAT_PROMPT else {}
        text = instruction.build_description(**given)
        kwargs = {k: v for k, v in (instruction.get_instruction_args() or {}).items() if v is not None}
        state = random.getstate()
        checker(instruction_id, kwargs)
        if random.getstate() == state:
            return text, kwargs


def build_prompts(n, split, seed):
    """n prompt records of IFEval's form, {"key", "prompt", "instruction_id_list", "kwargs"}, plus
    "base" (the base request), built on the split's base requests in a seeded order (n beyond their
    number goes round again, with other instructions): each base request, then one or two instructions'
    descriptions as their checkers word them from random arguments. The first n of a larger n are the same."""
    with seeded(seed):
        bases = random.sample(base_requests(split), len(base_requests(split)))
        prompts = []
        for key in range(n):
            base = bases[key % len(bases)]
            # the request to repeat is all that comes before its instruction, which comes last (as in IFEval)
            types = sorted(instruction_types(random.choice((1, 2))), key=lambda t: t == REPEAT_PROMPT)
            texts, arguments = [], []
            for instruction_id in types:
                text, kwargs = describe(instruction_id, " ".join([base, *texts]))
                texts.append(text)
                arguments.append(kwargs)
            prompts.append({"key": key, "prompt": " ".join([base, *texts]), "base": base,
                            "instruction_id_list": types, "kwargs": arguments})
    return prompts


def load_prompts(path):
    """Prompt records from a JSONL in IFEval's form (its input_data.jsonl, or prompts this tool wrote),
    less those with an instruction type outside OFFLINE, which are counted and named."""
    prompts, skipped = [], {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                outside = [t for t in record["instruction_id_list"] if t not in OFFLINE]
                for t in outside:
                    skipped[t] = skipped.get(t, 0) + 1
                if not outside:
                    prompts.append({"key": record.get("key", number), **record})
    if skipped:
        print(f"{path}: left out {len(skipped)} instruction types that cannot be checked offline "
              f"({', '.join(f'{t} {n}' for t, n in sorted(skipped.items()))} prompts); {len(prompts)} prompts kept")
    if not prompts:
        raise SystemExit(f"error: {path}: no prompt whose instructions can all be checked offline")
    return prompts


# ----------------------------------------------------------------------------- responses from a model


def load_model(folder):
    """(model, tokenizer, device, autocast) of a model folder, as train.py loads --model (float32 weights,
    bfloat16 autocast on CUDA); its tokenizer must have a chat template."""
    args = train.parse_args(["--model", str(folder)])
    device = setup.pick_device(args)
    tokenizer = setup.load_tokenizer(args)
    if getattr(tokenizer, "chat_template", None) is None:
        raise SystemExit(f"error: --model {folder}: its tokenizer has no chat template; IFEval's prompts are chat")
    return setup.build_model(args, device, tokenizer), tokenizer, device, setup.autocast_for(device, args)


def prompt_ids(tokenizer, text):
    """The token ids of a user turn and the assistant's header, as data.encode_pair tokenizes a rendered
    chat prompt (bos put in front unless the template has it)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    has_bos = tokenizer.bos_token is None or rendered.startswith(tokenizer.bos_token)
    return ids if has_bos else [tokenizer.bos_token_id] + ids


def responses(loaded, prompts, samples, temperature, max_new_tokens, batch_size, seed):
    """[[(text, token ids)] * samples] per prompt: responses from training/sampling.py's sampler
    (temperature 0: greedy; else with top-k 50 and top-p 0.95), the end of turn left out. Batch b is drawn
    from a random stream seeded by (seed, b): every model meets the same draws, and the caller's stream is
    left as it was."""
    model, tokenizer, device, autocast = loaded
    encoded = [prompt_ids(tokenizer, prompt["prompt"]) for prompt in prompts]
    rows = [ids for ids in encoded for _ in range(samples)]  # a prompt's samples side by side
    ends = set(sampling.end_ids(model, tokenizer))
    out = []
    for index, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(chunk):  # left-padded: every row continues at the end
            ids[row, width - len(prompt):], mask[row, width - len(prompt):] = torch.tensor(prompt), 1
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 1_000_003 + index)
            with autocast:
                sequences, _, response_mask = sampling.sample(
                    model, ids.to(device), mask.to(device), tokenizer, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_k=50, top_p=0.95)
        for sequence, kept in zip(sequences.cpu(), response_mask.cpu().bool()):
            tokens = [t for t in sequence[kept].tolist() if t not in ends]
            out.append((tokenizer.decode(tokens, skip_special_tokens=True), tokens))
    return [out[i * samples:(i + 1) * samples] for i in range(len(prompts))]


# ----------------------------------------------------------------------------- prefs


def pick_pair(followed):
    """(chosen, rejected) indices into one prompt's samples, or None for a tie. `followed`: per sample,
    the number of instructions it follows, None for an empty sample (no record can hold it). Chosen is
    the first sample that follows the most, rejected the first that follows the fewest."""
    scored = [(n, i) for i, n in enumerate(followed) if n is not None]
    if len(scored) < 2:
        return None
    best, worst = max(scored, key=lambda s: s[0]), min(scored, key=lambda s: s[0])
    return None if best[0] == worst[0] else (best[1], worst[1])


def make_prefs(args):
    """Write args.output (chat JSONL) and return the counts that the summary line prints."""
    prompts = build_prompts(args.prompts, "train", args.seed)
    loaded = load_model(args.model)
    sampled = responses(loaded, prompts, args.samples, 0.8, args.max_new_tokens, args.batch_size, args.seed)
    counts = {"prompts": len(prompts), "pairs": 0, "ties": 0, "too_few": 0, "empty": 0, "by_type": {}}
    with open(args.output, "w") as f:
        for prompt, samples in zip(prompts, sampled):
            flags = [follows(prompt, text) if text.strip() else None for text, _ in samples]
            counts["empty"] += flags.count(None)
            pair = pick_pair([None if f is None else sum(f) for f in flags])
            for t in prompt["instruction_id_list"]:
                counts["by_type"].setdefault(t, [0, 0])[1] += 1
            if pair is None:
                counts["too_few" if sum(f is not None for f in flags) < 2 else "ties"] += 1
                continue
            counts["pairs"] += 1
            for t in prompt["instruction_id_list"]:
                counts["by_type"][t][0] += 1
            chosen, rejected = pair
            record = {"prompt": [{"role": "user", "content": prompt["prompt"]}],
                      "chosen": [{"role": "assistant", "content": samples[chosen][0]}],
                      "rejected": [{"role": "assistant", "content": samples[rejected][0]}],
                      **{k: prompt[k] for k in ("key", "base", "instruction_id_list", "kwargs")},
                      "chosen_followed": flags[chosen], "rejected_followed": flags[rejected]}
            f.write(json.dumps(record) + "\n")
    by_type = ", ".join(f"{t} {kept}/{n}" for t, (kept, n) in sorted(counts["by_type"].items()))
    print(f"prefs: {counts['prompts']} prompts x {args.samples} samples: {counts['pairs']} pairs kept, "
          f"{counts['ties']} ties dropped, {counts['too_few']} with fewer than 2 non-empty samples "
          f"({counts['empty']} empty samples); pairs/prompts by type: {by_type}; wrote {args.output}")
    return counts


# ----------------------------------------------------------------------------- eval

HEADLINE = ["prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc",
            "distinct_2", "distinct_4", "self_bleu", "response_tokens"]


def diversity(sampled):
    """distinct_2, distinct_4 (training/evaluate.py's Distinct-n over every sample's tokens, pooled) and
    self_bleu (sacrebleu's Self-BLEU among each prompt's samples, 0-100, mean over the prompts; lower is
    more diverse) of [[(text, tokens)] per prompt]."""
    tokens = [t for samples in sampled for _, t in samples]
    return {"distinct_2": evaluate.distinct_n(tokens, 2), "distinct_4": evaluate.distinct_n(tokens, 4),
            "self_bleu": statistics.mean(evaluate.self_bleu([text for text, _ in samples]) for samples in sampled)}


def evaluate_model(folder, prompts, samples, max_new_tokens, batch_size, seed):
    """(metrics, per-prompt details) of the model in `folder` on prompt records: accuracies of its greedy
    responses, their mean length in tokens (response_tokens), and the diversity of `samples` responses per
    prompt at temperature 0.8 (drawn with `seed`'s random streams)."""
    loaded = load_model(folder)
    greedy = [only for (only,) in responses(loaded, prompts, 1, 0.0, max_new_tokens, batch_size, seed)]
    texts = [text for text, _ in greedy]
    metrics = {**accuracies(prompts, texts), "response_tokens": statistics.mean(len(t) for _, t in greedy)}
    metrics.update(diversity(responses(loaded, prompts, samples, 0.8, max_new_tokens, batch_size, seed)))
    details = [{**{k: p[k] for k in ("key", "prompt", "instruction_id_list", "kwargs")}, "response": text,
                "follow_strict": follows(p, text), "follow_loose": follows(p, text, loose=True)}
               for p, text in zip(prompts, texts)]
    return metrics, details


def metrics_table(metrics, prompts):
    """The headline metrics, then each instruction type's instruction-level accuracy, as markdown."""
    head = experiments.markdown(["metric", "value"], [[m, f"{metrics[m]:.3f}"] for m in HEADLINE])
    counts = [t for p in prompts for t in p["instruction_id_list"]]
    per_type = experiments.markdown(
        ["instruction type", "instructions", "strict", "loose"],
        [[t, str(counts.count(t)), *(f"{metrics[f'inst_level_{level}_acc/{t}']:.3f}" for level in ("strict", "loose"))]
         for t in OFFLINE if t in counts])
    return f"{head}\n{per_type}"


def eval_command(args):
    prompts = load_prompts(args.prompts) if args.prompts else build_prompts(args.heldout, "heldout", HELDOUT_SEED)
    metrics, details = evaluate_model(args.model, prompts, args.samples, args.max_new_tokens, args.batch_size,
                                      args.seed)
    print(f"{args.model} on {len(prompts)} held-out prompts "
          f"({args.prompts or 'built-in'}), greedy responses of up to {args.max_new_tokens} tokens:\n")
    print(metrics_table(metrics, prompts))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"model": str(args.model), "prompts": len(prompts), "metrics": metrics, "responses": details},
                      f, indent=1)
        print(f"wrote {args.output}")
    return metrics


# ----------------------------------------------------------------------------- grid

PREFERENCE = ["pref_accuracy", "pref_margin"]  # train.py's held-out preference numbers (--data's last 5%)
COLUMNS = (["method", "seed", "steps", "lr", *HEADLINE, *PREFERENCE]
           + [f"inst_level_{level}_acc/{t}" for level in ("strict", "loose") for t in OFFLINE]
           + ["train_seconds", "eval_seconds", "machine", "settings"])


def read_rows(path):
    """The CSV's finished cells as dicts (none when the file is missing)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path, row):
    """One finished cell, written at once; the header first when the file is new."""
    new = not os.path.isfile(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({c: row.get(c, "") for c in COLUMNS})


def machine():
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{experiments.cpu_name()}, {os.cpu_count()} cores; {gpu}; torch {torch.__version__}"


def cells(methods, seeds):
    """(method, seed) of every cell; "reference" once, at the first seed."""
    return [(m, s) for m in methods for s in (seeds[:1] if m == "reference" else seeds)]


def grid(args, train_flags):
    flags = [*train_flags, "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
             "--max-new-tokens", str(args.max_new_tokens), *(["--lr", str(args.lr)] if args.lr else [])]
    train.parse_args(["--model", args.model, *flags])  # a mistyped train.py flag stops here, not in a cell
    settings = json.dumps({"model": args.model, "prefs": args.prefs, "steps": args.steps, "flags": flags,
                           "heldout": args.heldout, "samples": args.samples})
    done = read_rows(args.output)
    other = {r["settings"] for r in done} - {settings}
    if other:
        raise SystemExit(f"error: {args.output} holds cells of other settings ({other.pop()}); these are {settings}: "
                         "give another --output")
    finished = {(r["method"], int(r["seed"])) for r in done}
    prompts = build_prompts(args.heldout, "heldout", HELDOUT_SEED)
    todo = [cell for cell in cells(args.methods, args.seeds) if cell not in finished]
    print(f"grid: {len(cells(args.methods, args.seeds))} cells, {len(todo)} to run ({len(finished)} already in "
          f"{args.output}); {args.steps} steps each, {len(prompts)} held-out prompts", flush=True)
    os.makedirs(args.runs_dir, exist_ok=True)
    for method, seed in todo:
        name = f"{method}-seed{seed}"
        run_dir = os.path.join(args.runs_dir, name)
        row = {"method": method, "seed": seed, "machine": machine(), "settings": settings}
        folder = args.model
        if method == "reference":
            row.update(steps=0, train_seconds=0.0)
        else:
            if os.path.exists(run_dir):  # a cell that did not finish: it runs again from the start
                shutil.rmtree(run_dir)
            argv = ["--model", args.model, "--data", args.prefs, *flags, *experiments.METHODS[method],
                    "--seed", str(seed), "--steps", str(args.steps), "--output-dir", run_dir]
            # tools/experiments.py's method_hooks also set the built-in task's label noise, which --data refuses
            hooks = train.Hooks(**experiments.HOOKS.get(method, {}))
            start = time.perf_counter()
            with open(run_dir + ".log", "w") as log, contextlib.redirect_stdout(log):
                result = train.main(argv, hooks=hooks)
            row.update(steps=args.steps, lr=train.parse_args(argv).lr, train_seconds=time.perf_counter() - start,
                       pref_accuracy=result["after"]["accuracy"], pref_margin=result["after"]["margin"])
            folder = os.path.join(run_dir, "policy")
        start = time.perf_counter()
        metrics, _ = evaluate_model(folder, prompts, args.samples, args.max_new_tokens, args.eval_batch_size, seed)
        row.update(metrics, eval_seconds=time.perf_counter() - start)
        append_row(args.output, row)
        print(f"{name}: prompt-level strict {metrics['prompt_level_strict_acc']:.3f}, instruction-level strict "
              f"{metrics['inst_level_strict_acc']:.3f} (training {row['train_seconds']:.0f} s, evaluation "
              f"{row['eval_seconds']:.0f} s)", flush=True)
    text = report(read_rows(args.output))
    print("\n" + text)
    return text


# The report's column titles
TITLES = {"prompt_level_strict_acc": "prompt strict", "inst_level_strict_acc": "instruction strict",
          "prompt_level_loose_acc": "prompt loose", "inst_level_loose_acc": "instruction loose",
          "distinct_2": "distinct-2", "distinct_4": "distinct-4", "self_bleu": "self-BLEU",
          "response_tokens": "tokens", "pref_accuracy": "pair accuracy", "pref_margin": "pair margin"}


def report(rows):
    """The means over seeds of each method's headline metrics, and each method's paired difference from
    DPO seed by seed, with its 95% paired-t interval (tools/experiments.py's), as markdown."""
    if not rows:
        raise SystemExit("error: no finished cells to report")
    metrics = HEADLINE + PREFERENCE
    records = [{"method": r["method"], "seed": int(r["seed"]), "after": {m: float(r[m]) for m in metrics if r[m]}}
               for r in rows]
    methods = sorted(dict.fromkeys(r["method"] for r in records), key=lambda m: m != "reference")  # reference first

    def mean_cell(method, metric):
        values = [r["after"][metric] for r in records if r["method"] == method and metric in r["after"]]
        return experiments.cell(values) if values else ""

    means = experiments.markdown(["method", "seeds", *(TITLES[m] for m in metrics)],
                                 [[m, str(sum(r["method"] == m for r in records)), *(mean_cell(m, x) for x in metrics)]
                                  for m in methods])
    steps = sorted({int(r["steps"]) for r in rows if r["method"] != "reference"})
    text = (f"Means over seeds (± standard deviation) of {len(rows)} cells, {' or '.join(map(str, steps)) or 'no'} "
            f"training steps; IFEval's accuracies of greedy responses to held-out prompts, the diversity of samples, "
            f"and train.py's held-out pairs (accuracy and margin of the DPO reward)\n\n{means}")
    trained = [m for m in methods if m != "reference"]
    reference = [r for r in records if r["method"] == "reference"]
    if reference and trained:
        # the one reference evaluation stands beside every seed, so tools/experiments.py's paired interval
        # over seeds is the interval of (method - reference)
        beside = records + [{**reference[0], "seed": seed} for seed in {r["seed"] for r in records}]
        table = [[m, *(from_reference(beside, x, m) for x in HEADLINE)] for m in trained]
        text += ("\nEach method minus the reference (the untrained model, one deterministic evaluation on the same "
                 "prompts): mean over seeds [95% t interval over seeds]\n\n"
                 + experiments.markdown(["method", *(TITLES[m] for m in HEADLINE)], table))
    if "dpo" in trained and len(trained) > 1:
        paired = experiments.paired_table(records, trained, [(TITLES[m], m, {}) for m in HEADLINE])
        text += ("\nPaired differences from DPO, seed by seed: mean [95% paired-t interval]; an interval that covers "
                 f"0 is not distinguishable from DPO\n\n{paired}")
    return text + "\n" + per_type(rows, methods)


def from_reference(records, metric, method):
    """"mean [95% interval]" of `method` minus the reference, or the one difference when one seed ran."""
    difference = experiments.paired_difference(records, metric, method, baseline="reference")
    if difference is None:
        mine = [r["after"][metric] for r in records if r["method"] == method]
        theirs = next(r["after"][metric] for r in records if r["method"] == "reference")
        return f"{mine[0] - theirs:+.3f}" if mine else ""
    mean, low, high, _ = difference
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def per_type(rows, methods):
    """Markdown: each instruction type's instruction-level strict accuracy, the mean over seeds of each method,
    for the types the held-out prompts have (a type with few instructions says little)."""
    settings = json.loads(rows[0]["settings"]) if rows[0].get("settings") else {}
    counts = ([t for p in build_prompts(settings["heldout"], "heldout", HELDOUT_SEED) for t in p["instruction_id_list"]]
              if "heldout" in settings else [])
    table = []
    for t in OFFLINE:
        key = f"inst_level_strict_acc/{t}"
        by_method = {m: [float(r[key]) for r in rows if r["method"] == m and r.get(key)] for m in methods}
        if any(by_method.values()):
            table.append([t, str(counts.count(t)) if counts else "",
                          *(f"{statistics.mean(v):.2f}" if v else "" for v in by_method.values())])
    return ("Instruction-level strict accuracy by instruction type, the mean over seeds\n\n"
            + experiments.markdown(["instruction type", "instructions", *methods], table))


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    defaults = train.HelpFormatter  # each flag's default, unless None (the help says what happens then)

    f = commands.add_parser("prefs", help="verifiable preference pairs sampled from the model itself",
                            formatter_class=defaults)
    f.add_argument("--model", required=True, help="a chat model folder (e.g. python -m tools.smollm2's)")
    f.add_argument("--output", required=True, help="the chat JSONL to write (train.py --data reads it)")
    f.add_argument("--prompts", type=int, default=256, help="training prompts (a GPU run: e.g. 2000)")
    f.add_argument("--samples", type=int, default=4, help="responses sampled per prompt (a GPU run: e.g. 8)")
    f.add_argument("--max-new-tokens", type=int, default=64, help="longest response (a GPU run: e.g. 512)")
    f.add_argument("--batch-size", type=int, default=16, help="responses sampled at a time (a GPU run: e.g. 128)")
    f.add_argument("--seed", type=int, default=0, help="seeds the prompts and the samples")

    e = commands.add_parser("eval", help="IFEval's scores of greedy responses to held-out prompts, and the "
                            "diversity of sampled ones", formatter_class=defaults)
    e.add_argument("--model", required=True, help="a chat model folder: a train.py run's OUTPUT/policy")
    e.add_argument("--prompts", default=None, help="a JSONL of prompts in IFEval's form (its input_data.jsonl "
                   "works, less the types left out); default: --heldout built-in held-out prompts")
    e.add_argument("--heldout", type=int, default=64, help="how many built-in held-out prompts "
                   "(a GPU run: e.g. 541, IFEval's size)")
    e.add_argument("--samples", type=int, default=4, help="responses sampled per prompt for the diversity (2 or more)")
    e.add_argument("--max-new-tokens", type=int, default=64, help="longest response "
                   "(a GPU run: e.g. 1280, lm_eval's for IFEval)")
    e.add_argument("--batch-size", type=int, default=16, help="responses generated at a time")
    e.add_argument("--seed", type=int, default=0, help="the samples' random streams")
    e.add_argument("--output", default=None, help="a JSON file for the metrics and every response")

    g = commands.add_parser("grid", help="methods x seeds on one preference file; a resumable CSV, means and "
                            "paired differences from DPO", formatter_class=defaults,
                            epilog="Any other flag goes to every train.py run (e.g. --lora-r 16, the same for every "
                            "method).\nThe defaults are sized for a 2-core CPU; a GPU run would use e.g. --steps 500 "
                            "--batch-size 16\n--max-length 1024 --max-new-tokens 256 --heldout 541 --eval-batch-size "
                            "128.")
    g.add_argument("--model", help="the chat model every method starts from (its reference)")
    g.add_argument("--prefs", help="the preference JSONL of the prefs command")
    g.add_argument("--methods", nargs="+", default=["reference", "dpo", "tidpo", "tidpo_no_triplet", "tidpo_release"],
                   choices=["reference", *experiments.METHODS], metavar="METHOD",
                   help="reference (no training) or tools/experiments.py's methods")
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds: training, anchors and samples")
    g.add_argument("--steps", type=int, default=32, help="TI-DPO/DPO steps per run")
    g.add_argument("--output", required=True, help="the CSV of finished cells (e.g. docs/ifeval_runs.csv)")
    g.add_argument("--report", action="store_true", help="only print the tables of --output's cells")
    g.add_argument("--runs-dir", default=os.path.join("runs", "ifeval"), help="each run's folder and log")
    g.add_argument("--batch-size", type=int, default=4, help="train.py's pairs per step")
    g.add_argument("--max-length", type=int, default=256, help="train.py's prompt + response tokens")
    g.add_argument("--max-new-tokens", type=int, default=64, help="the anchors' and the evaluated responses' length")
    g.add_argument("--lr", type=float, default=None, help="train.py's --lr (default: train.py's, 1e-6 with --model)")
    g.add_argument("--heldout", type=int, default=64, help="built-in held-out prompts evaluated")
    g.add_argument("--samples", type=int, default=4, help="responses sampled per prompt for the diversity")
    g.add_argument("--eval-batch-size", type=int, default=16, help="responses generated at a time")
    args, rest = p.parse_known_args(argv)
    if args.command != "grid" and rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "grid" and not args.report and not (args.model and args.prefs):
        p.error("grid needs --model and --prefs (or --report)")
    if getattr(args, "samples", 2) < 2:
        p.error("--samples must be 2 or more: a pair, and Self-BLEU, need two samples of a prompt")
    return args, rest


def main(argv=None):
    args, rest = parse_args(sys.argv[1:] if argv is None else list(argv))
    registry()  # lm_eval's checkers, or the message saying what to install
    if args.command == "prefs":
        return make_prefs(args)
    if args.command == "eval":
        return eval_command(args)
    if args.report:
        text = report(read_rows(args.output))
        print(text)
        return text
    return grid(args, rest)


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:
        sys.exit(f"error: {error}")
