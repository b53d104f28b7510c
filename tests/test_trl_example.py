"""examples/trl_tidpo.py: TI-DPO as a subclass of TRL's DPOTrainer.

The subclass must give TRL's own DPO loss when TI-DPO reduces to DPO, tidpo.tidpo_loss's number
when it does not, train under trainer.train(), give one process's numbers when run as two DDP
processes, and refuse to start when the TRL method it overrides is gone. Models are 0.13M-parameter
Llamas on the built-in task's tokenizer, on the CPU.
"""

import copy
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402  (installed with trl)
from trl import DPOConfig, DPOTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
import data  # noqa: E402
import tidpo  # noqa: E402
import trl_tidpo  # noqa: E402
from trl_tidpo import TIDPOConfig, TIDPOTrainer  # noqa: E402
from training import builtin_task as builtin  # noqa: E402
from training import setup  # noqa: E402

N_PAIRS = 4  # pairs per batch
COMMON = dict(per_device_train_batch_size=N_PAIRS, max_steps=3, learning_rate=1e-3, logging_steps=1,
              save_strategy="no", report_to="none", disable_tqdm=True, dataloader_pin_memory=False, seed=0,
              bf16=False, activation_checkpointing=False)


@pytest.fixture(scope="module")
def task():
    train, heldout = builtin.builtin_task(seed=0, n_train=8, n_heldout=2)
    tokenizer = setup.build_tokenizer([r[f] for r in train + heldout for f in data.FIELDS])
    torch.manual_seed(0)
    model, _ = trl_tidpo.build_tiny_llama(tokenizer)
    return train, tokenizer, model.state_dict()


# The comparisons below are about formulas: two paths (TRL's trainer, tidpo.py called directly) that
# sum the same terms in different orders. In float32 such sums differ in the 7th digit, and by how
# much depends on the CPU's kernels (AVX2, AVX-512, scalar); a tolerance that fits one machine's
# rounding fails on another. The models therefore run in float64 (Llama's RMSNorm still normalises
# in float32, on the same inputs in both paths), where the paths agree to ~1e-15 (measured: 4e-16
# absolute, 2e-11 relative on the gradients). A wrong formula moves the numbers by 1e-3 or more.
SAME = dict(rel=1e-9, abs=1e-12)
SAME_GRAD = dict(rtol=1e-7, atol=1e-12)
LOGGED = dict(rel=1e-6, abs=1e-9)  # TRL logs its metrics as float32: one rounding of a float64 number


def models(task, perturb):
    """(policy, reference) with the task's weights, in float64; a perturbed policy makes every
    log-ratio nonzero."""
    _, tokenizer, state = task
    policy, ref = trl_tidpo.build_tiny_llama(tokenizer)
    policy.load_state_dict(state)
    ref.load_state_dict(state)
    policy, ref = policy.double(), ref.double()
    if perturb:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in policy.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return policy.train(), ref


def make_trainer(task, tmp_path, trainer_class=TIDPOTrainer, perturb=True, end_ids=None, **settings):
    train, tokenizer, _ = task
    config_class = TIDPOConfig if trainer_class is TIDPOTrainer else DPOConfig
    policy, ref = models(task, perturb)
    if end_ids is not None:  # the end ids of the policy's generation config
        policy.generation_config.eos_token_id = end_ids
    config = config_class(output_dir=str(tmp_path / trainer_class.__name__), **COMMON, **settings)
    records = Dataset.from_list([{f: r[f] for f in data.FIELDS} for r in train])
    return trainer_class(policy, ref_model=ref, args=config, train_dataset=records, processing_class=tokenizer)


def first_batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(N_PAIRS)])


def last_metrics(trainer):
    return {name: values[-1] for name, values in trainer._metrics["train"].items()}


# ----------------------------------------------------------------------------- tokens


def test_trl_ids_are_encode_pairs_without_its_bos(task, tmp_path):
    # The one difference between the two paths' tokens: data.encode_pair puts BOS before the prompt,
    # TRL only what the tokenizer adds, which for the built-in tokenizer is nothing.
    train, tokenizer, _ = task
    trainer = make_trainer(task, tmp_path, weights="uniform", gamma=0.0)
    for record, prepared in zip(train, trainer.train_dataset):
        ours = data.encode_pair(tokenizer, record["prompt"], record["chosen"], record["rejected"], 256)
        assert ours["prompt_ids"][0] == tokenizer.bos_token_id
        assert prepared["prompt_ids"] == ours["prompt_ids"][1:]
        assert (prepared["chosen_ids"], prepared["rejected_ids"]) == (ours["chosen_ids"], ours["rejected_ids"])


# ----------------------------------------------------------------------------- (a) DPO is TRL's DPO


# TRL's own DPOTrainer asks transformers for the deprecated is_gradient_checkpointing; TIDPOTrainer does not.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_uniform_weights_without_triplet_give_trls_dpo_loss(task, tmp_path):
    ours = make_trainer(task, tmp_path, weights="uniform", gamma=0.0, kl_alpha=0.0)
    theirs = make_trainer(task, tmp_path, trainer_class=DPOTrainer)
    batch = first_batch(ours)
    assert all(torch.equal(batch[k], first_batch(theirs)[k]) for k in batch)

    our_loss = ours.compute_loss(ours.model, batch)
    their_loss = theirs.compute_loss(theirs.model, batch)
    assert abs(their_loss.item() - math.log(2)) > 0.05  # the policy differs from the reference
    # TRL's DPOTrainer returns its loss as float32 (its gradient is float64's, checked below)
    assert our_loss.item() == pytest.approx(their_loss.item(), **LOGGED)
    ours_logged, theirs_logged = last_metrics(ours), last_metrics(theirs)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours_logged[name] == pytest.approx(theirs_logged[name], **LOGGED), name
    for name in ("logps/chosen", "logps/rejected"):
        assert ours_logged[name] == pytest.approx(theirs_logged[name], **LOGGED), name

    # the same gradient, too
    our_loss.backward()
    their_loss.backward()
    # TRL computes DPO's log-probs in float32 even for a float64 model, so its gradient carries a float32
    # rounding (relative 2^-24) in each logit's gradient. Summed over the batch's positions, an entry can
    # be off by about that times the number of positions, relative to the largest entry (measured: at
    # most 1.3e-6 of the largest entry, with the default, AVX2 and AVX-512 kernels; this bound is 1.7e-5).
    rounding = 2.0 ** -24 * int(batch["attention_mask"].sum())
    for (name, ours_parameter), theirs_parameter in zip(ours.model.named_parameters(), theirs.model.parameters()):
        torch.testing.assert_close(ours_parameter.grad, theirs_parameter.grad, rtol=0,
                                   atol=rounding * theirs_parameter.grad.abs().max().item(),
                                   msg=lambda message: f"{name}: {message}")


# ----------------------------------------------------------------------------- (b) TI-DPO is tidpo.tidpo_loss


def fixed_anchors(prompt_ids, prompt_mask, tokens, eos_id):
    """The same response, `tokens` + EOS, after every left-padded prompt."""
    response = torch.tensor(tokens + [eos_id]).expand(len(prompt_ids), -1)
    return (torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, torch.ones_like(response)], 1),
            torch.cat([torch.zeros_like(prompt_mask), torch.ones_like(response)], 1))


@pytest.mark.parametrize("kl_alpha", [0.0, 0.5])
def test_default_settings_give_tidpo_loss(task, tmp_path, kl_alpha):
    _, tokenizer, _ = task
    trainer = make_trainer(task, tmp_path, kl_alpha=kl_alpha)  # hybrid weights, lam 0.7, gamma 0.1, margin 0.01
    policy, ref = trainer.model, trainer.ref_model
    batch = first_batch(trainer)
    input_ids, attention_mask, response_mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    n = N_PAIRS

    # The anchor's prompts are the pairs' prompts, left-padded; a fixed response replaces the sample.
    prompts = [trainer.train_dataset[i]["prompt_ids"] for i in range(n)]
    prompt_ids, prompt_mask = trl_tidpo.left_padded_prompts(input_ids[:n], response_mask[:n], tokenizer.pad_token_id)
    for row, prompt in enumerate(prompts):
        assert prompt_ids[row, prompt_mask[row].bool()].tolist() == prompt
    anchor = fixed_anchors(prompt_ids, prompt_mask, tokenizer("you should ask a pharmacist first .")["input_ids"],
                           tokenizer.eos_token_id)
    trainer.sample_anchors = lambda model, ids, mask: (anchor if torch.equal(ids, prompt_ids)
                                                       and torch.equal(mask, prompt_mask) else None)

    # The same loss computed directly with tidpo.py, on separate forwards of pairs and anchors.
    def forward(model, ids, mask):
        return model(input_ids=ids, attention_mask=mask, position_ids=tidpo.position_ids(mask)).logits

    logits, importance = tidpo.gradient_attribution(policy, input_ids, attention_mask, response_mask)
    logps = tidpo.token_logps(logits, input_ids, response_mask)
    with torch.no_grad():
        ref_logits = forward(ref, input_ids, attention_mask)
        ref_logps = tidpo.token_logps(ref_logits, input_ids, response_mask)
        ref_anchor_logps = tidpo.token_logps(forward(ref, anchor[0], anchor[1]), anchor[0], anchor[2])
    anchor_logratios = (tidpo.token_logps(forward(policy, anchor[0], anchor[1]), anchor[0], anchor[2])
                        - ref_anchor_logps)
    weights = tidpo.hybrid_weights(importance, response_mask, lam=0.7)
    kl = tidpo.sequence_kl(logits, ref_logits, response_mask)
    expected, expected_metrics = tidpo.tidpo_loss(
        logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], weights[:n], weights[n:], beta=0.1,
        anchor_logratios=anchor_logratios, anchor_mask=anchor[2], chosen_mask=response_mask[:n],
        rejected_mask=response_mask[n:], gamma=0.1, margin=0.01, kl_chosen=kl[:n], kl_rejected=kl[n:],
        kl_alpha=kl_alpha)
    assert expected_metrics["loss/triplet"] > 0.1  # the hinge is active: the triplet is part of the loss
    assert not torch.allclose(weights, response_mask.to(weights.dtype))  # and the weights are not uniform
    expected.backward()
    expected_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad(set_to_none=True)

    loss = trainer.compute_loss(policy, batch)
    assert loss.item() == pytest.approx(expected.item(), **SAME)
    logged = last_metrics(trainer)
    for name, value in expected_metrics.items():
        assert logged[name] == pytest.approx(value.item(), **LOGGED), name
    assert logged["anchors/mean_length"] == len(anchor[0][0]) - prompt_ids.shape[1]
    if kl_alpha:
        assert logged["loss/kl"] == pytest.approx(kl_alpha * (kl[n:] - kl[:n]).mean().item(), **LOGGED)
    # The gradient matches too, the anchor's share included (its log-ratio is recomputed with gradient).
    loss.backward()
    for parameter, expected_grad in zip(policy.parameters(), expected_grads):
        torch.testing.assert_close(parameter.grad, expected_grad, **SAME_GRAD)


def test_activation_checkpointing_changes_nothing(task, tmp_path):
    # A hub model trains with activation checkpointing on; the attribution's backward to the
    # embeddings and the loss's backward must then recompute the same activations.
    results = []
    for checkpointing in (False, True):
        trainer = make_trainer(task, tmp_path, gamma=0.0, kl_alpha=0.5)
        if checkpointing:
            trainer.model.activation_checkpointing_enable()
        assert trainer.model.is_activation_checkpointing == checkpointing
        loss = trainer.compute_loss(trainer.model, first_batch(trainer))
        loss.backward()
        results.append((loss.item(), [p.grad for p in trainer.model.parameters()]))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert loss_on == pytest.approx(loss_off, **SAME)
    for grad_on, grad_off in zip(grads_on, grads_off):
        torch.testing.assert_close(grad_on, grad_off, **SAME_GRAD)


# ----------------------------------------------------------------------------- anchors


def test_left_padded_prompts_by_hand():
    input_ids = torch.tensor([[1, 2, 3, 9, 9, 0], [4, 5, 8, 8, 8, 8]])
    response_mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    prompt_ids, prompt_mask = trl_tidpo.left_padded_prompts(input_ids, response_mask, pad_id=0)
    assert prompt_ids.tolist() == [[1, 2, 3], [0, 4, 5]]
    assert prompt_mask.tolist() == [[1, 1, 1], [0, 1, 1]]


def test_anchor_responses_end_at_their_first_eos(task, tmp_path):
    _, tokenizer, _ = task
    trainer = make_trainer(task, tmp_path)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # the release's sampling settings by default
    generation = trainer.anchor_generation
    assert (generation.do_sample, generation.temperature, generation.top_k, generation.top_p,
            generation.max_new_tokens) == (True, 0.8, 50, 0.95, 64)

    # What generate() returns is cut after each row's first EOS (by hand: rows end at 2, 4 and 1 tokens).
    prompt_ids = torch.tensor([[pad, 5, 6], [7, 8, 9], [7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]])
    generated = torch.tensor([[10, eos, 11, pad], [12, 13, 14, 15], [eos, eos, 12, pad]])
    trainer.model.generate = lambda **kwargs: torch.cat([kwargs["input_ids"], generated], 1)
    ids, attention, response = trainer.sample_anchors(trainer.model, prompt_ids, prompt_mask)
    assert ids.tolist() == [[pad, 5, 6, 10, eos, pad, pad], [7, 8, 9, 12, 13, 14, 15], [7, 8, 9, eos, pad, pad, pad]]
    assert response.tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0]]
    assert attention.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]]
    del trainer.model.generate

    # A second end id in the model's generation config (Llama 3 lists <|eot_id|> beside
    # <|end_of_text|>) ends a response too, in generate() and in the cut: token 13 here.
    two_ends = make_trainer(task, tmp_path, end_ids=[13, eos])
    assert sorted(two_ends.anchor_generation.eos_token_id) == sorted([13, eos])
    two_ends.model.generate = lambda **kwargs: torch.cat([kwargs["input_ids"], generated], 1)
    _, _, response = two_ends.sample_anchors(two_ends.model, prompt_ids, prompt_mask)
    assert response.tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0, 0]]

    # The real generate(): the prompts are kept, at most anchor_max_new_tokens follow, in training mode after.
    trainer.anchor_generation.max_new_tokens = 5
    ids, attention, response = trainer.sample_anchors(trainer.model, prompt_ids, prompt_mask)
    assert torch.equal(ids[:, :3], prompt_ids) and ids.shape[1] <= 3 + 5
    assert torch.equal(attention, torch.cat([prompt_mask, response[:, 3:]], 1))
    assert (response.sum(-1) >= 1).all() and trainer.model.training


# ----------------------------------------------------------------------------- (c) trainer.train()


def test_train_runs_tidpo_with_the_triplet(task, tmp_path):
    trainer = make_trainer(task, tmp_path, perturb=False, anchor_max_new_tokens=8)
    before = copy.deepcopy(trainer.model.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    deprecations = [str(w.message) for w in caught
                    if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))]
    assert deprecations == []

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    # Step 1: the policy is the reference, so every log-ratio is 0: DPO's log 2, and the triplet's
    # hinge max(0, 0 - 0 + margin) = 0.01, weighted by gamma = 0.1.
    assert logs[0]["loss/triplet"] == pytest.approx(0.01, abs=1e-7)
    assert logs[0]["rewards/margins"] == 0
    assert logs[0]["loss"] == pytest.approx(math.log(2) + 0.1 * 0.01, abs=1e-6)
    for entry in logs:
        assert math.isfinite(entry["loss"]) and 1 <= entry["anchors/mean_length"] <= 8
    assert logs[-1]["rewards/margins"] != 0  # later steps train a policy that differs from the reference
    changed = [name for name, value in trainer.model.state_dict().items() if not torch.equal(value, before[name])]
    assert len(changed) == len(before)


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    # DDP on two CPU processes (gloo) against one process, through the example's main(). Greedy
    # anchors (--temperature 0): sampling 4 rows per process does not draw the random numbers that
    # sampling 8 rows in one process draws. TRL gives rank r batches r, r + 2, ... of the same
    # shuffled order, so 2 x 4 pairs are the 8 pairs of one process's batch.
    flags = ["--sft-steps", "0", "--steps", "3", "--log-every", "1", "--max-new-tokens", "4", "--temperature", "0",
             "--seed", "0"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    child = subprocess.run([*launch, "examples/trl_tidpo.py", *flags, "--batch-size", "4", "--output-dir",
                            str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr[-3000:]
    assert "3 steps of 4 pairs x 2 process(es) on cpu" in child.stdout
    assert child.stdout.count("step 3/3") == 1  # rank 0 alone prints
    assert "arning" not in child.stderr, child.stderr[-3000:]
    trl_tidpo.main([*flags, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])

    def logged(folder):
        history = json.loads((tmp_path / folder / "trainer_state.json").read_text())["log_history"]
        return [entry for entry in history if "loss" in entry or "eval_loss" in entry]

    one, two = logged("one"), logged("two")
    assert [entry["step"] for entry in one] == [1, 2, 3, 3]  # three training steps, then the evaluation
    # Step 1: the policy is the reference, so the loss is log 2 + gamma * margin, in both runs.
    assert one[0]["loss"] == pytest.approx(math.log(2) + 0.1 * 0.01, abs=1e-6)
    for entry_one, entry_two in zip(one, two, strict=True):
        names = [name for name in entry_one if "/" in name or name in ("loss", "grad_norm", "eval_loss")]
        assert len(names) >= 10
        for name in names:
            # float32 sums in another order (two half batches, then an all-reduce), carried on by
            # Adam: measured up to 2.6e-6 absolute (loss/triplet ~1.3) and 1e-6 relative (grad_norm),
            # by an amount that depends on the CPU's kernels. A wrong gradient scale over the
            # processes would change grad_norm by 2x.
            assert entry_two[name] == pytest.approx(entry_one[name], rel=1e-4, abs=1e-4), (entry_one["step"], name)


# ----------------------------------------------------------------------------- (d) start-up checks


def changed_signature(self, model, inputs):
    raise AssertionError("never called")


def compute_loss_elsewhere(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    raise AssertionError("never called")


@pytest.mark.parametrize("attribute, replacement, problem", [
    ("_compute_loss", None, "has no such method"),
    ("_compute_loss", changed_signature, "its parameters are now"),
    ("compute_loss", compute_loss_elsewhere, "no longer calls it"),
])
def test_refuses_to_start_when_the_trl_hook_changed(task, tmp_path, monkeypatch, attribute, replacement, problem):
    import trl

    if replacement is None:
        monkeypatch.delattr(DPOTrainer, attribute)
    else:
        monkeypatch.setattr(DPOTrainer, attribute, replacement)
    with pytest.raises(RuntimeError, match=problem) as error:
        make_trainer(task, tmp_path)
    assert "DPOTrainer._compute_loss" in str(error.value) and f"trl {trl.__version__}" in str(error.value)


@pytest.mark.parametrize("setting", [dict(loss_type=["ipo"]), dict(precompute_ref_log_probs=True),
                                     dict(ld_alpha=0.5), dict(disable_dropout=False), dict(lam=1.5)])
def test_refuses_settings_it_would_ignore(tmp_path, setting):
    with pytest.raises(ValueError, match=next(iter(setting))):
        TIDPOConfig(output_dir=str(tmp_path), **COMMON, **setting)
