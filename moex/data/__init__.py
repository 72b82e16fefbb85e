"""Data: tokenizers (byte, Hugging Face, SentencePiece), file sources with a token cache,
grain pipelines; prepared token shards (moex.data.prepare, moex.data.shards)."""

from moex.data.pipeline import build
from moex.data.pipeline import Data
from moex.data.pipeline import data_checkpoint_handler
from moex.data.pipeline import data_restore_args
from moex.data.pipeline import data_save_args
from moex.data.pipeline import eval_batches
from moex.data.pipeline import PackedWindows
from moex.data.pipeline import train_iterator
from moex.data.sources import resolve_files
from moex.data.sources import split_files
from moex.data.sources import tokenized_array
from moex.data.tokenizer import ByteTokenizer
from moex.data.tokenizer import get_tokenizer
from moex.data.tokenizer import HFTokenizer
from moex.data.tokenizer import id_dtype
from moex.data.tokenizer import SPTokenizer
from moex.data.tokenizer import Tokenizer
