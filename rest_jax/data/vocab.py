"""Vocabularies: SentencePiece (train one on sentences, or load an existing one) and Hugging Face tokenizers.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 4) trains its translation
policies from scratch on each task with a joint source-target SentencePiece
vocabulary of 32k pieces. The ids follow T5: pad=0, eos=1, unk=2 and no BOS, so
models and checkpoints interoperate with T5X and with T5/mT5 `.model` files,
which `load_vocabulary` accepts by path (local or gs://).

A Hugging Face tokenizer (`tokenizer.json`, for converted Llama/Mistral/Gemma checkpoints, issue 17) loads as
`HuggingFaceVocabulary`, its ids renumbered so that pad = 0 and EOS = 1: rest_jax, like T5X, reserves those two
ids everywhere (batches, Grow stores, samplers, losses), where Llama 2 has <unk> 0, <s> 1, </s> 2 and Llama 3
'!' 0 and no pad. One permutation swaps the pad token into 0 and the EOS into 1;
`rest_jax.convert_lm.load_hf_checkpoint(folder, vocab)` permutes the embedding and output rows the same way,
so a converted model computes on renumbered ids exactly what it computed before. A decoder-only prompt starts
with the tokenizer's BOS when it has one (`prompt_start_id`), as the checkpoint saw in pre-training.

A task's vocabulary (its text, the `vocab` subcommand, a run's own copy) is `rest_jax.data.task_vocab`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
from typing import Any, Iterable, Mapping, Optional, Sequence

import gin
import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import seqio
import sentencepiece as spm
import tensorflow as tf
import tokenizers
from sentencepiece import sentencepiece_model_pb2

from rest_jax.data.special_tokens import EOS_ID, PAD_ID, UNK_ID
from rest_jax.io import atomic


DEFAULT_MODEL_NAME = "sentencepiece.model"


def _sample_sentences(sentences: Iterable[str], max_sentences: int, seed: int) -> tuple[list[str], int]:
    """Deterministic reservoir sample of at most `max_sentences` sentences.

    SentencePiece's own `input_sentence_size` sampling is not seeded; sampling
    here keeps a vocabulary reproducible from (text, seed).
    """
    rng = random.Random(seed)
    reservoir: list[str] = []
    count = 0
    for count, sentence in enumerate(sentences, start=1):
        if len(reservoir) < max_sentences:
            reservoir.append(sentence)
        else:
            j = rng.randrange(count)
            if j < max_sentences:
                reservoir[j] = sentence
    return reservoir, count


@gin.configurable(denylist=["sentences", "output_dir", "metadata"])
def train_vocabulary(
    sentences: Iterable[str],
    output_dir: str,
    vocab_size: int = 32000,
    model_name: str = DEFAULT_MODEL_NAME,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    max_sentences: int = 1_000_000,
    num_threads: Optional[int] = None,
    byte_fallback: bool = False,
    seed: int = 0,
    metadata: Optional[dict] = None,
) -> str:
    """Trains a T5-style SentencePiece model and stores it atomically.

    Args:
      sentences: training text, one sentence per item (source and target sides
        together for a joint vocabulary).
      output_dir: directory (local or gs://) that receives `model_name`, a
        human-readable `.vocab` listing and a `.json` with training metadata.
      vocab_size: number of pieces, including pad/eos/unk (32000 in the paper).
      model_name: file name of the model inside `output_dir`.
      model_type: SentencePiece algorithm: "unigram" (T5's choice) or "bpe".
      character_coverage: 1.0 for alphabetic scripts; about 0.9995 for Chinese.
      max_sentences: cap on the sentences used for training, sampled with
        `seed`; keeps training fast on WMT-sized corpora.
      num_threads: training threads; default: all CPUs.
      byte_fallback: map unknown characters to byte pieces instead of unk.
      seed: seed of the sentence sample.
      metadata: extra fields for the metadata file (e.g. the task name).

    Returns:
      The path of the trained `.model` file.
    """
    sample, total = _sample_sentences(
        (s for s in sentences if s.strip()), max_sentences, seed
    )
    if not sample:
        raise ValueError("No training text for the SentencePiece vocabulary.")
    model = _train_model_proto(
        sample, vocab_size, model_type, character_coverage, num_threads, byte_fallback
    )
    tf.io.gfile.makedirs(output_dir)
    path = os.path.join(output_dir, model_name)
    base = path[: -len(".model")] if path.endswith(".model") else path
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    listing = "".join(f"{p.piece}\t{p.score:g}\n" for p in proto.pieces)
    info = {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "character_coverage": character_coverage,
        "sentences_seen": total,
        "sentences_used": len(sample),
        "seed": seed,
        "ids": {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID, "bos": None},
        **(metadata or {}),
    }
    # The model goes last: its presence tells `ensure_vocabulary` all is written.
    atomic.write_text(base + ".vocab", listing)
    atomic.write_json(base + ".json", info, sort_keys=False)
    atomic.write_bytes(path, model)
    return path


def _train_model_proto(
    sentences: Sequence[str],
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    num_threads: Optional[int],
    byte_fallback: bool,
) -> bytes:
    writer = _BytesWriter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            input_sentence_size=0,
            num_threads=num_threads or os.cpu_count() or 1,
            byte_fallback=byte_fallback,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"SentencePiece training failed on {len(sentences)} sentences with "
            f"vocab_size={vocab_size}: {e}"
        ) from e
    return writer.data


class _BytesWriter:
    """File-like sink for `SentencePieceTrainer.train(model_writer=...)`."""

    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


@gin.configurable(denylist=["path"])
def load_vocabulary(path: str, extra_ids: int = 0) -> seqio.Vocabulary:
    """Loads a SentencePiece model by path (local or gs://), checking T5 ids, or a Hugging Face tokenizer.

    Args:
      path: a `.model` file (ours, T5's or mT5's), or a directory holding
        `sentencepiece.model`; or a tokenizer.json, or a directory holding one (`HuggingFaceVocabulary`).
      extra_ids: sentinel ids appended at the end (T5 pre-training uses 100).

    Returns:
      The vocabulary, with pad=0, eos=1 (and unk=2 for SentencePiece).
    """
    if is_hf_tokenizer(path):
        return HuggingFaceVocabulary(path)
    if tf.io.gfile.isdir(path):
        path = os.path.join(path, DEFAULT_MODEL_NAME)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"SentencePiece model not found: {path}. Train one with "
            "`python -m rest_jax.data.task_vocab --task=NAME --output=DIR --vocab_size=N`, "
            "or give the path of an existing T5/mT5 .model file."
        )
    vocab = seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
    try:
        tok = vocab.tokenizer
    except Exception as e:  # noqa: BLE001 - protobuf/sentencepiece raise various types
        raise ValueError(
            f"{path} is not a SentencePiece model (truncated, or another kind of file): "
            f"{type(e).__name__}: {e}"
        ) from e
    ids = (tok.pad_id(), tok.eos_id(), tok.unk_id())
    if ids != (PAD_ID, EOS_ID, UNK_ID):
        raise ValueError(
            f"{path}: SentencePiece ids (pad, eos, unk) are {ids}, but rest_jax (like T5) "
            f"needs ({PAD_ID}, {EOS_ID}, {UNK_ID}); retrain with pad_id=0 eos_id=1 unk_id=2."
        )
    return vocab


def check_fits_model(vocabulary: seqio.Vocabulary, model_vocab_size: int, what: str, advice: str) -> None:
    """Raises ValueError when `vocabulary` has more ids than the model's embedding table.

    Ids past the table give NaN embeddings, which surface far downstream (NaN log-probs inside Grow).
    Vocabularies without a `vocab_size` (test stand-ins) are not checked.
    """
    size = getattr(vocabulary, "vocab_size", None)
    if size is None or size <= model_vocab_size:
        return
    where = getattr(vocabulary, "sentencepiece_model_file", None)
    raise ValueError(f"{what}{f' {where}' if where else ''} has {size} ids but the model has "
                     f"vocab_size={model_vocab_size}; {advice}")


def vocab_file(vocab: str | os.PathLike | seqio.Vocabulary) -> str:
    """The file a vocabulary is read from: a path as given, a SentencePiece model file, a tokenizer.json."""
    path = getattr(vocab, "sentencepiece_model_file", None) or getattr(vocab, "path", vocab)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"Cannot tell the file of vocabulary {vocab!r}: give the SentencePiece model file path.")
    return os.fspath(path)


def vocab_fingerprint(vocab: str | os.PathLike | seqio.Vocabulary) -> str:
    """sha256 of the vocabulary file (a path, or a SentencePieceVocabulary's model file, or the tokenizer.json
    of a Hugging Face tokenizer or its folder), and of `HuggingFaceVocabulary.add_prefix_space` where set (it
    changes every id sequence)."""
    path = vocab_file(vocab)
    if tf.io.gfile.isdir(path) and is_hf_tokenizer(path):
        path = os.path.join(path, TOKENIZER_FILE)
    with tf.io.gfile.GFile(path, "rb") as f:
        digest = hashlib.sha256(f.read())
    if getattr(vocab, "add_prefix_space", False):
        digest.update(b"\0add_prefix_space")
    return digest.hexdigest()


TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers save the chat template


def _chat_template(config: Mapping[str, Any], folder: str) -> str | None:
    """The folder's default chat template: tokenizer_config.json's `chat_template` (a string, or a list of
    {name, template} of which 'default' is used), else chat_template.jinja; None when it has none."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and tf.io.gfile.exists(os.path.join(folder, CHAT_TEMPLATE_FILE)):
        with tf.io.gfile.GFile(os.path.join(folder, CHAT_TEMPLATE_FILE)) as f:
            template = f.read()
    return template


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def render_chat(template: str, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                **special_tokens: str | None) -> str:
    """Renders a Hugging Face chat template (Jinja) as transformers' `apply_chat_template` does: a sandboxed
    environment with trimmed blocks, loop controls, `raise_exception` and `strftime_now`, and `tojson` without
    HTML escaping."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                            **special_tokens)


def _token_name(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def is_hf_tokenizer(path: str) -> bool:
    """Whether `path` is a tokenizer.json or a folder holding one."""
    return os.path.basename(path) == TOKENIZER_FILE or tf.io.gfile.exists(os.path.join(path, TOKENIZER_FILE))


@gin.configurable(denylist=["path"])
class HuggingFaceVocabulary(seqio.Vocabulary):
    """A `tokenizers` tokenizer with pad = 0 and EOS = 1 (ids renumbered; see the module docstring).

    Args:
      path: A folder with tokenizer.json (and tokenizer_config.json, which names the special tokens), or the
        tokenizer.json itself.
      pad_token: The token that becomes id 0; default the config's pad_token, else its unk_token. Tokenizers
        with neither (Llama 3) need one named, e.g. '<|reserved_special_token_0|>'.
      eos_token: Default the config's eos_token.
      add_prefix_space: Encode every text as the word-initial tokens it has after a space in running text
        (" " + text; decoding drops that space), as SentencePiece does and as HF's `add_prefix_space` does for
        GPT-2. A byte-level BPE (GPT-2, Llama 3, Qwen) attaches a word's leading space to the word, so sources
        and completions encoded on their own join a decoder-only prompt's text ("German: Das") only this way
        (`PromptFormat.pieces` leaves the space out of the template). It changes every id sequence, so it is
        part of the vocabulary's identity (`vocab_fingerprint`: Grow stores made without it are refused).
    """

    def __init__(self, path: str, pad_token: str | None = None, eos_token: str | None = None,
                 add_prefix_space: bool = False):
        folder = os.path.dirname(path) if os.path.basename(path) == TOKENIZER_FILE else path
        file = os.path.join(folder, TOKENIZER_FILE)
        if not tf.io.gfile.exists(file):
            raise FileNotFoundError(f"No {TOKENIZER_FILE} at {folder}.")
        with tf.io.gfile.GFile(file) as f:
            self._tokenizer = tokenizers.Tokenizer.from_str(f.read())
        config: dict[str, Any] = {}
        if tf.io.gfile.exists(os.path.join(folder, CONFIG_FILE)):
            with tf.io.gfile.GFile(os.path.join(folder, CONFIG_FILE)) as f:
                config = json.load(f)
        self.path = file
        self.add_prefix_space = bool(add_prefix_space)
        pad_token = pad_token or _token_name(config.get("pad_token")) or _token_name(config.get("unk_token"))
        eos_token = eos_token or _token_name(config.get("eos_token"))
        bos_token = _token_name(config.get("bos_token"))
        self.chat_template = _chat_template(config, folder)
        self.special_tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token,
                               "unk_token": _token_name(config.get("unk_token"))}
        for what, token in (("pad", pad_token), ("eos", eos_token)):
            if token is None:
                raise ValueError(f"{folder}: {CONFIG_FILE} names no {what} token; pass {what}_token= (a special "
                                 "token the model never needs to predict, for pad).")
        size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        hf_pad, hf_eos = (self._token_id(t, folder) for t in (pad_token, eos_token))
        if hf_pad == hf_eos:
            raise ValueError(f"{folder}: the pad and EOS tokens are the same ({pad_token!r}); name another pad_token.")
        # rest id -> tokenizer id: swap the pad into 0 and the EOS into 1.
        hf_of = np.arange(size)
        for rest_id, hf_id in ((PAD_ID, hf_pad), (EOS_ID, hf_eos)):
            where = int(np.flatnonzero(hf_of == hf_id)[0])
            hf_of[rest_id], hf_of[where] = hf_of[where], hf_of[rest_id]
        self.hf_ids = hf_of
        self._rest_of = np.argsort(hf_of)
        self.prompt_start_id = int(self._rest_of[self._token_id(bos_token, folder)]) if bos_token else PAD_ID
        super().__init__(extra_ids=0)

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The text of `messages` in the tokenizer's chat template, followed by the assistant's turn opening
        (`add_generation_prompt`), without the BOS a prompt already starts with (`prompt_start_id`)."""
        if self.chat_template is None:
            raise ValueError(f"{os.path.dirname(self.path)} has no chat template ({CONFIG_FILE}'s chat_template or "
                             f"{CHAT_TEMPLATE_FILE}); set PromptFormat.chat = False.")
        text = render_chat(self.chat_template, messages, **self.special_tokens)
        bos = self.special_tokens["bos_token"]
        return text[len(bos):] if bos and text.startswith(bos) else text

    def _token_id(self, token: str, folder: str) -> int:
        found = self._tokenizer.token_to_id(token)
        if found is None:
            raise ValueError(f"{folder}: the token {token!r} is not in {TOKENIZER_FILE}.")
        return int(found)

    def to_hf(self, ids: Iterable[int]) -> list[int]:
        """Tokenizer ids of rest_jax ids."""
        return [int(self.hf_ids[i]) for i in ids]

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int | None:
        return None

    @property
    def _base_vocab_size(self) -> int:
        return len(self.hf_ids)

    def encode_as_is(self, s: str) -> list[int]:
        """Ids of `s` exactly as written (no prefix space): a prompt template's text."""
        return [int(self._rest_of[i]) for i in self._tokenizer.encode(s, add_special_tokens=False).ids]

    def _encode(self, s: str) -> Sequence[int]:
        if self.add_prefix_space and s and not s[0].isspace():
            s = " " + s
        return self.encode_as_is(s)

    def decode_as_is(self, ids: Iterable[int]) -> str:
        """The text of `ids` exactly (a prefix space kept)."""
        return self._tokenizer.decode(self.to_hf(int(i) for i in ids), skip_special_tokens=True)

    def _decode(self, ids: Sequence[int]) -> str:
        # seqio.Vocabulary.decode has cut at EOS and dropped padding already.
        text = self.decode_as_is(ids)
        return text[1:] if self.add_prefix_space and text.startswith(" ") else text

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        def encode(text: tf.Tensor) -> np.ndarray:
            return np.asarray(self._encode(text.numpy().decode("utf-8")), np.int32)

        ids = tf.py_function(encode, [s], tf.int32)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def decode(row: tf.Tensor) -> bytes:
            return self._decode([i for i in row.numpy().tolist() if i > 0]).encode("utf-8")

        return tf.py_function(decode, [ids], tf.string)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, HuggingFaceVocabulary) and other.path == self.path and \
            np.array_equal(other.hf_ids, self.hf_ids) and other.add_prefix_space == self.add_prefix_space

    def __hash__(self) -> int:
        return hash((self.path, tuple(self.hf_ids[:2]), self.add_prefix_space))
