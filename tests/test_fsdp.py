"""train.py --fsdp (FSDP2): two processes under torchrun (gloo, on the CPU) against one process on
the same global batch.

Greedy anchors (--temperature 0) make the runs comparable: each process samples from a random
stream of its own. The tolerances are the DDP test's (test_reliability.py): float32 sums in another
order (half batches, shards, then a reduction) differ in the last digits, and Adam carries such
differences on; a wrong gradient scale or a lost gradient is orders of magnitude larger.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from training import memory, sampling, setup  # noqa: E402
import train  # noqa: E402
from test_real_models import build_checkpoint, chat_records  # noqa: E402

BUILTIN = ["--sft-steps", "10", "--steps", "3", "--batch-size", "8", "--grad-accum", "2", "--log-every", "1",
           "--max-new-tokens", "4", "--temperature", "0", "--seed", "0", "--device", "cpu"]
HUB = ["--steps", "3", "--batch-size", "2", "--lr", "1e-4", "--warmup-steps", "0", "--max-new-tokens", "4",
       "--max-length", "96", "--log-every", "1", "--seed", "0", "--temperature", "0", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def torchrun(script, *arguments, processes=2):
    child = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={processes}", script, *arguments], cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr[-4000:]
    return child


def records(output_dir):
    """metrics.jsonl by (phase, step or when), the last of each winning, without the timing."""
    found = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for name in [name for name in record if name == "seconds_per_step" or name.startswith("tokens_per_second/")]:
            record.pop(name)
        found[(record["phase"], record.get("step", record.get("when")))] = record
    return found


def assert_same_run(one_dir, sharded_dir, weights_atol=5e-5, generation=None):
    one, sharded = records(one_dir), records(sharded_dir)
    assert set(one) == set(sharded)
    for key, entry in one.items():
        assert set(entry) == set(sharded[key]), key
        for name, value in entry.items():
            if isinstance(value, float):
                assert sharded[key][name] == pytest.approx(value, rel=1e-4, abs=1e-5), (key, name)
    # the saved policy: a whole Hugging Face folder, tied weights saved once, the same weights
    alone = AutoModelForCausalLM.from_pretrained(Path(one_dir) / "policy")
    loaded = AutoModelForCausalLM.from_pretrained(Path(sharded_dir) / "policy")
    assert json.loads((Path(sharded_dir) / "policy" / "config.json").read_text())["architectures"] == \
        json.loads((Path(one_dir) / "policy" / "config.json").read_text())["architectures"]
    expected, got = alone.state_dict(), loaded.state_dict()
    assert sorted(expected) == sorted(got)
    for name, value in expected.items():
        # Adam's updates of lr 5e-4 carry the sums' last digits on: measured up to 4.2e-6
        assert torch.allclose(got[name], value, rtol=0, atol=weights_atol), name
    tied = alone.get_output_embeddings().weight is alone.get_input_embeddings().weight
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
    # the generation config the run started from (end ids, sampling defaults), in both
    for folder in (one_dir, sharded_dir) if generation else ():
        saved = json.loads((Path(folder) / "policy" / "generation_config.json").read_text())
        assert {key: saved.get(key) for key in GENERATION_KEYS} == generation, folder


GENERATION_KEYS = ("eos_token_id", "temperature", "do_sample")


@pytest.mark.parametrize("case", ["tied", "untied", "tied-checkpointing"])
def test_a_sharded_step_gives_every_parameter_the_one_process_gradient(case):
    # The embeddings' gradient is the one a sharded model loses silently when they are computed
    # outside its forward; here every parameter's gradient, gathered, is the one-process gradient.
    kind, *rest = case.split("-")
    child = torchrun("tests/fsdp_step.py", kind, *(["--gradient-checkpointing"] if rest else []))
    report = json.loads(child.stdout.strip().splitlines()[-1])["params"]
    assert "model.embed_tokens.weight" in report and len(report) >= 10
    for name, entry in report.items():
        assert entry["has_grad"], name
        assert entry["expected_norm"] > 0, name
        assert entry["max_diff"] <= 1e-4 * entry["expected_norm"] + 1e-7, (name, entry)
    # memory.step_peak_bytes's sharded terms are what a process holds: half of each, to the rows
    # that an odd first dimension gives one shard more than the other
    result = json.loads(child.stdout.strip().splitlines()[-1])
    # the sampler of a sharded model on CUDA: the dynamic one, also for auto; static and graph
    # are refused (a CUDA graph would keep pointers to the storage FSDP frees at every reshard)
    assert result["sampler"]["auto"] == "dynamic"
    for method in ("static", "graph"):
        assert result["sampler"][method] == (f"refused: the {method} sampler cannot run this model: its weights "
                                             "are sharded (--fsdp): a CUDA graph would keep pointers to storage "
                                             "FSDP frees; use the dynamic sampler (--sampler dynamic, or auto)")
    formula = memory.step_peak_bytes(LlamaConfig(**result["config"]), 1, 4, 4, False, False, gpu=False, shards=2)
    for term, held in result["held"].items():
        assert held == pytest.approx(formula[term], rel=0.02), term


def test_gradient_accumulation_keeps_each_process_at_its_gradient_shard():
    # Between micro-batches of a step (--grad-accum 2) a process holds its shard of the gradient
    # (memory.step_peak_bytes's "gradients" term), as after a step of one micro-batch: the
    # gradients are reduce-scattered at every micro-batch. With FSDP2's sync off until the last
    # micro-batch, the probe sees what each process would hold: the whole model's gradient.
    child = torchrun("tests/fsdp_step.py", "accumulation", "32", "2")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    config = LlamaConfig(**result["config"])
    shard = memory.step_peak_bytes(config, 1, 4, 4, False, False, gpu=False, shards=2)["gradients"] / 4
    assert result["parameters"] == 30144  # the 2-layer model of hidden size 32 on the built-in vocabulary
    assert result["held"]["sync"] == [15088, 15088]  # rank 0's rows: the odd ones go to it
    assert result["held"]["sync"][0] == pytest.approx(shard, rel=0.02)
    assert result["held"]["nosync"] == [30144, 15088]


@pytest.mark.parametrize("n, batch_size, world_size, expected", [
    # 5 pairs over 2 processes in batches of 2 (4 / 2): rank 0 has 2 pairs, rank 1 has 3, so both
    # run 2 batches and rank 0's second is a filler (pair 0, left out)
    (5, 4, 2, [[([0, 1], True), ([0], False)], [([2, 3], True), ([4], True)]]),
    # 2 pairs over 3 processes: rank 0's share is empty, its one batch a filler
    (2, 4, 3, [[([0], False)], [([0], True)], [([1], True)]]),
    (3, 2, 1, [[([0, 1], True), ([2], True)]]),  # one process: --batch-size batches, no filler
])
def test_each_process_evaluates_its_share_in_as_many_batches_as_the_others(n, batch_size, world_size, expected,
                                                                           monkeypatch):
    from training import distributed, evaluate

    for rank in range(world_size):
        monkeypatch.setattr(distributed, "rank_and_size", lambda rank=rank: (rank, world_size))
        assert evaluate.process_rounds(list(range(n)), batch_size) == expected[rank]
    # every pair is evaluated once, by one process, and counted once
    kept = [pair for rounds in expected for batch, keep in rounds if keep for pair in batch]
    assert kept == list(range(n))


@pytest.mark.parametrize("case", ["triplet", "no-triplet-checkpointing"])
def test_sharded_run_matches_one_process_on_the_builtin_task(case, tmp_path):
    flags = [*BUILTIN, *(["--gamma", "0", "--gradient-checkpointing"] if case != "triplet" else [])]
    child = torchrun("train.py", *flags, "--fsdp", "--output-dir", str(tmp_path / "sharded"))
    assert "x 2 processes" in child.stdout and child.stdout.count("step 3/3") == 1
    assert "Warning" not in child.stderr and "warning" not in child.stderr, child.stderr[-3000:]
    train.main([*flags, "--output-dir", str(tmp_path / "one")])
    assert_same_run(tmp_path / "one", tmp_path / "sharded")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    for kind in ("qwen2", "llama3"):  # bfloat16, chat templates; tied and untied embeddings
        build_checkpoint(root / kind, kind)
    # Qwen2.5-Instruct's way: the model config names one end id, the generation config two and
    # its own sampling defaults, which a model rebuilt from the config alone would lose
    config = json.loads((root / "qwen2" / "config.json").read_text())
    generation = json.loads((root / "qwen2" / "generation_config.json").read_text())
    config["eos_token_id"] = generation["eos_token_id"][0]
    generation.update(temperature=0.6, do_sample=True)
    (root / "qwen2" / "config.json").write_text(json.dumps(config))
    (root / "qwen2" / "generation_config.json").write_text(json.dumps(generation))
    (root / "chat.jsonl").write_text("".join(json.dumps(record) + "\n" for record in chat_records()))
    return root


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_sharded_run_matches_one_process_on_a_hub_shaped_checkpoint(kind, hub, tmp_path):
    flags = ["--model", str(hub / kind), "--data", str(hub / "chat.jsonl"), *HUB]
    child = torchrun("train.py", *flags, "--fsdp", "--output-dir", str(tmp_path / "sharded"))
    assert "saved in bfloat16" in child.stdout
    train.main([*flags, "--output-dir", str(tmp_path / "one")])
    generation = json.loads((hub / kind / "generation_config.json").read_text())
    assert_same_run(tmp_path / "one", tmp_path / "sharded",
                    generation={key: generation.get(key) for key in GENERATION_KEYS})
    if kind == "qwen2":
        assert len(generation["eos_token_id"]) == 2 and generation["temperature"] == 0.6


def test_the_other_processes_read_the_checkpoints_generation_config(hub):
    # rank 0 loads --model with from_pretrained; the others build it on the meta device, and
    # sample their anchors with the checkpoint's end ids too
    args = train.parse_args(["--model", str(hub / "qwen2"), "--fsdp", "--device", "cpu"])
    tokenizer = setup.load_tokenizer(args)
    meta = setup.build_model(args, torch.device("cpu"), tokenizer, rank=1)
    end_ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert meta.device.type == "meta" and meta.config.eos_token_id == end_ids[0]
    assert meta.generation_config.eos_token_id == end_ids and meta.generation_config.temperature == 0.6
    assert sampling.end_ids(meta, tokenizer) == tuple(sorted(end_ids))


def test_a_sharded_run_resumes_exactly(tmp_path):
    # sampled anchors (temperature 0.8): each process's random stream is in the checkpoint too
    flags = ["--sft-steps", "10", "--batch-size", "8", "--log-every", "1", "--max-new-tokens", "4", "--seed", "0",
             "--device", "cpu", "--save-every", "2", "--fsdp"]
    torchrun("train.py", *flags, "--steps", "4", "--output-dir", str(tmp_path / "whole"))
    torchrun("train.py", *flags, "--steps", "2", "--output-dir", str(tmp_path / "stopped"))
    checkpoints = tmp_path / "stopped" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["reference", "step-000002"]
    assert (checkpoints / "step-000002" / "train.pt").is_file()
    resumed = torchrun("train.py", *flags, "--steps", "4", "--output-dir", str(tmp_path / "stopped"),
                       "--resume", "latest")
    assert "resumed from" in resumed.stdout and "step 2 of 4 done" in resumed.stdout
    whole, stopped = records(tmp_path / "whole"), records(tmp_path / "stopped")
    assert stopped.pop(("resume", 2))["checkpoint"].endswith("step-000002")
    assert set(whole) == set(stopped)
    for key, entry in whole.items():
        assert stopped[key] == entry, key  # the steps after the checkpoint and the evaluation after it
    assert sorted(p.name for p in checkpoints.iterdir()) == ["reference", "step-000002", "step-000004"]  # newest two
    # a sharded checkpoint continues a sharded run only
    with pytest.raises(SystemExit, match=r"that run had --fsdp True \(now False\)"):
        train.main([*[f for f in flags if f != "--fsdp"], "--steps", "5", "--output-dir",
                    str(tmp_path / "stopped"), "--resume", "latest"])


def test_a_sharded_checkpoint_holds_its_train_pt_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    # A crash between the rename and a later write would leave a newest checkpoint that --resume
    # latest cannot load: train.pt is written into the temporary folder, before the rename.
    import torch.distributed as dist

    from training import checkpoints

    renamed = []

    def replace(source, target):
        renamed.append((source, target, sorted(os.listdir(source)) if os.path.isdir(source) else None))
        os.rename(source, target)

    monkeypatch.setattr(checkpoints.os, "replace", replace)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        folder = str(tmp_path / "step-000001")
        checkpoints.save_sharded({"policy": {"weight": torch.ones(3)}}, folder, {"step": 1})
    finally:
        dist.destroy_process_group()
    (source, target, held), = [entry for entry in renamed if entry[1] == folder]
    assert source == folder + ".tmp" and "train.pt" in held
    assert torch.load(os.path.join(folder, "train.pt"), weights_only=True) == {"step": 1}


def test_fsdp_needs_torchrun_and_the_dynamic_sampler(capsys):
    with pytest.raises(SystemExit, match=r"--fsdp runs under torchrun \(torchrun --nproc_per_node=N"):
        train.main(["--fsdp", "--steps", "1"])
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--fsdp", "--sampler", "graph"])
    assert stop.value.code == 2
    assert "--sampler graph cannot run a sharded model (--fsdp)" in capsys.readouterr().err
