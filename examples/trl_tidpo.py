"""TI-DPO in TRL: a DPOTrainer whose loss is tidpo.py's, and a short run of it.

    python examples/trl_tidpo.py                          # built-in task, tiny Llama, offline, CPU is enough
    python examples/trl_tidpo.py --model Qwen/Qwen2.5-0.5B-Instruct --data prefs.jsonl
    accelerate launch --num_processes 2 examples/trl_tidpo.py --model ... --data ...     # DDP on 2 GPUs
    torchrun --nproc_per_node 2 examples/trl_tidpo.py                                   # DDP on CPUs (gloo)

TIDPOTrainer is TRL's DPOTrainer (written for trl 1.16) with one method replaced. TRL still does
everything around the loss: tokenizing and batching the data, the reference model, optimizer and
schedule, accelerate (devices, DDP, mixed precision), logging and checkpoints. The loss is TI-DPO's,
built from tidpo.py's functions, in this order:

    anchors   one response per prompt, sampled from the current policy without gradient (the
              triplet's anchor, Eq. 13), when gamma > 0
    forwards  one reference forward and one policy forward over the chosen, rejected and anchor rows;
              the policy's forward is tidpo.gradient_attribution's, which also returns the token
              importance of Eq. 5-6 (one backward to the input embeddings, no second forward)
    weights   tidpo.hybrid_weights (Eq. 8) of the chosen and rejected rows
    loss      tidpo.tidpo_loss: the weighted margin (Eq. 11-12), the triplet (Eq. 13) on the per-token
              log-ratios of anchor, chosen and rejected rows, all with gradient, and optionally TDPO2's
              KL (tidpo.sequence_kl; training/memory.py's bounded-memory token_logps and sequence_kl are
              the same formulas for large vocabularies)

The hook. In trl 1.16, DPOTrainer.compute_loss calls `_compute_loss(model, inputs, return_outputs)`,
which turns one collated batch into the loss and records the metrics. No narrower hook exists: the
log-probs, the loss and the metrics are all computed inside it (the `concatenated_forward` and
`dpo_loss` methods of older TRL releases are gone). It is private, so a TRL release may rename it or
stop calling it, and an override that nobody calls would train plain DPO without a word. So
`check_trl_hook` runs first in TIDPOTrainer.__init__ and raises a RuntimeError, naming the hook and
the installed TRL version, unless the hook exists, takes (model, inputs, return_outputs) and is what
compute_loss calls.

Tokens (BOS). This path tokenizes the way TRL does: a prompt gets exactly the special tokens the
tokenizer itself adds (a BOS for Llama-style tokenizers, none for Qwen's or for the built-in
word-level tokenizer), and TRL appends the tokenizer's EOS to each plain-text response (a chat
template ends conversational ones). train.py, through
data.encode_pair, always puts a BOS in front of the prompt; with the built-in tokenizer the ids
here are encode_pair's without that first BOS. The SFT of the built-in run below trains on the very
ids the preference training sees, so reference and policy share this one convention.

Logged names are TRL's: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (beta
times the WEIGHTED log-ratios of Eq. 11; with uniform weights they are TRL's), logps/chosen,
logps/rejected (summed policy log-probs), and TI-DPO's loss/dpo_w, loss/triplet, the triplet's
diagnostics (triplet/distance_chosen, triplet/distance_rejected, triplet/active, triplet/logratio_*),
loss/kl (with kl_alpha) and anchors/mean_length.

Refused at start-up, rather than silently dropped by the replaced loss: loss_type other than
["sigmoid"], loss_weights, ld_alpha, f_divergence_type, use_weighting, label_smoothing,
precompute_ref_log_probs (it stores summed reference log-probs, the weights need them per token),
disable_dropout=False (attribution and log-probs must be reproducible forwards), a reference that is
only a disabled PEFT adapter, a MoE router loss, image data, FSDP and DeepSpeed ZeRO-3 (the
attribution looks the input embeddings up outside the wrapped forward, where those two keep the
weights sharded).
"""

import argparse
import dataclasses
import inspect
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import trl
from transformers import GenerationConfig, TrainerCallback
from transformers.modeling_outputs import CausalLMOutput
from trl import DPOConfig, DPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tidpo.py and data.py sit one folder up
import data  # noqa: E402
import tidpo  # noqa: E402
from training import memory, setup  # noqa: E402
from training.builtin_task import builtin_task  # noqa: E402
from training.plain_sampler import end_ids  # noqa: E402

HOOK = "_compute_loss"
HOOK_PARAMETERS = ["self", "model", "inputs", "return_outputs"]


def check_trl_hook():
    """Raise a RuntimeError unless DPOTrainer still computes its loss in the method overridden here."""
    hook = vars(DPOTrainer).get(HOOK)
    compute_loss = getattr(inspect.unwrap(DPOTrainer.compute_loss), "__code__", None)
    if hook is None:
        problem = "DPOTrainer has no such method"
    elif list(inspect.signature(hook).parameters) != HOOK_PARAMETERS:
        problem = f"its parameters are now {inspect.signature(hook)}"
    elif compute_loss is None or HOOK not in compute_loss.co_names:
        problem = "DPOTrainer.compute_loss no longer calls it"
    else:
        return
    raise RuntimeError(
        f"trl {trl.__version__}: TIDPOTrainer overrides DPOTrainer.{HOOK}(model, inputs, return_outputs), as "
        f"in trl 1.16, but {problem}. Training would silently be plain DPO. Install trl==1.16.0 or port the "
        f"override to this TRL version.")


@dataclasses.dataclass
class TIDPOConfig(DPOConfig):
    """DPOConfig plus TI-DPO's settings, named as train.py's flags. beta is DPOConfig's."""

    weights: str = "hybrid"              # hybrid: Eq. 8; uniform: all 1 (with gamma 0 and kl_alpha 0, DPO)
    lam: float = 0.7                     # lambda of Eq. 8: the attribution's share, 1 - lam the prior's
    weight_scale: str = "mean"           # mean: weights average 1 over a response; sum: Eq. 8 as written
    gamma: float = 0.1                   # weight of the triplet loss (0: no triplet, no anchors)
    margin: float = 0.01                 # alpha of Eq. 13
    kl_alpha: float = 0.0                # TDPO2's sequential KL, as the authors' release (0.5); 0 is Eq. 14
    # Anchor sampling, as in the authors' release (temperature 0: greedy)
    anchor_max_new_tokens: int = 64
    anchor_temperature: float = 0.8
    anchor_top_k: int = 50
    anchor_top_p: float = 0.95

    def __post_init__(self):
        super().__post_init__()
        for wrong, message in [
            (self.weights not in ("hybrid", "uniform"), f"weights must be hybrid or uniform, got {self.weights!r}"),
            (self.weight_scale not in ("mean", "sum"), f"weight_scale must be mean or sum, got {self.weight_scale!r}"),
            (not 0 <= self.lam <= 1, f"lam must be between 0 and 1, got {self.lam}"),
            (not self.gamma >= 0, f"gamma must be at least 0, got {self.gamma}"),
            (not self.margin >= 0, f"margin must be at least 0, got {self.margin}"),
            (not self.kl_alpha >= 0, f"kl_alpha must be at least 0, got {self.kl_alpha}"),
            (self.anchor_max_new_tokens < 1, f"anchor_max_new_tokens must be at least 1, got "
                                             f"{self.anchor_max_new_tokens}"),
            (not self.anchor_temperature >= 0, f"anchor_temperature must be at least 0 (0: greedy), got "
                                               f"{self.anchor_temperature}"),
            (not 0 < self.anchor_top_p <= 1, f"anchor_top_p must be in (0, 1], got {self.anchor_top_p}"),
            # DPOConfig settings that only TRL's own loss reads: refused rather than silently ignored
            (self.loss_type != ["sigmoid"], f"loss_type={self.loss_type}: TI-DPO's loss replaces TRL's"),
            (self.loss_weights not in (None, [1.0]), f"loss_weights={self.loss_weights}: TI-DPO's loss replaces "
                                                     "TRL's"),
            (self.ld_alpha is not None, "ld_alpha (LD-DPO) is not part of TI-DPO"),
            (self.f_divergence_type != "reverse_kl", f"f_divergence_type={self.f_divergence_type!r} is not part of "
                                                     "TI-DPO"),
            (self.use_weighting, "use_weighting (WPO) is not part of TI-DPO"),
            (self.label_smoothing != 0, "label_smoothing is not part of TI-DPO"),
            (self.precompute_ref_log_probs, "precompute_ref_log_probs stores summed reference log-probs; TI-DPO's "
                                            "token weights need them per token"),
            (not self.disable_dropout, "disable_dropout=False: attribution and log-probs must be reproducible "
                                       "forwards"),
        ]:
            if wrong:
                raise ValueError(f"TIDPOConfig: {message}")


class TIDPOTrainer(DPOTrainer):
    """DPOTrainer with the TI-DPO loss (see the module docstring). Takes DPOTrainer's arguments, with
    `args` a TIDPOConfig."""

    _tag_names = ["trl", "dpo", "ti-dpo"]
    _name = "TI-DPO"

    def __init__(self, model, ref_model=None, args=None, **kwargs):
        check_trl_hook()  # first: before tokenizing and model loading are spent on a run that would be DPO
        if not isinstance(args, TIDPOConfig):
            raise TypeError(f"TIDPOTrainer needs args=TIDPOConfig(...), got {type(args).__name__}")
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        zero_stage = self.accelerator.state.deepspeed_plugin.zero_stage if self.is_deepspeed_enabled else None
        for wrong, message in [
            (self.ref_model is None, "there is no reference model to run (a PEFT model without ref_model); pass "
                                     "ref_model"),
            (self.is_fsdp_enabled or zero_stage == 3, "FSDP and DeepSpeed ZeRO-3 keep the weights sharded outside "
                                                     "the model's forward, where the attribution looks up the input "
                                                     "embeddings; use DDP or ZeRO-1/2"),
            (self.aux_loss_enabled, "this MoE model adds a router loss that TI-DPO's loss leaves out; set "
                                    "router_aux_loss_coef=0 to train without it"),
            (self._is_vision_dataset, "image data is not supported"),
        ]:
            if wrong:
                raise ValueError(f"TIDPOTrainer: {message}")
        tokenizer = self.processing_class
        self.pad_token_id = tokenizer.pad_token_id
        # An anchor ends at any end id: the tokenizer's eos and those of the model's generation config
        # (Llama 3 lists <|eot_id|> and <|end_of_text|>, Qwen2.5 <|im_end|> and <|endoftext|>).
        self.end_ids = list(end_ids(self.model, tokenizer))
        sampling = dict(do_sample=True, temperature=args.anchor_temperature, top_k=args.anchor_top_k,
                        top_p=args.anchor_top_p) if args.anchor_temperature > 0 else dict(do_sample=False)
        self.anchor_generation = GenerationConfig(max_new_tokens=args.anchor_max_new_tokens, **sampling,
                                                  pad_token_id=self.pad_token_id, eos_token_id=self.end_ids)

    def _compute_loss(self, model, inputs, return_outputs):
        """The TI-DPO loss of one collated batch; records the metrics the way DPOTrainer does."""
        mode = "train" if self.model.training else "eval"
        args = self.args
        # TRL's collator: rows 0..n-1 are prompt + chosen, rows n..2n-1 prompt + rejected, right-padded.
        # Its completion_mask, 1 on response tokens, is tidpo.py's response_mask.
        pairs = (inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        n = pairs[0].shape[0] // 2
        if args.gamma != 0:
            prompts = left_padded_prompts(pairs[0][:n], pairs[2][:n], self.pad_token_id)
            anchors = self.sample_anchors(model, *prompts)
            # One forward per model over all rows: the wrapped (DDP) model must see one forward per backward.
            input_ids, attention_mask, response_mask = stack_right_padded([pairs, anchors], self.pad_token_id)
        else:
            input_ids, attention_mask, response_mask = pairs
        forward_inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=tidpo.position_ids(attention_mask), use_cache=False)

        with torch.no_grad():
            ref_logits = self.ref_model(**forward_inputs).logits
        ref_logps = memory.token_logps(ref_logits, input_ids, response_mask)
        if args.kl_alpha == 0:
            ref_logits = None  # [rows, L, V]: free it before the policy's forward needs the memory

        if args.weights == "hybrid":
            # Evaluation runs under no_grad, and the attribution needs its backward to the embeddings.
            with torch.enable_grad():
                logits, importance = tidpo.gradient_attribution(
                    PolicyForward(model, self.accelerator.unwrap_model(model)), input_ids, attention_mask,
                    response_mask)
            weights = tidpo.hybrid_weights(importance[:2 * n], response_mask[:2 * n], lam=args.lam,
                                           scale=args.weight_scale)
        else:
            logits = model(**forward_inputs).logits
            weights = response_mask[:2 * n].float()
        logps = memory.token_logps(logits, input_ids, response_mask)

        # Eq. 13's anchor: its per-token, unweighted log-ratios, with gradient through the policy's log-probs
        anchor = {}
        if args.gamma != 0:
            anchor = {"anchor_logratios": logps[2 * n:] - ref_logps[2 * n:], "anchor_mask": response_mask[2 * n:],
                      "chosen_mask": response_mask[:n], "rejected_mask": response_mask[n:2 * n]}
        kl = {}
        if args.kl_alpha != 0:
            kl_both = memory.sequence_kl(logits[:2 * n], ref_logits[:2 * n], response_mask[:2 * n])
            kl = {"kl_chosen": kl_both[:n], "kl_rejected": kl_both[n:]}
        loss, metrics = tidpo.tidpo_loss(
            logps[:n], logps[n:2 * n], ref_logps[:n], ref_logps[n:2 * n], weights[:n], weights[n:], beta=self.beta,
            gamma=args.gamma, margin=args.margin, kl_alpha=args.kl_alpha, **anchor, **kl)
        if kl:  # inside loss/dpo_w; logged apart, so that a bad KL can be told from a bad margin
            metrics["loss/kl"] = (args.kl_alpha * (kl["kl_rejected"] - kl["kl_chosen"])).detach().mean()
        if args.gamma != 0:
            metrics["anchors/mean_length"] = response_mask[2 * n:].sum(-1).float().mean()
        for name, value in metrics.items():  # batch means, averaged over the processes
            self._metrics[mode][name].append(self.accelerator.gather(value).mean().item())
        if return_outputs:  # only for a compute_metrics function, which gets the chosen and rejected logits
            return loss, CausalLMOutput(loss=loss, logits=logits[:2 * n].detach())
        return loss

    @torch.no_grad()
    def sample_anchors(self, model, prompt_ids, prompt_mask):
        """One response per left-padded prompt from the current policy, as (input_ids, attention_mask,
        response_mask) of prompt + response, left-padded like the prompts; a response ends at its
        first end id (included), and what generate() wrote after it becomes padding.

        Uses transformers' generate(), with this trainer's anchor_* settings, rather than train.py's
        hand-written sampler: TRL users know generate(), and it handles every architecture.
        """
        policy = self.accelerator.unwrap_model(model)  # generate() is the model's, not the DDP wrapper's
        # In training mode, activation checkpointing turns the KV cache off; dropout is off either way.
        was_training = policy.training
        policy.eval()
        try:
            sequences = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                        generation_config=self.anchor_generation)
        finally:
            policy.train(was_training)
        generated = sequences[:, prompt_ids.shape[1]:]
        is_end = torch.isin(generated, torch.tensor(self.end_ids, device=generated.device)).long()
        response_mask = (is_end.cumsum(-1) - is_end == 0).long()  # no end id before this token
        generated = torch.where(response_mask.bool(), generated, self.pad_token_id)
        return (torch.cat([prompt_ids, generated], 1), torch.cat([prompt_mask, response_mask], 1),
                torch.cat([torch.zeros_like(prompt_mask), response_mask], 1))


class PolicyForward:
    """What tidpo.gradient_attribution calls a model with: the embedding layer of the model inside the
    accelerate wrapper, and the wrapper's forward (under DDP it runs the hooks that average gradients
    over the processes), without a KV cache, which a training forward does not use."""

    def __init__(self, wrapped, inner):
        self.wrapped, self.inner = wrapped, inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def __call__(self, **inputs):
        return self.wrapped(**inputs, use_cache=False)


def left_padded_prompts(input_ids, response_mask, pad_id):
    """(prompt_ids, prompt_mask) of right-padded prompt + response rows, left-padded so that
    generate() continues every row at its end."""
    lengths = response_mask.argmax(-1)  # a row's first response token sits right after its prompt
    width = int(lengths.max())
    # column j of row b holds prompt token j - (width - length_b); negative: padding
    source = torch.arange(width, device=input_ids.device) - (width - lengths)[:, None]
    prompt_mask = (source >= 0).long()
    prompt_ids = torch.where(prompt_mask.bool(), input_ids.gather(1, source.clamp(min=0)), pad_id)
    return prompt_ids, prompt_mask


def stack_right_padded(parts, pad_id):
    """Concatenate (input_ids, attention_mask, response_mask) triples along the batch, right-padding
    them to one width."""
    width = max(part[0].shape[1] for part in parts)
    return tuple(torch.cat([F.pad(part[k], (0, width - part[k].shape[1]), value=fill) for part in parts])
                 for k, fill in ((0, pad_id), (1, 0), (2, 0)))


# ----------------------------------------------------------------------------- a run


def parse_args(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass  # keeps the description's layout and shows each flag's default

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\nSee docs/trl.md.",
                                formatter_class=Formatter)
    p.add_argument("--model", default=None, help="hub name or local folder of a causal LM; default: a tiny "
                   "Llama built from a config, fine-tuned on the built-in task first")
    p.add_argument("--data", default=None, help="preference JSONL ({prompt, chosen, rejected}, plain or "
                   "conversational); the last 5%% (at least 1) is held out; default: the built-in task")
    p.add_argument("--output-dir", default=None, help="default: runs/trl-tidpo-<date-time>")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per process and step")
    p.add_argument("--lr", type=float, default=None, help="default: 5e-4 for the built-in model, 1e-6 with --model")
    p.add_argument("--max-length", type=int, default=256, help="prompt + response tokens (TRL truncates the end)")
    p.add_argument("--beta", type=float, default=0.1, help="inverse temperature of the preference margin")
    p.add_argument("--weights", choices=["hybrid", "uniform"], default="hybrid", help="token weights")
    p.add_argument("--lam", type=float, default=0.7, help="lambda of Eq. 8")
    p.add_argument("--weight-scale", choices=["mean", "sum"], default="mean", help="see TIDPOConfig")
    p.add_argument("--gamma", type=float, default=0.1, help="weight of the triplet loss (0: no anchors)")
    p.add_argument("--margin", type=float, default=0.01, help="alpha of Eq. 13")
    p.add_argument("--kl-alpha", type=float, default=0.0, help="TDPO2's sequential KL (the authors' release: 0.5)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="anchors: longest sampled response")
    p.add_argument("--temperature", type=float, default=0.8, help="anchors: sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="anchors: top-k")
    p.add_argument("--top-p", type=float, default=0.95, help="anchors: top-p")
    p.add_argument("--sft-steps", type=int, default=200, help="built-in model only: SFT steps before TI-DPO")
    p.add_argument("--seed", type=int, default=0, help="seeds the model, the data order and the sampling")
    p.add_argument("--log-every", type=int, default=10, help="steps per progress line")
    return p.parse_args(argv)


def load_records(args):
    """(train, held-out) lists of {prompt, chosen, rejected}: the built-in task or --data."""
    if args.data is None:
        train, heldout = builtin_task(seed=args.seed)
    else:
        records = data.load_jsonl(args.data)  # checks every record, naming file and line
        if len(records) < 2:
            raise data.DataError(f"{args.data}: needs at least 2 records (one is held out)")
        n_heldout = max(1, len(records) // 20)
        train, heldout = records[:-n_heldout], records[-n_heldout:]
    return [[{field: r[field] for field in data.FIELDS} for r in split] for split in (train, heldout)]


def build_tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config), LlamaForCausalLM(config)  # the reference gets the policy's weights later


def sft(model, trainer, steps, lr, seed, log):
    """Fine-tune `model` on chosen AND rejected responses, so that a reference made from it prefers
    neither, on the very ids TRL prepared for the preference training (TRL's collator, its masks)."""
    loader = torch.utils.data.DataLoader(trainer.train_dataset, batch_size=trainer.args.per_device_train_batch_size,
                                         shuffle=True, collate_fn=trainer.data_collator,
                                         generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    step = 0
    while step < steps:
        for batch in loader:
            input_ids, attention_mask, response_mask = (batch[k].to(model.device) for k in
                                                        ("input_ids", "attention_mask", "completion_mask"))
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            loss = -memory.token_logps(logits, input_ids, response_mask).sum() / response_mask.sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0 or step == steps:
                log(f"sft step {step}/{steps} | loss {loss.item():.4f}")
            if step == steps:
                return


class PrintLogs(TrainerCallback):
    """One line per logging step, with the numbers that show how TI-DPO is doing."""

    KEYS = ("loss", "loss/triplet", "rewards/margins", "rewards/accuracies", "anchors/mean_length")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and "loss" in logs:
            numbers = " | ".join(f"{key} {logs[key]:.4f}" for key in self.KEYS if key in logs)
            print(f"step {state.global_step}/{state.max_steps} | {numbers}")


def main(argv=None):
    import datasets
    import transformers
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    args = parse_args(argv)
    start = time.perf_counter()
    datasets.disable_progress_bars()  # the progress lines below say more
    transformers.utils.logging.disable_progress_bar()
    train, heldout = load_records(args)
    if args.model is None:
        tokenizer = setup.build_tokenizer([r[f] for r in train + heldout for f in data.FIELDS])
        torch.manual_seed(args.seed)
        model, ref_model = build_tiny_llama(tokenizer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model, ref_model = args.model, None  # TRL loads the policy and a reference copy from the name
    output_dir = args.output_dir or f"runs/trl-tidpo-{time.strftime('%Y%m%d-%H%M%S')}"
    config = TIDPOConfig(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr or (1e-6 if args.model else 5e-4),
        lr_scheduler_type="constant_with_warmup", warmup_steps=min(10, args.steps // 4),
        max_length=args.max_length, beta=args.beta, weights=args.weights, lam=args.lam,
        weight_scale=args.weight_scale, gamma=args.gamma, margin=args.margin, kl_alpha=args.kl_alpha,
        anchor_max_new_tokens=args.max_new_tokens, anchor_temperature=args.temperature, anchor_top_k=args.top_k,
        anchor_top_p=args.top_p, seed=args.seed, logging_steps=args.log_every, disable_tqdm=True,
        save_strategy="no", report_to="none", dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # without it, torchrun on CPUs runs independent processes, not DDP
        ddp_find_unused_parameters=False,  # every parameter is used at every step: no graph search for unused ones
        # A hub model checkpoints its activations to save memory; the tiny one would only lose time.
        activation_checkpointing=args.model is not None, bf16=args.model is not None and torch.cuda.is_available())
    trainer = TIDPOTrainer(model, ref_model=ref_model, args=config, train_dataset=datasets.Dataset.from_list(train),
                           eval_dataset=datasets.Dataset.from_list(heldout), processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # it prints whole log dicts; PrintLogs prints one line
    trainer.add_callback(PrintLogs())
    log = print if trainer.is_world_process_zero() else (lambda line: None)
    if args.model is None:
        sft(trainer.model, trainer, args.sft_steps, 3e-3, args.seed, log)
        trainer.ref_model.load_state_dict(trainer.model.state_dict())  # pi_ref: a frozen copy of the start
    log(f"TI-DPO under trl {trl.__version__}: {len(trainer.train_dataset)} training pairs, {args.steps} steps of "
        f"{args.batch_size} pairs x {trainer.args.world_size} process(es) on {trainer.args.device.type}")
    train_seconds = trainer.train().metrics["train_runtime"]
    held_out = trainer.evaluate()
    log(f"held-out ({len(heldout)} pairs): loss {held_out['eval_loss']:.4f} | rewards/margins "
          f"{held_out['eval_rewards/margins']:.4f} | rewards/accuracies {held_out['eval_rewards/accuracies']:.4f}")
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(f"{output_dir}/trainer_state.json")  # log_history: every logged step's numbers
    log(f"saved the policy to {output_dir} | training {train_seconds:.1f} s, whole run "
        f"{time.perf_counter() - start:.1f} s")
    return held_out


if __name__ == "__main__":
    main()
