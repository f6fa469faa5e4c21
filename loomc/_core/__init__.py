"""The engine of one loop: budgets, ledgers, the pure policy core, the run protocol and its drivers."""
