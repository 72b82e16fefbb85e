"""Checkpoints in and out: Hugging Face model directories (safetensors + config.json).

families/ maps each architecture's config.json and tensor names to moex's config and
parameters (one file per family, registered in families/__init__.py); safetensors_dir.py
reads and writes the files one tensor at a time and swaps an export directory in;
hf.py builds sharded parameters from them and writes them back; convert.py is the import
and export flow that `python -m moex.convert` calls.
"""
