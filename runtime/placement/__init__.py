"""Where a model runs: devices.py (what the machine offers, measured), model_sizes.py (what
each tensor costs), plan_cost.py (predicted tokens/s), planner.py (the placement that
maximises it within memory budgets), device_map.py (the result, per tensor and layer),
auto_placement.py. `tandem plan` prints a plan (runtime/cli/plan_report.py); the cost
model's figures are in docs/planner.md."""
