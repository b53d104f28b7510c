"""A run's set-up, before its first step: the flag checks, the device, the tokenizer, the pairs
and the model, and the first-run checks that stop or warn before anything is written.

train.py calls these in its set-up phase; tools/experiments.py and tools/bench.py reuse them.
"""

import json
import os
from contextlib import nullcontext

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import data
from data import FIELDS, DataError
from training import distributed, lora, tracking
from training.builtin_task import builtin_task, encode_builtin
from training.hf_datasets import load_records

# ------------------------------------------------------------------ the flags

# the flags that have a lowest value, and that value
AT_LEAST = {"steps": 1, "batch_size": 1, "grad_accum": 1, "gamma": 0, "margin": 0, "kl_alpha": 0,
            "max_new_tokens": 1, "warmup_steps": 0, "sft_steps": 0,
            "log_every": 1, "save_every": 0, "lora_r": 0, "eval_every": 0}


def check_args(p, args):
    """train.py's parsed flags, checked: a bad value stops with the usage error of `p` (the parser),
    not as a crash later. Fills in --lr's default, which depends on --model."""
    if args.lr is None:
        args.lr = 1e-6 if args.model else 5e-4
    if args.max_prompt_length is None:  # TRL's default and the DPO reference code's: half
        args.max_prompt_length = args.max_length // 2
    for name, lowest in AT_LEAST.items():
        value = getattr(args, name)
        if value is not None and not value >= lowest:
            p.error(f"--{name.replace('_', '-')} must be at least {lowest}, got {value}")
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    tracking.check_report_to(args.report_to)
    for wrong, message in [
        (not args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (not args.beta > 0, f"--beta must be positive, got {args.beta}"),
        (not 0 <= args.lam <= 1, f"--lam must be between 0 and 1, got {args.lam}"),
        (not 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (not args.temperature >= 0,
         f"--temperature must be at least 0 (0: greedy), got {args.temperature}"),
        (args.max_length < 2, "--max-length must be at least 2 (a prompt and a response token), "
                              f"got {args.max_length}"),
        (args.max_length >= 2 and not 1 <= args.max_prompt_length < args.max_length,
         f"--max-prompt-length must be at least 1 and below --max-length {args.max_length} (the "
         f"responses need the rest), got {args.max_prompt_length}"),
        (args.batch_size < world_size, f"--batch-size {args.batch_size} is smaller than the "
         f"{world_size} processes: each process needs at least one pair of every micro-batch"),
        (args.fsdp and args.sampler in ("static", "graph"), f"--sampler {args.sampler} cannot run "
         "a sharded model (--fsdp): its shadow copy needs whole weights; use --sampler dynamic"),
        (args.fsdp and args.lora_r, "--lora-r cannot be combined with --fsdp: LoRA keeps one copy of "
         "the weights, which fits one GPU; leave --fsdp out (torchrun without --fsdp runs DDP)"),
        (args.lora_r and not lora.peft_installed(), f"--lora-r {args.lora_r} needs the peft package "
         "(pip install peft==0.21.2); leave --lora-r out (0) for full fine-tuning"),
    ]:
        if wrong:
            p.error(message)
    return args


# ------------------------------------------------------------------ the device, and what the phases share


def pick_device(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: PyTorch sees no CUDA device here (torch "
                         f"{torch.__version__}); leave --device out, or use --device cpu")
    return device


def autocast_for(device, args):
    """bfloat16 autocast on CUDA (unless --fp32); plain float32 on the CPU."""
    use_bf16 = device.type == "cuda" and not args.fp32
    return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()


class Run:
    """What the phases share: the device and its autocast, this process's rank among world_size,
    the caller's hooks (train.Hooks), the run's command line (`argv`, for the line that says how
    to continue a stopped run), and the log (printed by rank 0, and kept in metrics.jsonl and
    --report-to's tracker once the output folder exists)."""

    def __init__(self, args, hooks, argv=()):
        torch.manual_seed(args.seed)
        self.rank, self.world_size, self.device = distributed.setup(pick_device(args), args.fsdp)
        self.autocast = autocast_for(self.device, args)
        self.hooks, self.argv, self.metrics_path, self.tracker = hooks, list(argv), None, None

    def start_log(self, args, resume):
        """Keep the log in <output-dir>/metrics.jsonl (a resumed run's without the steps after its
        checkpoint, which it logs again) and in --report-to's tracker (rank 0)."""
        self.metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        if self.rank == 0:
            if resume:
                tracking.trim_metrics(self.metrics_path, resume["step"])
            self.tracker = tracking.open_tracker(args, resume)

    def log(self, line, record=None):
        """Print `line` (None: nothing) and keep `record`."""
        if self.rank != 0:  # every process computes the same numbers; one of them reports
            return
        if line is not None:
            print(line, flush=True)
        if record is not None and self.metrics_path:
            with open(self.metrics_path, "a") as metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
            if self.tracker:
                self.tracker.log(record)

    def close(self):
        """Close the tracker (its last records written); the run is over."""
        if self.tracker:
            self.tracker, tracker = None, self.tracker
            tracker.close()


# ------------------------------------------------------------------ the tokenizer, the pairs, the model


def build_tokenizer(texts) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on texts; ids 0-3 are <pad>, <eos>, <bos>, <unk>.

    Whole words make every critical phrase an exact run of tokens. The tokenizer
    adds no special tokens itself; encode_pair puts BOS in front of each prompt.
    """
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()   # words and punctuation runs
    # The trainer orders words by count, ties alphabetically: the same texts give the same ids.
    tokenizer.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def from_pretrained(auto_class, name, **options):
    """auto_class.from_pretrained(name), or a one-line error naming --model and what went wrong."""
    if name.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise SystemExit(f"error: --model {name}: no such folder (a hub name looks like 'org/name')")
    folder = os.path.expanduser(name)
    if (os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "config.json"))
            and os.path.isfile(os.path.join(folder, "policy", "config.json"))):
        raise SystemExit(f"error: --model {name}: a train.py run folder; the model it trained is "
                         f"{os.path.join(name, 'policy')}")
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # a bar would interleave with the run's log lines
    try:
        return auto_class.from_pretrained(name, **options)
    except (OSError, ValueError) as error:  # no such folder or hub name, no network, not a causal LM
        raise SystemExit(f"error: --model {name}: cannot load it with {auto_class.__name__}: {error}")


def load_tokenizer(args, task=None):
    """The model's own tokenizer (eos as its pad token if it has none), or, for the tiny model built
    from scratch, a word-level tokenizer trained on the run's texts (the built-in task, or the --data
    and --eval-data records), so that every word of the data has a token and none is <unk>.
    `task`: builtin_task's keyword arguments (tools/experiments.py's settings)."""
    if args.model is not None:
        from transformers import AutoTokenizer

        tokenizer = from_pretrained(AutoTokenizer, args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if args.data is None:
        train, heldout = builtin_task(seed=args.seed, setting=(task or {}).get("setting", "default"))
        records = train + heldout
    else:
        records = load_records(args.data) + (load_records(args.eval_data, "test") if args.eval_data else [])
        conversational = [r["source"] for r in records if not isinstance(r["prompt"], str)]
        if conversational:
            raise DataError(f"{conversational[0]}: the record is conversational (lists of messages), but the "
                            "tiny model's tokenizer, trained from scratch, has no chat template: give --model, "
                            "whose tokenizer has one, or use plain-text records")
    return build_tokenizer([r[field] for r in records for field in FIELDS])


def load_pairs(args, tokenizer, task=None):
    """Encoded (train, held-out) pairs, lists of encode_pair dicts: the built-in task's splits (with
    `task`'s settings), or --data and --eval-data, or --data's last 5% (1 to 256 records) held out."""
    if args.data is None:
        train, heldout = builtin_task(seed=args.seed, **(task or {}))
        return tuple(encode_builtin(tokenizer, split, args.max_length, args.max_prompt_length)
                     for split in (train, heldout))
    if task:
        raise DataError(f"{args.data}: the built-in task's settings ({', '.join(task)}) cannot be used with --data")

    def encode(records):
        return [data.encode_pair(tokenizer, *data.render(tokenizer, r), args.max_length, r["source"],
                                 args.max_prompt_length) for r in records]

    records = load_records(args.data)
    if args.eval_data:
        return encode(records), encode(load_records(args.eval_data, "test"))
    if len(records) < 2:
        raise DataError(f"{args.data}: needs at least 2 records (one is held out), or --eval-data")
    n_heldout = min(256, max(1, len(records) // 20))
    return encode(records[:-n_heldout]), encode(records[-n_heldout:])


def build_model(args, device, tokenizer, rank=0):
    """The policy: --model by hub name or folder, or a tiny Llama built from a config. A sharded
    run (--fsdp) loads --model on rank 0's CPU only, the other processes on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model and args.fsdp:
        if rank != 0:  # the architecture without its weights, which rank 0 sends later
            with torch.device("meta"):
                config = from_pretrained(AutoConfig, args.model)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            # the checkpoint's own end ids and sampling defaults, as from_pretrained reads them
            model.generation_config = generation_config(args.model, model.generation_config)
            return model
        device = torch.device("cpu")
    if args.model:
        # float32 weights whatever the checkpoint's dtype: in bfloat16, lr 1e-6 updates round away
        policy = from_pretrained(AutoModelForCausalLM, args.model, dtype=torch.float32)
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                             max_position_embeddings=512, tie_word_embeddings=True,
                             pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        policy = LlamaForCausalLM(config)
    # Dropout stays off for good: the attribution and log-probs must be reproducible forwards.
    return policy.to(device).eval()


def generation_config(name, default):
    """The generation_config.json of --model `name`, or `default` for a checkpoint without one."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(name)
    except OSError:  # no such file: from_pretrained keeps the config's defaults too
        return default


def model_note(args, autocast):
    """The model line's start: the built-in model, or --model with the dtype its checkpoint was
    saved in and the one it trains in (float32 weights, under bfloat16 autocast on CUDA)."""
    if args.model is None:
        return "tiny Llama (built-in)" + (f", tokenizer trained on {args.data}" if args.data else "")
    from transformers import AutoConfig

    saved = str(from_pretrained(AutoConfig, args.model).dtype or torch.float32).removeprefix("torch.")
    autocast_dtype = isinstance(autocast, torch.autocast) and str(autocast.fast_dtype).removeprefix("torch.")
    under = f" under {autocast_dtype} autocast" if autocast_dtype else ""
    return f"{args.model} (saved in {saved}, trained in float32{under})"


def check_fit(args, config, train_pairs, heldout_pairs, steps):
    """Before anything is written: stop a run whose sequences a model with absolute positions
    (GPT-2) cannot hold, and the warnings (lines of text) a user should see first: sequences past a
    rotary model's trained length, pairs cut to --max-length, fewer steps than warmup steps, and a
    held-out set too small for its accuracy to mean much."""
    longest_pair = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))
                       for p in train_pairs + heldout_pairs)
    longest_prompt = max(len(p["prompt_ids"]) for p in train_pairs + heldout_pairs)
    need = max(longest_pair, longest_prompt + args.max_new_tokens)  # sampled: prompt + new tokens
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    rotary = any(getattr(config, name, None) is not None for name in ("rope_parameters", "rope_theta"))
    warnings = []
    if positions and need > positions:
        what = (f"the longest pair takes {longest_pair} tokens and the longest prompt plus --max-new-tokens "
                f"{args.max_new_tokens} takes {longest_prompt + args.max_new_tokens}")
        if not rotary:
            raise SystemExit(f"error: the model has {positions} positions and {what}: lower --max-length "
                             f"(now {args.max_length}) or --max-new-tokens")
        warnings.append(f"warning: the model was trained on {positions} positions and {what}: past them a "
                        "rotary model's numbers are untested")
    warnings += cut_report(train_pairs, args.max_length, "training", args.max_prompt_length)
    warnings += cut_report(heldout_pairs, args.max_length, "held-out", args.max_prompt_length)
    if steps < args.warmup_steps:
        warnings.append(f"warning: the run has {steps} steps, fewer than --warmup-steps {args.warmup_steps}: the "
                        f"learning rate never reaches --lr; lower --warmup-steps or train longer (--steps)")
    if len(heldout_pairs) < 20:
        warnings.append(f"warning: {len(heldout_pairs)} held-out pairs: the held-out accuracy moves in steps of "
                        f"1/{len(heldout_pairs)}; give --eval-data, or more records to --data")
    return warnings


def cut_report(pairs, max_length, what, max_prompt_length):
    """Warnings (lines of text) about the pairs that encode_pair cut to fit max_length: how many,
    how many prompts lost their oldest tokens, how many responses their last ones (their end
    token with them: then Eq. 5's target sits mid-response), and prompts cut to almost nothing."""
    cut = [pair["cut"] for pair in pairs if "cut" in pair and any(pair["cut"])]
    if not cut:
        return []
    prompts = sum(1 for c in cut if c[0])
    responses = sum(1 for c in cut for side in c[1:] if side)
    lines = [f"warning: {len(cut)} of {len(pairs)} {what} pairs are longer than --max-length {max_length} and "
             f"were cut: {prompts} prompts lost their oldest tokens (keeping at least their last "
             f"--max-prompt-length {max_prompt_length}), {responses} of {2 * len(pairs)} responses their last "
             f"tokens, their end token with them (Eq. 5's target then sits mid-response); a larger --max-length "
             f"keeps them whole"]
    short = sum(1 for pair in pairs if "cut" in pair and pair["cut"][0] and len(pair["prompt_ids"]) < 4)
    if short:
        lines.append(f"warning: {short} {what} prompts were cut to fewer than 4 tokens (--max-prompt-length "
                     f"{max_prompt_length}): the model sees almost nothing of what it answers")
    return lines
