"""The README and docs are true: their commands, worked example and code run as printed, and
every file they link to exists."""

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
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
    # The README: on "doctor" and "promptly" the triplet's 2 gamma (w_t - a_t) (+0.100, +0.058) outweighs
    # Eq. 12's push -beta (1 - sigmoid(beta Delta)) w_t (-0.057, -0.043); on the other three tokens it does not.
    sys.path.insert(0, str(ROOT / "examples"))
    import tidpo
    import worked_example as example

    chosen, rejected = example.PAIR["chosen"], example.PAIR["rejected"]
    chosen_lr = torch.tensor([chosen["logratio"]], dtype=torch.float64, requires_grad=True)
    rejected_lr = torch.tensor([rejected["logratio"]], dtype=torch.float64)
    anchor = torch.tensor([example.ANCHOR["logratio"]], dtype=torch.float64)
    masks = [torch.ones_like(x) for x in (chosen_lr, rejected_lr, anchor)]
    chosen_w = tidpo.hybrid_weights(torch.tensor([chosen["importance"]], dtype=torch.float64), masks[0],
                                    lam=example.LAM)
    rejected_w = tidpo.hybrid_weights(torch.tensor([rejected["importance"]], dtype=torch.float64), masks[1],
                                      lam=example.LAM)
    grads = {}
    for gamma in (example.GAMMA, 0.0):
        loss, _ = tidpo.tidpo_loss(chosen_lr, rejected_lr, torch.zeros_like(chosen_lr), torch.zeros_like(rejected_lr),
                                   chosen_w, rejected_w, beta=example.BETA, anchor_logratios=anchor,
                                   anchor_mask=masks[2], chosen_mask=masks[0], rejected_mask=masks[1], gamma=gamma,
                                   margin=example.MARGIN)
        (grads[gamma],) = torch.autograd.grad(loss, chosen_lr)
    from_triplet, from_dpo = (grads[example.GAMMA] - grads[0.0])[0].tolist(), grads[0.0][0].tolist()
    a, w = example.ANCHOR["logratio"], chosen["logratio"]
    for t in range(5):  # Eq. 38: 2 gamma (w_t - a_t) where the anchor has position t, else 0
        expected = 2 * example.GAMMA * (w[t] - a[t]) if t < len(a) else 0.0
        assert math.isclose(from_triplet[t], expected, abs_tol=1e-12), t
    text = " ".join(README.split())
    for t, word in ((2, "doctor"), (3, "promptly")):
        assert f'"{word}" (${from_triplet[t]:+.3f}$ against ${from_dpo[t]:.3f}$)' in text, word
    wins = [from_triplet[t] + from_dpo[t] > 0 for t in range(5)]
    assert wins == [False, False, True, True, False]
    assert "but not on the other three tokens" in text


def test_readme_loss_snippet_runs_beside_a_lone_copy_of_tidpo(tmp_path):
    # Exactly the README's block, in a folder that holds only tidpo.py, as a user who copied the file
    (snippet,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    (tmp_path / "tidpo.py").write_text((ROOT / "tidpo.py").read_text())
    (tmp_path / "block.py").write_text(snippet)
    result = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "block.py"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    # policy == reference: every log-ratio is 0 (the anchor's too), so the loss is -log sigmoid(0) = log 2,
    # plus gamma times the triplet's margin alone, max(0, 0 - 0 + 0.01)
    assert result.stdout.strip() == f"loss {math.log(2) + 0.1 * 0.01:.4f}, margin 0.0000"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["block.py", "tidpo.py"]


def test_readme_loss_snippet_gives_every_parameter_a_gradient():
    (snippet,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    namespace = {}
    torch.manual_seed(0)
    exec(snippet, namespace)
    assert namespace["anchor_response"].sum() > 0
    assert (namespace["anchor_logps"] - namespace["anchor_ref"]).abs().max().item() == 0.0
    assert all(p.grad is not None for p in namespace["policy"].parameters())


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


def test_pyproject_installs_tidpo_alone_as_a_module(tmp_path):
    # pip builds the package from a copy of the three files it reads; the wheel holds tidpo.py only,
    # and once installed, `import tidpo` works from any folder. The build uses this environment's
    # setuptools (no network for an isolated build): it needs one that builds wheels itself.
    import importlib.util

    setuptools = pytest.importorskip("setuptools")
    if tuple(int(part) for part in setuptools.__version__.split(".")[:2]) < (70, 1) and \
            importlib.util.find_spec("wheel") is None:
        pytest.skip(f"setuptools {setuptools.__version__} builds wheels only with the wheel package")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "tidpo.py", "README.md"):
        (source / name).write_text((ROOT / name).read_text())
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"),
                            str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("tidpo-*.whl")
    import zipfile

    assert [n for n in zipfile.ZipFile(wheel).namelist() if not n.startswith("tidpo-")] == ["tidpo.py"]
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    (tmp_path / "elsewhere").mkdir()
    check = subprocess.run([sys.executable, "-c", "import tidpo; print(tidpo.gaussian_prior(5).tolist()[2])"],
                           cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "1.0"


def test_every_command_the_readme_and_docs_show_exists_and_runs_help():
    # `python FILE.py ...` and `python -m MODULE ...` as the pages print them; pip, pytest, venv and
    # torchrun's module are other programs. All at once, each in its own process.
    shown = set()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for module, path in re.findall(r"python (?:-m ([\w.]+)|([\w/]+\.py))", page.read_text()):
            if module not in ("pip", "pytest", "venv", "torch.distributed.run") and not module.endswith("NAME"):
                shown.add(("-m", module) if module else (path,))
    assert ("train.py",) in shown and ("-m", "tools.bench") in shown and ("-m", "tools.experiments") in shown
    if importlib.util.find_spec("trl") is None:  # the TRL recipe's --help needs TRL (.ci/run installs it)
        shown.discard(("examples/trl_tidpo.py",))
    running = {command: subprocess.Popen([sys.executable, *command, "--help"], cwd=ROOT, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for command in sorted(shown)}
    for command, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0 and "usage" in out.lower(), f"python {' '.join(command)} --help: {err}"
