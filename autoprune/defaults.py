"""The defaults every stage shares, spelled once (the CLI, the API, export and bench read them here).

This module imports nothing heavy, so ``autoprune --help`` can show them without loading torch.
"""

FINETUNE_LR = 0.01  # SGD learning rate of every fine-tune of a pruned model (trials, final, bench)
BASE_LR = 0.05  # SGD learning rate for training a base model from scratch
