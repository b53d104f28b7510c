"""What train.py runs on: the machinery beside the lesson (tidpo.py, train.py, data.py).

    hf_datasets.py     --data as a Hugging Face dataset, in TRL's formats
    builtin_task.py    the built-in synthetic task and its judge
    memory.py          bounded-memory log-probs and KL, activation checkpointing, the memory formula
    plain_sampler.py   the rules every sampler shares, and the plain ("dynamic") sampler
    static_sampler.py  the fast sampler: a static KV cache and a CUDA graph
    sampling.py        which sampler runs: sample()
    distributed.py     torchrun: DDP and FSDP2
    lora.py            --lora-r: LoRA adapters, the reference as the base with them off, the merged save
    checkpoints.py     checkpoints, resuming, the saved policy
    stopping.py        SIGTERM and Ctrl-C: the step ends, a checkpoint, one line to continue
    evaluate.py        the held-out evaluation and its metrics
    plots.py           a run's curves, and runs side by side
    tracking.py        tokens per second; the records in TensorBoard or Weights & Biases
    setup.py           the flag checks, the device, tokenizer, pairs and model, first-run checks

Each module imports only tidpo.py, data.py and the modules listed above it (tests/test_layout.py
checks it), so that no import climbs from the machinery back up to train.py or the tools.
"""
