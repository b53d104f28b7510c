"""The README's code runs as printed: its loss snippet, on a tiny model."""

import math
import re
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tidpo  # noqa: E402


def readme_python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_starts_with_the_install_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)[1]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["pip install -r requirements.txt && python train.py", "python -m pytest -q tests"]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == "python -m pytest -q tests"


def test_readme_loss_snippet_runs_and_gives_dpo_at_the_start():
    (snippet,) = readme_python_blocks()
    namespace = {}
    exec(snippet, namespace)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    policy = LlamaForCausalLM(config).eval()
    ref = LlamaForCausalLM(config).eval()
    ref.load_state_dict(policy.state_dict())
    input_ids = torch.randint(0, 30, (4, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0  # a right-padded row
    response_mask = torch.zeros_like(input_ids)
    response_mask[:, 3:5] = 1
    loss, metrics = namespace["tidpo_batch_loss"](policy, ref, input_ids, attention_mask, response_mask, n=2)
    # policy == reference: every log-ratio is 0, so the loss is -log sigmoid(0) = log 2
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    assert metrics["rewards/margins"].item() == 0.0
