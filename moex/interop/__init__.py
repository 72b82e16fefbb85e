"""Checkpoints in and out: Hugging Face model directories (safetensors + config.json).

families.py maps each architecture's config.json and tensor names to moex's config and
parameters; safetensors_dir.py reads and writes the files one tensor at a time; hf.py builds
sharded parameters from them and writes them back. `python -m moex.convert` is the command.
"""
