"""Scaling laws: published ones (laws), fitted to moex runs (runs, fit), and compute budgets
planned with them (plan, shapes); the command is python -m moex.scaling (fit | plan)."""
