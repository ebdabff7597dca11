"""`peft-ft sweep`: the search space, the Optuna study and its report."""
