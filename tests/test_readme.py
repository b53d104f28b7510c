"""The README and docs are true: their commands, worked example and code run as printed, and
every file they link to exists."""

import math
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_install_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S)[1]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["pip install -r requirements.txt && python train.py", "python -m pytest -q tests"]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == "python -m pytest -q tests"


def test_readme_worked_example_is_what_the_script_prints():
    printed = re.search(r"```\n\$ python examples/worked_example\.py\n(.*?)```", README, flags=re.S)[1]
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "worked_example.py")], capture_output=True,
                            text=True, check=True)
    assert result.stdout == printed


def test_worked_example_numbers_by_hand():
    # The chosen response's hybrid weight of "doctor": I_norm = 2.1 / 9.8, P_norm = 1 / (1 + 2 * 0.7261
    # + 2 * 0.2780), w = 5 * (0.7 * I_norm + 0.3 * P_norm); the loss -log sigmoid(0.1 * Delta).
    p_norm = 1 / (1 + 2 * math.exp(-0.5 * (1 / 1.25) ** 2) + 2 * math.exp(-0.5 * (2 / 1.25) ** 2))
    assert f"{5 * (0.7 * 2.1 / 9.8 + 0.3 * p_norm):.4f}" in README
    delta = float(re.search(r"Delta_r_token = ([\d.]+)", README)[1])
    assert f"L_DPO-w = -log sigmoid(0.1 * {delta:.4f}) = {-math.log(1 / (1 + math.exp(-0.1 * delta))):.4f}" in README


def test_readme_triplet_gradient_on_the_worked_example():
    # The README: each chosen token's log-ratio gets +0.196 from the triplet (2 gamma (b - d)) and
    # -0.046 w_t from Eq. 12, so the net gradient is positive on every chosen token.
    sys.path.insert(0, str(ROOT / "examples"))
    import tidpo
    import worked_example as example

    chosen = example.PAIR["chosen"]
    rejected = example.PAIR["rejected"]
    chosen_lr = torch.tensor([chosen["logratio"]], dtype=torch.float64, requires_grad=True)
    rejected_lr = torch.tensor([rejected["logratio"]], dtype=torch.float64)
    chosen_w = tidpo.hybrid_weights(torch.tensor([chosen["importance"]], dtype=torch.float64),
                                    torch.ones_like(chosen_lr), lam=example.LAM)
    rejected_w = tidpo.hybrid_weights(torch.tensor([rejected["importance"]], dtype=torch.float64),
                                      torch.ones_like(rejected_lr), lam=example.LAM)
    grads = {}
    for triplet_grad in ("all", "anchor"):
        loss, metrics = tidpo.tidpo_loss(chosen_lr, rejected_lr, torch.zeros_like(chosen_lr),
                                         torch.zeros_like(rejected_lr), chosen_w, rejected_w, beta=example.BETA,
                                         anchor_logratio=torch.tensor([example.ANCHOR_LOGRATIO], dtype=torch.float64),
                                         gamma=example.GAMMA, margin=example.MARGIN, triplet_grad=triplet_grad)
        (grads[triplet_grad],) = torch.autograd.grad(loss, chosen_lr)
    from_triplet = grads["all"] - grads["anchor"]
    from_dpo_per_weight = grads["anchor"] / chosen_w
    assert "each chosen token gets $+0.196$ from the triplet and\n$-0.046\\, w^w_t$ from Eq. 12" in README
    assert torch.allclose(from_triplet, torch.full_like(from_triplet, 0.196), atol=5e-13)  # 2 * 0.1 * (0.78 + 0.20)
    assert torch.allclose(from_dpo_per_weight, torch.full_like(from_dpo_per_weight, -0.046), atol=5e-4)
    assert f"$w^w_t \\le {chosen_w.max().item():.2f}$" in README
    assert (grads["all"] > 0).all()


def test_readme_loss_snippet_runs_and_gives_log_2_plus_the_triplet_margin_at_the_start(capsys):
    (snippet,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    sys.path.insert(0, str(ROOT))
    namespace = {}
    torch.manual_seed(0)
    exec(snippet, namespace)
    # policy == reference: every log-ratio is 0 (the anchor's too), so the loss is -log sigmoid(0) = log 2,
    # plus gamma times the triplet's margin alone, max(0, 0 - 0 + 0.01)
    assert namespace["anchor_logratio"].abs().max().item() == 0.0 and namespace["anchor_response"].sum() > 0
    assert math.isclose(namespace["loss"].item(), math.log(2) + 0.1 * 0.01, rel_tol=1e-6)
    assert namespace["metrics"]["rewards/margins"].item() == 0.0
    assert all(p.grad is not None for p in namespace["policy"].parameters())
    assert capsys.readouterr().out.strip() == "loss 0.6941, margin 0.0000"


def test_every_link_in_the_readme_and_docs_points_to_a_file_in_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_no_file_refers_to_a_file_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in tracked or [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")]:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".txt") and path.exists():
            assert "METHOD" + ".md" not in path.read_text(), name  # a notes file that is not in the repository
