"""Real text and tokenizers trained on it in a second, for the tests (no downloads)."""

import pathlib
import sysconfig

import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

# Stdlib files every Python has: what the test tokenizers are trained on.
STDLIB_SAMPLE = ("textwrap.py", "glob.py", "fnmatch.py", "shlex.py", "string.py")


def stdlib_text(name: str) -> str:
  """The text of a file of the running Python's standard library."""
  return (pathlib.Path(sysconfig.get_paths()["stdlib"]) / name).read_text("utf-8")


def train_bpe(directory: pathlib.Path) -> pathlib.Path:
  """A GPT-2 style byte-level BPE (800 ids; <|endoftext|> and <|padding|> special) trained
  on STDLIB_SAMPLE, saved as directory/tokenizer.json; returns the directory."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=800, special_tokens=["<|endoftext|>", "<|padding|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([stdlib_text(n) for n in STDLIB_SAMPLE], trainer)
  tok.save(str(directory / "tokenizer.json"))
  return directory


def train_sentencepiece(directory: pathlib.Path) -> pathlib.Path:
  """A SentencePiece BPE (400 ids, byte fallback, identity normalization, whitespace kept,
  as Llama's and Mistral's are set up) trained on STDLIB_SAMPLE; returns
  directory/tokenizer.model."""
  corpus = directory / "corpus.txt"
  corpus.write_text("".join(stdlib_text(n) for n in STDLIB_SAMPLE), "utf-8")
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=400,
      model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, max_sentence_length=1 << 20, minloglevel=2)
  corpus.unlink()
  (directory / "tokenizer.vocab").unlink()
  return directory / "tokenizer.model"


def write_word_level(directory: pathlib.Path, size: int) -> pathlib.Path:
  """A whitespace WordLevel tokenizer of words w0..w{size-1} (w0 the unknown one, no
  specials): directory/tokenizer.json; returns the directory."""
  tok = tokenizers.Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)},
                                              unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(directory / "tokenizer.json"))
  return directory


def write_jsonl_corpus(directory: pathlib.Path, files: int = 4, docs: int = 3000,
                       prefix: str = "") -> str:
  """`docs` JSON lines {"text": ...} over `files` files of directory/: blocks of 12 lines of
  stdlib modules (from the first module on, in order), `prefix` before each; returns a glob."""
  import json  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  blocks = []
  for path in sorted(root.glob("*.py")):
    lines = path.read_text("utf-8", errors="replace").splitlines(keepends=True)
    blocks += ["".join(lines[i:i + 12]) for i in range(0, len(lines), 12)]
    if len(blocks) >= docs:
      break
  directory.mkdir(parents=True, exist_ok=True)
  for f in range(files):
    with open(directory / f"part-{f}.jsonl", "w", encoding="utf-8") as out:
      for text in blocks[f:docs:files]:
        out.write(json.dumps({"text": prefix + text}) + "\n")
  return str(directory / "*.jsonl")
