"""Tests of the held-out metrics (train.py's metrics section), the token-weight display and the
grid (tools/experiments.py).

Each metric first meets a case small enough to count by hand. The display and the grid then run
end to end on tiny settings, with torch on one thread as in test_train.py.
"""

import csv
import html
import json
import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from tools import experiments  # noqa: E402
import tidpo  # noqa: E402
from training import evaluate  # noqa: E402
import train  # noqa: E402
from training import builtin_task as builtin  # noqa: E402
from training import setup  # noqa: E402

# A few steps of everything: enough for every metric to be computed, not for learning.
TINY = ["--sft-steps", "20", "--max-new-tokens", "8", "--log-every", "2"]
KINDS = ("attribution", "no_final", "grad_x_input", "hybrid", "hybrid_no_final", "hybrid_grad_x_input", "prior",
         "uniform")
HTML_RECORD = "Is a < b? Check that a < b & b < c. Why?"


# ----------------------------------------------------------------------------- metrics by hand


def test_distinct_n_counts_unique_ngrams_within_each_sequence():
    words = "the cat saw the cat".split()
    assert evaluate.distinct_n([words], 1) == 3 / 5  # the, cat, saw
    assert evaluate.distinct_n([words], 2) == 3 / 4  # (the, cat) twice
    assert evaluate.distinct_n([words], 4) == 2 / 2
    # pooled over sequences: a repeat in another sequence is no new n-gram; none crosses a boundary
    assert evaluate.distinct_n([["a", "b"], ["a", "b", "c"]], 2) == 2 / 3
    assert evaluate.distinct_n([["a", "b"], ["c", "d"]], 3) == 0.0  # no trigram at all


def test_token_entropy_of_known_distributions():
    assert evaluate.token_entropy([["a", "b", "c", "d"]]) == 2.0  # uniform over 4: log2 4
    assert evaluate.token_entropy([["a", "a"], ["b", "c"]]) == 1.5  # p = 1/2, 1/4, 1/4, pooled
    assert evaluate.token_entropy([[7] * 5]) == 0.0


def test_win_rate_counts_ties_half():
    assert evaluate.win_rate([1, 0, 0, -1], [0, 0, -1, -1]) == 0.75  # win, tie, win, tie
    assert evaluate.win_rate([-1.0, 2.0], [0.0, 2.0]) == 0.25  # loss, tie
    assert evaluate.win_rate([1, -1, 0], [1, -1, 0]) == 0.5
    with pytest.raises(ValueError):
        evaluate.win_rate([1], [1, 0])


def test_self_bleu_is_100_for_copies_and_0_without_shared_words():
    assert evaluate.self_bleu(["you should rest and drink plenty of water ."] * 3) == pytest.approx(100.0)
    assert evaluate.self_bleu(["alpha beta gamma delta", "one two three four", "red green blue white"]) == 0.0


def test_critical_share_of_known_weights():
    # row 0: prompt token 0 (its weight is ignored), response 1-4, padding 5
    weights = torch.tensor([[9.0, 1, 2, 3, 4, 0], [0, 0, 1, 1, 1, 1]])
    response = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    critical = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]])
    share = evaluate.critical_share(weights, critical, response)
    torch.testing.assert_close(share, torch.tensor([7 / 10, 1 / 4]))  # (3 + 4) / 10; uniform: k / T


def test_critical_margin_of_known_log_ratios():
    # Two pairs; prompt token 0, responses 1-3. Pair 0: chosen's critical tokens 2 and 3 (log-ratios
    # 0.5 + 1.5 = 2), rejected's critical token 1 (-1): beta 0.1 * (2 - (-1)) = 0.3. Pair 1: the filler
    # (token 1, +4 for rejected) is left out; critical 0.25 against 0.75: 0.1 * (0.25 - 0.75) = -0.05.
    chosen = torch.tensor([[0.0, 9.0, 0.5, 1.5], [0.0, 0.25, 3.0, 0.0]])
    rejected = torch.tensor([[0.0, -1.0, 2.0, 7.0], [0.0, 4.0, 0.75, 0.0]])
    chosen_critical = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]])
    rejected_critical = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0]])
    margin = evaluate.critical_margin(chosen, rejected, chosen_critical, rejected_critical, beta=0.1)
    torch.testing.assert_close(margin, torch.tensor([0.3, -0.05]))


def test_topk_hit_rate_of_known_weights_and_ties():
    response = torch.tensor([[1, 1, 1, 1]] * 4)
    weights = torch.tensor([[0.1, 0.5, 0.2, 0.9],   # top 2: tokens 3 and 1; one is critical
                            [3.0, 2.0, 2.0, 0.0],   # top 2: token 0, then one place for two tied criticals
                            [2.0, 2.0, 2.0, 1.0],   # three tie for two places, one critical among them
                            [1.0, 1.0, 1.0, 1.0]])  # uniform: k / T
    critical = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1], [0, 1, 0, 0]])
    rate = evaluate.topk_hit_rate(weights, critical, response)
    torch.testing.assert_close(rate, torch.tensor([1 / 2, 1 / 2, (2 / 3) / 2, 1 / 4]))


def test_topk_hit_rate_skips_prompt_and_shares_the_priors_mirror_ties():
    # T = 5 after one prompt token: prior 0.2780, 0.7261, 1, 0.7261, 0.2780 (Eq. 7)
    response = torch.tensor([[0, 1, 1, 1, 1, 1]] * 3)
    prior = tidpo.hybrid_weights(torch.zeros(3, 6), response, lam=0.0)
    prior[:, 0] = 100.0  # a prompt position: never among the top k
    critical = torch.tensor([[0, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 1]])
    rate = evaluate.topk_hit_rate(prior, critical, response)
    # k = 1: the peak is critical; k = 1: it is not; k = 2: the peak (not critical) takes one place,
    # the mirror pair 0.7261 shares the other, and one of the pair is critical: 1/2 hit of 2
    torch.testing.assert_close(rate, torch.tensor([1.0, 0.0, 0.25]))
    assert math.isnan(evaluate.topk_hit_rate(prior[:1], torch.zeros(1, 6), response[:1]).item())


# ----------------------------------------------------------------------------- token weights display


@pytest.fixture(scope="module")
def tiny_policy_dir(tmp_path_factory):
    """A saved random tiny Llama with the built-in task's tokenizer (plus the words of the HTML
    test's record), as train.py saves a policy."""
    train_records, heldout = builtin.builtin_task(seed=0)
    tokenizer = setup.build_tokenizer([r[k] for r in train_records + heldout for k in data.FIELDS] + [HTML_RECORD])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("policy")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_weights_display_of_a_builtin_pair(tiny_policy_dir, tmp_path, capsys):
    shown = experiments.main(["weights", "--model", str(tiny_policy_dir), "--pair", "2", "--output-dir",
                              str(tmp_path), "--png", str(tmp_path / "weights.png")])
    terminal = capsys.readouterr().out
    saved = json.loads((tmp_path / "builtin-heldout-2.json").read_text())
    assert {k: saved[k] for k in shown} == shown

    tokenizer = setup.load_tokenizer(train.parse_args(["--model", str(tiny_policy_dir)]))
    pair = setup.load_pairs(train.parse_args(["--model", str(tiny_policy_dir)]), tokenizer)[1][2]
    page = (tmp_path / "builtin-heldout-2.html").read_text()
    for side in data.RESPONSES:
        entries = saved[side]
        ids = pair[f"{side}_ids"]
        assert len(entries) == len(ids)  # one entry per response token, the final eos included
        assert "".join(e["token"] for e in entries) == tokenizer.decode(ids)
        assert [i for i, e in enumerate(entries) if e["critical"]] == pair[f"{side}_critical"]
        attribution = torch.tensor([e["attribution"] for e in entries], dtype=torch.float64)
        prior = torch.tensor([e["prior"] for e in entries], dtype=torch.float64)
        hybrid = torch.tensor([e["hybrid"] for e in entries], dtype=torch.float64)
        assert (attribution > 0).all()
        torch.testing.assert_close(prior, tidpo.gaussian_prior(len(ids), dtype=torch.float64), rtol=1e-6, atol=0)
        # Eq. 8 from the JSON's own numbers, times T (mean 1)
        expected = len(ids) * (0.7 * attribution / attribution.sum() + 0.3 * prior / prior.sum())
        torch.testing.assert_close(hybrid, expected, rtol=1e-5, atol=0)
        for entry in entries:
            assert html.escape(entry["token"]) in page
        assert f"{side}: " in terminal
    # captured output is not a terminal: plain text, one [weight] per token, no escape codes
    assert "\x1b" not in terminal
    assert len(re.findall(r"\[\d+\.\d\d\]", terminal)) == sum(len(saved[s]) for s in data.RESPONSES)
    # in a terminal: one shaded span per token
    ansi = experiments.terminal_text(saved)
    assert "\x1b[30;48;5;" in ansi and ansi.count("\x1b[0m") == sum(len(saved[s]) for s in data.RESPONSES)
    assert (tmp_path / "weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weights_display_of_a_jsonl_record_escapes_html(tiny_policy_dir, tmp_path):
    records = [{"prompt": "First?", "chosen": "Yes.", "rejected": "No."},
               {"prompt": "Is a < b?", "chosen": "Check that a < b & b < c.", "rejected": "Why?"}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    shown = experiments.main(["weights", "--model", str(tiny_policy_dir), "--data", str(path), "--index", "1",
                              "--output-dir", str(tmp_path / "out")])
    page = (tmp_path / "out" / "prefs-1.html").read_text()
    assert "&lt;" in page and "&amp;" in page and "<unk>" not in json.dumps(shown)
    assert "<span" in page and " <" not in page.replace(" <span", "").replace(" </", "")
    assert [e["token"] for e in shown["rejected"]] == ["why", " ?", " <eos>"]  # lower-cased words
    assert all(set(e) == {"token", "attribution", "prior", "hybrid"} for e in shown["chosen"])  # no critical phrase
    with pytest.raises(SystemExit, match="has records 0 to 1"):
        experiments.main(["weights", "--model", str(tiny_policy_dir), "--data", str(path), "--index", "2"])


# ----------------------------------------------------------------------------- the grid, end to end


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory, one_thread):
    output_dir = tmp_path_factory.mktemp("grid") / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = experiments.main(["grid", "--methods", "dpo", "tidpo", "--noise", "0.2", "--seeds", "1",
                                    "--steps", "4", "--jobs", "1", "--output-dir", str(output_dir), *TINY])
    return {"records": records, "output_dir": output_dir, "warnings": caught}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_grid_table_has_one_row_per_method_with_the_runs_accuracy(tiny_grid):
    records, output_dir = tiny_grid["records"], tiny_grid["output_dir"]
    assert [(r["method"], r["noise"], r["seed"]) for r in records] == [("dpo", 0.2, 1), ("tidpo", 0.2, 1)]
    table = read_csv(output_dir / "table.csv")
    assert table[0] == ["method", "mean@20%", "sd@20%"]
    assert [row[0] for row in table[1:]] == ["dpo", "tidpo"]
    for row, record in zip(table[1:], records):
        assert float(row[1]) == record["after"]["accuracy"]
        assert row[2] == ""  # one seed: no spread
    markdown = (output_dir / "table.md").read_text()
    assert "| method | noise 20% |" in markdown
    for record in records:
        assert f"| {record['method']} | {record['after']['accuracy']:.3f} |" in markdown


def test_grid_runs_csv_holds_every_metric_of_every_run(tiny_grid):
    records, output_dir = tiny_grid["records"], tiny_grid["output_dir"]
    rows = read_csv(output_dir / "runs.csv")
    header = rows[0]
    assert header[:4] == ["method", "noise", "seed", "seconds"]
    assert set(header[4:]) == set(records[0]["after"])
    assert len(rows) == 1 + len(records)
    for row, record in zip(rows[1:], records):
        assert row[:3] == [record["method"], "0.2", "1"]
        assert {name: float(value) for name, value in zip(header[4:], row[4:])} == record["after"]
    summary = (output_dir / "summary.md").read_text()
    assert summary.count("\n| dpo |") == 1 and summary.count("\n| tidpo |") == 1
    for kind in ("attribution", "hybrid", "prior", "uniform"):  # the grid's summary shows the paper's kinds
        assert f"\n| {kind} |" in summary
    for name in ("curves.png", "accuracy_vs_noise.png"):
        assert (output_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_run_with_a_reused_sft_equals_a_separate_run(tiny_grid, tmp_path):
    # tidpo ran second in its group and so started from dpo's SFT weights
    record = tiny_grid["records"][1]
    argv = [a if a != record["output_dir"] else str(tmp_path / "run") for a in record["argv"]]
    separate = train.main(argv, hooks=experiments.method_hooks(record["method"], record["noise"]))
    assert separate["after"] == record["after"]
    assert separate["history"] == record["history"]


def test_grid_metrics_are_in_range_and_uniform_weights_give_the_critical_fraction(tiny_grid):
    args = train.parse_args(["--seed", "1"])
    heldout = setup.load_pairs(args, setup.load_tokenizer(args))[1]
    for record in tiny_grid["records"]:
        after = record["after"]
        for side in data.RESPONSES:
            # uniform weights put k / T of the weight on the k critical of T tokens, and their top k
            # (all tied) hit the critical tokens at that same rate
            fraction = sum(len(p[f"{side}_critical"]) / len(p[f"{side}_ids"]) for p in heldout) / len(heldout)
            assert after[f"weights/uniform/{side}/share"] == pytest.approx(fraction, rel=1e-5)
            assert after[f"weights/uniform/{side}/top_k"] == pytest.approx(fraction, rel=1e-5)
            for kind in KINDS:
                assert 0 < after[f"weights/{kind}/{side}/share"] < 1
                assert 0 <= after[f"weights/{kind}/{side}/top_k"] <= 1
        assert 0 <= after["critical_accuracy"] <= 1 and math.isfinite(after["critical_margin"])
        assert 0 <= after["win_rate"] <= 1
        assert 0 < after["distinct_2"] <= 1 and 0 < after["distinct_4"] <= 1
        assert 0 < after["token_entropy"] <= math.log2(len(setup.load_tokenizer(args)))
        assert 0 <= after["self_bleu"] <= 100


def test_grid_gives_no_deprecation_warnings(tiny_grid):
    bad = [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in tiny_grid["warnings"]
           if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))]
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- mechanism, end to end


def test_mechanism_is_the_default_command_and_tables_both_settings(tmp_path, monkeypatch):
    # The runs themselves are train.main's (tested above through the grid); here each run returns
    # made-up numbers that say which run they came from, to check the wiring and the tables.
    kinds = [f"weights/{kind}/{side}/{metric}" for kind in experiments.PLACEMENT_KINDS
             for side in data.RESPONSES for metric in ("share", "top_k")]

    def fake_group(job):
        task_value = 0.5 if job["task"] == "spurious" else 0.25
        records = []
        for i, method in enumerate(job["methods"]):
            after = {"accuracy": task_value + i / 100 + job["seed"] / 1000, "critical_accuracy": 0.9,
                     "margin": -1.0, "critical_margin": 2.0, "judge/policy": 0.75, "win_rate": 0.625,
                     **{name: 0.125 for name in kinds}}
            # two logged windows; only TI-DPO's have the triplet's diagnostics
            history = [{"step": step, "logps/chosen": -10.0 * step, "logps/rejected": -20.0 * step} for step in (1, 2)]
            if method == "tidpo":
                for h in history:
                    h.update({"triplet/distance_chosen": 3.0, "triplet/distance_rejected": 4.0,
                              "triplet/active": 0.5 / h["step"], "triplet/active_on_flipped": 0.25 * h["step"],
                              "triplet/active_on_clean": 0.125, "triplet/logratio_anchor": 1.0,
                              "triplet/logratio_chosen": 0.5, "triplet/logratio_rejected": -0.5})
            records.append({"method": method, "noise": job["noise"], "seed": job["seed"], "seconds": 1.0,
                            "argv": job["train_args"], "before": dict(after), "after": after, "history": history})
        return records

    monkeypatch.setattr(experiments, "run_group", fake_group)
    output_dir = tmp_path / "out"
    records = experiments.main(["--methods", "dpo", "tidpo", "--seeds", "1", "3", "--jobs", "1",
                                "--output-dir", str(output_dir), "--sft-steps", "7"])
    settings = experiments.MECHANISM_SETTINGS
    assert [(r["task"], r["seed"], r["method"]) for r in records] == \
           [(t, seed, m) for t, _ in settings for seed in (1, 3) for m in ("dpo", "tidpo")]
    for r in records:  # each setting's task and noise, and the extra flag, reach its runs
        assert r["noise"] == dict(settings)[r["task"]]
        assert r["argv"][:2] == ["--sft-steps", "7"]
    text = (output_dir / "mechanism.md").read_text()
    for task, noise in settings:
        assert f"### Task {task}, label noise {experiments.noise_label(noise)} (mean ± standard deviation over 2 " \
               "seeds)" in text
        section = text.split(f"### Task {task}")[1].split("### Task")[0]
        # seeds 1 and 3: accuracy base + i/100 + 0.001 and + 0.003: mean + 0.002, sample sd 0.001414
        base = 0.5 if task == "spurious" else 0.25
        assert (f"| dpo | {base + 0.002:.3f} ± 0.001 | 0.900 ± 0.000 | -1.000 ± 0.000 | 2.000 ± 0.000 | "
                "0.750 ± 0.000 | 0.625 ± 0.000 |") in section
        # the dynamics: start and end of the summed log-probs; the triplet's columns only for TI-DPO
        # (active: 0.5 then 0.25; on flipped pairs 0.25 then 0.5, mean 0.375)
        assert ("| dpo | -10.00 ± 0.00 | -20.00 ± 0.00 | -20.00 ± 0.00 | -40.00 ± 0.00 "
                "|  |  |  |  |  |  |  |  |  |\n") in section
        assert ("| tidpo | -10.00 ± 0.00 | -20.00 ± 0.00 | -20.00 ± 0.00 | -40.00 ± 0.00 | 1.00 ± 0.00 | "
                "0.50 ± 0.00 | -0.50 ± 0.00 | 3.00 ± 0.00 | 4.00 ± 0.00 | 0.500 ± 0.000 | 0.250 ± 0.000 | "
                "0.375 ± 0.000 | 0.125 ± 0.000 |") in section
        assert f"| tidpo | {base + 0.012:.3f} ± 0.001 |" in section
        # paired with DPO by seed: accuracy +0.01 on both seeds (no spread), critical accuracy and judge equal
        assert "| tidpo | +0.010 [+0.010, +0.010] | +0.000 [+0.000, +0.000] | +0.000 [+0.000, +0.000] |" in section
        for kind in experiments.PLACEMENT_KINDS:
            assert f"\n| {kind} | 0.125 ± 0.000 | 0.125 ± 0.000 | 0.125 ± 0.000 | 0.125 ± 0.000 |" in section
    rows = read_csv(output_dir / "runs.csv")
    assert rows[0][:5] == ["task", "method", "noise", "seed", "seconds"] and len(rows) == 1 + len(records)


# ----------------------------------------------------------------------------- variants of the triplet


def test_points_triplet_variant_hand_case():
    # One point per response, its summed log-ratio: d = 1 + 0 = 1, b = 3, c = 2, alpha = 0.5:
    # (1 - 3)^2 - (2 - 1)^2 + 0.5 = 3.5; d/db = -2 (d - b) = 4 on every chosen token (a difference of sums)
    anchor = torch.tensor([[1.0, 0.0, 9.0]], dtype=torch.float64, requires_grad=True)
    anchor_mask = torch.tensor([[1, 1, 0]])
    chosen = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([[2.0]], dtype=torch.float64, requires_grad=True)
    loss = experiments.points_triplet_loss(anchor, anchor_mask, chosen, torch.ones(1, 2), rejected,
                                           torch.ones(1, 1), 0.5)
    assert loss.tolist() == [3.5]
    grad_anchor, grad_chosen, grad_rejected = torch.autograd.grad(loss.sum(), (anchor, chosen, rejected))
    assert grad_chosen.tolist() == [[4.0, 4.0]] and grad_rejected.tolist() == [[-2.0]]
    assert grad_anchor.tolist() == [[-2.0, -2.0, 0.0]]  # 2 (d - b) + 2 (c - d) = -4 + 2, padding 0


def test_anchor_grad_variant_moves_only_the_anchor():
    # the paper's per-token triplet, with the chosen and rejected log-ratios held fixed
    gen = torch.Generator().manual_seed(3)
    anchor, chosen, rejected = (torch.randn(2, 4, generator=gen, dtype=torch.float64).requires_grad_()
                                for _ in range(3))
    mask = torch.ones(2, 4)
    args = (anchor, mask, chosen, mask, rejected, mask, 10.0)  # a margin that keeps every hinge active
    variant = experiments.anchor_grad_triplet_loss(*args)
    paper = tidpo.triplet_loss(*args)
    assert torch.equal(variant, paper)
    grads = torch.autograd.grad(variant.sum(), (anchor, chosen, rejected), allow_unused=True)
    paper_grads = torch.autograd.grad(paper.sum(), (anchor, chosen, rejected))
    assert torch.equal(grads[0], paper_grads[0]) and grads[1] is None and grads[2] is None


def test_every_hooked_method_is_a_method():
    assert set(experiments.HOOKS) <= set(experiments.METHODS)
    for hooks in experiments.HOOKS.values():
        assert set(hooks) <= {"triplet", "weights"} and hooks


def test_run_refuses_label_noise_outside_0_and_1(tmp_path):
    with pytest.raises(data.DataError, match="label_noise must be between 0 and 1, got 2.0"):
        experiments.main(["run", "--noise", "2", "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_builtin_task_settings_refuse_data(tmp_path):
    plain_jsonl_file = tmp_path / "prefs.jsonl"
    plain_jsonl_file.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"})
                                          for i in range(4)) + "\n")
    with pytest.raises(data.DataError, match="the built-in task's settings .* cannot be used with --data"):
        experiments.main(["run", "--method", "dpo", "--data", str(plain_jsonl_file),
                          "--output-dir", str(tmp_path / "run")])


def test_run_repeats_one_run_of_a_study(tmp_path, monkeypatch):
    # the run command calls train.main with the method's flags and hooks, the noise and the setting
    calls = []
    monkeypatch.setattr(train, "main", lambda argv, hooks: calls.append((argv, hooks)) or {})
    experiments.main(["run", "--method", "oracle", "--noise", "0.2", "--task", "spurious", "--seed", "3",
                      "--steps", "5", "--output-dir", str(tmp_path)])
    (argv, hooks), = calls
    assert argv == [*experiments.METHODS["oracle"], "--seed", "3", "--steps", "5", "--output-dir", str(tmp_path)]
    assert hooks.task == {"label_noise": 0.2, "setting": "spurious"} and hooks.diagnostics
    assert hooks.weights is experiments.HOOKS["oracle"]["weights"]
    assert hooks.optimizer is train.make_optimizer and hooks.sft is train.sft
    experiments.main(["run", "--output-dir", str(tmp_path)])  # a grid cell by default: its 128 steps
    assert calls[-1][0][calls[-1][0].index("--steps") + 1] == str(experiments.STEPS) == "128"


def test_paired_difference_by_hand():
    # TI-DPO minus DPO, seed by seed: 0.1, 0.2, 0.3 (seed 9 ran only TI-DPO: left out). Mean 0.2, sample sd
    # 0.1, 95% interval 0.2 -+ t(0.975, 2) * 0.1 / sqrt(3) = 0.2 -+ 4.303 * 0.057735 = [-0.0484, 0.4484]
    records = [{"method": m, "seed": s, "noise": 0.1, "after": {"accuracy": a}}
               for m, s, a in [("dpo", 0, 0.5), ("dpo", 1, 0.6), ("dpo", 2, 0.4), ("tidpo", 0, 0.6),
                               ("tidpo", 1, 0.8), ("tidpo", 2, 0.7), ("tidpo", 9, 0.9)]]
    mean, low, high, n = experiments.paired_difference(records, "accuracy", "tidpo", noise=0.1)
    assert n == 3 and mean == pytest.approx(0.2, abs=1e-12)
    assert (low, high) == (pytest.approx(0.2 - 4.303 * 0.1 / 3 ** 0.5, abs=1e-12),
                           pytest.approx(0.2 + 4.303 * 0.1 / 3 ** 0.5, abs=1e-12))
    assert experiments.paired_cell(records, "accuracy", "tidpo", noise=0.1) == "+0.200 [-0.048, +0.448]"
    assert experiments.paired_difference(records, "accuracy", "tidpo", noise=0.2) is None  # no seeds at 20%


# ----------------------------------------------------------------------------- the authors' release


def release_by_hand(importance, mask, response, lam):
    # Eq. 7-8 as the release trains, one row at a time in plain Python: over the row's n non-padding
    # tokens, mu = (n - 1) / 2, sigma = max(1, n / 8), I / sum(I) and P / sum(P) mixed by lambda, times n;
    # the response keeps its positions' weights
    rows = []
    for scores, on, answer in zip(importance, mask, response):
        span = [i for i, m in enumerate(on) if m]
        n = len(span)
        mu, sigma = (n - 1) / 2, max(1.0, n / 8)
        prior = [math.exp(-0.5 * ((t - mu) / sigma) ** 2) for t in range(n)]
        total = sum(scores[i] for i in span)
        mixed = [lam * scores[i] / total + (1 - lam) * p / sum(prior) if total > 0 else p / sum(prior)
                 for i, p in zip(span, prior)]
        row = [0.0] * len(on)
        for i, w in zip(span, mixed):
            row[i] = n * w if answer[i] else 0.0
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def test_release_weights_by_hand():
    # Row 0: prompt 0-2, response 3-6, padding 7-8 (its scores must not count): n = 7, sigma = max(1, 7/8) = 1,
    # mu = 3, prior exp(-0.5 (t - 3)^2) = 0.0111, 0.1353, 0.6065, 1, ...; importance over the span sums to 14.
    # Row 1: prompt 0-3, response 4-8: n = 9, sigma = 9/8, mu = 4. Row 2: no attribution, the prior alone.
    importance = torch.tensor([[1.0, 2, 0, 3, 1, 5, 2, 7, 9], [2, 0, 1, 1, 4, 0, 3, 1, 4], [0.0] * 9],
                              dtype=torch.float64)
    mask = torch.tensor([[1] * 7 + [0] * 2, [1] * 9, [1] * 5 + [0] * 4])
    response = torch.tensor([[0] * 3 + [1] * 4 + [0] * 2, [0] * 4 + [1] * 5, [0] * 2 + [1] * 3 + [0] * 4])
    weights = experiments.release_hybrid_weights(importance, mask, response, lam=0.2)
    expected = release_by_hand(importance.tolist(), mask.tolist(), response.tolist(), lam=0.2)
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-12)
    # row 0's response, by hand: 7 (0.2 I_t / 14 + 0.8 P_t / P), P = 1 + 2 (0.6065 + 0.1353 + 0.0111) = 2.5059
    prior_sum = 1 + 2 * sum(math.exp(-0.5 * d ** 2) for d in (1, 2, 3))
    assert weights[0, 3].item() == pytest.approx(7 * (0.2 * 3 / 14 + 0.8 / prior_sum), abs=1e-12)
    # mean 1 over prompt and response together, not over the response alone
    span_weights = experiments.release_hybrid_weights(importance, mask, mask, lam=0.2)
    torch.testing.assert_close(span_weights.sum(-1), mask.sum(-1).double(), rtol=0, atol=1e-12)
    assert abs(weights[0, 3:7].mean().item() - 1) > 0.1
    # the paper's Eq. 8 is the same computation with the response as the span and sigma = T/4 (where
    # T/4 >= 1: rows 0 and 1, T = 4 and 5)
    torch.testing.assert_close(experiments.release_hybrid_weights(importance[:2], response[:2], response[:2],
                                                                  lam=0.7, sigma_div=4),
                               tidpo.hybrid_weights(importance[:2], response[:2], lam=0.7), rtol=0, atol=1e-12)


def test_release_weights_differ_from_the_papers_on_a_batch(tiny_policy_dir):
    args = train.parse_args(["--model", str(tiny_policy_dir)])  # lambda 0.7 for both: only the span and sigma
    tokenizer = setup.load_tokenizer(args)
    pairs = setup.load_pairs(args, tokenizer)[1][:4]
    policy = LlamaForCausalLM.from_pretrained(tiny_policy_dir).eval()
    input_ids, attention_mask, response_mask = data.stack_pair(data.collate(pairs, tokenizer.pad_token_id),
                                                                tokenizer.pad_token_id)
    paper_logits, paper = train.hybrid_token_weights(policy, input_ids, attention_mask, response_mask, {}, args)
    release_logits, release = experiments.release_weights(policy, input_ids, attention_mask, response_mask, {}, args)
    torch.testing.assert_close(release_logits, paper_logits)  # the same forward
    assert torch.equal(release == 0, response_mask == 0)  # weights on the response only, like the paper's
    lengths = response_mask.sum(-1)
    torch.testing.assert_close(paper.sum(-1), lengths.float())  # the paper's: mean 1 over the response
    assert (release.sum(-1) - lengths).abs().max() > 0.05  # the release's: mean 1 over prompt and response
    assert (release - paper).abs().max() > 0.1
    # the same target and scores: the response's scores are the paper's, the prompt's come on top
    _, grad, _ = tidpo.target_gradient(policy, input_ids, attention_mask, response_mask)
    torch.testing.assert_close(tidpo.importance_scores(grad, attention_mask) * response_mask,
                               tidpo.gradient_attribution(policy, input_ids, attention_mask, response_mask)[1])


def test_release_method_sets_the_releases_loss_config():
    release = train.parse_args(experiments.METHODS["tidpo_release"])
    assert (release.beta, release.lam, release.gamma, release.margin, release.kl_alpha) == (0.2, 0.2, 0.001, 0.001,
                                                                                            0.5)
    assert (release.max_new_tokens, release.top_k, release.top_p, release.temperature) == (64, 50, 0.95, 0.8)
    assert experiments.method_hooks("tidpo_release").weights is experiments.release_weights
    paper = train.parse_args([])  # the paper's method stays the default
    assert (paper.beta, paper.lam, paper.gamma, paper.margin, paper.kl_alpha) == (0.1, 0.7, 0.1, 0.01, 0.0)
    assert train.Hooks().weights is train.hybrid_token_weights


def test_release_method_runs(tmp_path):
    result = experiments.main(["run", "--method", "tidpo_release", "--steps", "2", "--output-dir",
                               str(tmp_path / "run"), *TINY])
    last = result["history"][-1]
    assert "loss/kl" in last  # the TDPO2 KL is on
    assert last["loss"] == pytest.approx(last["loss/dpo_w"] + 0.001 * last["loss/triplet"], rel=1e-5)
    assert 0 <= result["after"]["accuracy"] <= 1


def test_release_command_compares_the_gradients_at_the_reference():
    text = experiments.main(["release", "--pairs", "2", "--sft-steps", "20"])
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| paper", "| release"))]
    assert [row[0] for row in rows] == ["| paper, lambda 0.7", "| release, lambda 0.7", "| release, lambda 0.2"]
    assert rows[0][1:] == ["1.000", "0.6931", "1.000", "1.000 |"]  # the paper's weights against themselves
    assert all(row[2] == "0.6931" for row in rows)  # pi_theta = pi_ref: every weighting's loss is log 2
    assert all(float(row[4].rstrip(" |")) < 0.999 for row in rows[1:])  # and the gradients differ
    assert "the prompt's share of the release's attribution: 0." in text
