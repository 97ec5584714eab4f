"""Hugging Face tokenizers under rest_jax's ids (issue 17): the renumbering by hand, and a converted HF Llama
asked through a prompt on that vocabulary giving HF transformers' own log-probs of the completion."""

import json
from collections.abc import Mapping

import gin
import jax
import numpy as np
import pytest
import tensorflow as tf

from rest_jax import convert_lm
from rest_jax import policy as policy_lib
from rest_jax.data import grow_store
from rest_jax.data import prompts
from rest_jax.data import vocab as vocab_lib
from rest_jax.data.special_tokens import EOS_ID
from rest_jax.model import translation_lm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# Llama 2's special-token layout: <unk> 0, <s> 1, </s> 2, no pad (so the pad defaults to <unk>).
WORDS = ["<unk>", "<s>", "</s>", "translate", "german", "english", ":", "das", "haus", "ist", "klein", "the",
         "house", "is", "small", "a", "cat", "eine", "katze", "."]


def _tokenizer_folder(tmp_path, config=None):
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"} if config is None else config
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, tok


def test_ids_are_renumbered_pad_zero_eos_one(tmp_path):
    folder, tok = _tokenizer_folder(tmp_path)
    vocab = vocab_lib.load_vocabulary(str(folder))
    assert isinstance(vocab, vocab_lib.HuggingFaceVocabulary) and vocab.vocab_size == len(WORDS)
    # By hand: the pad (<unk>, tokenizer id 0) stays at 0, </s> (2) moves to 1, <s> (1) takes its place 2.
    assert vocab.to_hf([0, 1, 2, 3]) == [0, 2, 1, 3] and vocab.prompt_start_id == 2
    text = "das haus ist klein ."
    ids = vocab.encode(text)
    assert vocab.to_hf(ids) == tok.encode(text, add_special_tokens=False).ids
    assert vocab.decode(list(ids) + [EOS_ID, 7, 8]) == tok.decode(tok.encode(text).ids)  # cut at EOS
    np.testing.assert_array_equal(vocab.encode_tf(tf.constant(text)).numpy(), ids)
    assert vocab_lib.vocab_fingerprint(str(folder)) == vocab_lib.vocab_fingerprint(vocab)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="names no pad token"):
        vocab_lib.load_vocabulary(str(folder))
    # A tokenizer without pad and unk (Llama 3) gets one named by gin: "cat" (tokenizer id 16) becomes id 0.
    gin.bind_parameter("HuggingFaceVocabulary.pad_token", "cat")
    try:
        named = vocab_lib.load_vocabulary(str(folder))
    finally:
        gin.clear_config()
    assert named.to_hf([0, 1]) == [16, 2]


SHAPE = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, head_dim=8)


def _hf_folder(tmp_path):
    """A random HF Llama (every tensor perturbed) saved with the tokenizer, as a user's download would be."""
    folder, tok = _tokenizer_folder(tmp_path)
    config = transformers.LlamaConfig(vocab_size=len(WORDS), max_position_embeddings=64, **SHAPE,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(folder, safe_serialization=True)
    return folder, tok, hf


def _hf_completion_log_probs(hf, tok, prompt_hf_ids, target):
    """HF's log-probs [T, vocab] of the target + </s> after <s> + the prompt, on its own ids."""
    row = [tok.token_to_id("<s>"), *prompt_hf_ids, *tok.encode(target).ids, tok.token_to_id("</s>")]
    with torch.no_grad():
        logits = hf(torch.tensor([row[:-1]])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()[-(len(tok.encode(target).ids) + 1):], row


def test_converted_llama_on_the_renumbered_vocabulary_gives_hf_log_probs(tmp_path):
    folder, tok, hf = _hf_folder(tmp_path)

    vocab = vocab_lib.load_vocabulary(str(folder))
    lm_config, params = convert_lm.load_hf_checkpoint(folder, vocab)
    fmt = prompts.PromptFormat(template="translate {source_language} : {source} {target_language} :",
                               source_language="german", target_language="english")
    before, after = fmt.pieces(vocab)
    model = policy_lib.translation_lm.TranslationLM(lm_config, prompt_before=before, prompt_after=after,
                                                    start_id=vocab.prompt_start_id)
    pairs = [("das haus ist klein .", "the house is small ."), ("eine katze", "a cat")]
    src = [vocab.encode(s) + [1] for s, _ in pairs]
    tgt = [vocab.encode(t) + [1] for _, t in pairs]
    width, length = max(map(len, src)), max(map(len, tgt))
    enc = np.array([s + [0] * (width - len(s)) for s in src], np.int32)
    targets = np.array([t + [0] * (length - len(t)) for t in tgt], np.int32)
    dec = np.concatenate([np.zeros((2, 1), np.int32), targets[:, :-1]], axis=1)
    got = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, enc, dec), axis=-1))
    for r, (source, target) in enumerate(pairs):
        # HF on its own ids, one unpadded row: <s> + the prompt + the target + </s>.
        want, _ = _hf_completion_log_probs(hf, tok, vocab.to_hf(before) + tok.encode(source).ids
                                           + vocab.to_hf(after), target)
        assert np.abs(want).max() > 0.1
        # Column r of ours is the tokenizer's token hf_ids[r].
        np.testing.assert_allclose(got[r, :len(tgt[r])], want[:, vocab.hf_ids], atol=1e-4)


def test_convert_subcommand_then_load_policy_scores_as_hf(tmp_path):
    # What a user types: `rest_jax convert` on the HF folder, then the policy loaded from gin (the shape, the
    # family, the prompt) with the folder as its vocabulary scores a translation as HF transformers does.
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel

    import gin  # pylint: disable=import-outside-toplevel

    from rest_jax import gin_utils  # pylint: disable=import-outside-toplevel

    folder, tok, hf = _hf_folder(tmp_path)
    out = tmp_path / "converted"
    proc = subprocess.run([sys.executable, "-m", "rest_jax.main", "convert", f"--gin.SOURCE='{folder}'",
                           f"--gin.OUTPUT='{out}'"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bindings = ["DecoderOnlyConfig.vocab_size = %d" % len(WORDS), "DecoderOnlyConfig.emb_dim = 32",
                "DecoderOnlyConfig.num_heads = 4", "DecoderOnlyConfig.num_kv_heads = 2",
                "DecoderOnlyConfig.head_dim = 8", "DecoderOnlyConfig.num_layers = 2", "DecoderOnlyConfig.mlp_dim = 48",
                "DecoderOnlyConfig.layer_norm_epsilon = 1e-6",
                "PromptFormat.template = 'translate {source_language} : {source} {target_language} :'",
                "PromptFormat.source_language = 'german'", "PromptFormat.target_language = 'english'"]
    try:
        gin_utils.parse(["models/decoder_only/architecture.gin"], [gin_utils.Binding(b, "test") for b in bindings])
        policy = policy_lib.load_policy(str(out), str(folder))
        before, after = prompts.PromptFormat().pieces(policy.vocab)
    finally:
        gin.clear_config()
    source, target = "das haus ist klein .", "the house is small ."
    got = policy.score([policy.vocab.encode(source) + [1]], [policy.vocab.encode(target) + [1]])[0]
    want, row = _hf_completion_log_probs(hf, tok, policy.vocab.to_hf(before) + tok.encode(source).ids
                                         + policy.vocab.to_hf(after), target)
    np.testing.assert_allclose(got, want[np.arange(len(got)), row[-len(got):]], atol=1e-4)


def test_export_back_to_hf_restores_the_tokenizer_ids(tmp_path):
    # HF -> rest_jax (ids renumbered) -> HF with the tokenizer folder: transformers loads the export and its
    # tokenizer, and the model is the original one (same logits on the tokenizer's own ids).
    from rest_jax import convert  # pylint: disable=import-outside-toplevel

    folder, tok, hf = _hf_folder(tmp_path)
    converted = convert.convert("hf", str(folder), "rest_jax", str(tmp_path / "rj"))
    with pytest.raises(ValueError, match="vocab_path restores"):
        convert.convert("rest_jax", str(converted), "rest_jax", str(tmp_path / "rj2"), vocab_path=str(folder))
    for _ in range(2):  # the second export replaces the first (tokenizer files included)
        out = convert.convert("rest_jax", str(converted), "hf", str(tmp_path / "back"), vocab_path=str(folder))
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["pad_token_id"], hf_config["bos_token_id"], hf_config["eos_token_id"]) == (0, 1, 2)
    text = "translate german : das haus ist klein english : the house is small ."
    ids = transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    assert ids[-len(tok.encode(text).ids):] == tok.encode(text).ids
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits.numpy()
        got = back(torch.tensor([ids])).logits.numpy()
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-5)


# A chat template in the style of Llama 3's (BOS, role headers, trimmed content, end-of-turn tokens), rendered by
# transformers' own apply_chat_template as the reference.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] | trim + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
CHAT_WORDS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "be", "brief"]


def test_chat_prompts_are_what_transformers_apply_chat_template_makes(tmp_path):
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS + CHAT_WORDS)}, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])
    folder = tmp_path / "chat"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|end|>",
        "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}))
    vocab = vocab_lib.load_vocabulary(str(folder))
    fmt = prompts.PromptFormat(template="translate {source_language} : {source}", source_language="german",
                               chat=True, system="be brief")
    before, after = fmt.pieces(vocab)
    source = "das haus ist klein ."
    ours = vocab.to_hf([vocab.prompt_start_id, *before, *vocab.encode(source), *after])
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    want = hf_tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": f"translate german : {source}"}],
                                      add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if isinstance(want, Mapping) else want)
    assert ours == want, (hf_tok.convert_ids_to_tokens(ours), hf_tok.convert_ids_to_tokens(want))
    assert vocab.decode([EOS_ID]) == ""  # the completion ends at the end-of-turn token, the EOS
    with pytest.raises(ValueError, match="chat = True too"):
        prompts.PromptFormat(system="be brief")
    plain = vocab_lib.load_vocabulary(str(_tokenizer_folder(tmp_path)[0]))
    with pytest.raises(ValueError, match="has no chat template"):
        fmt.pieces(plain)


def _byte_level_bpe_folder(tmp_path):
    """A GPT-2 / Llama 3-style tokenizer: byte-level BPE whose words carry their leading space."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    text = "Translate German to English.\nGerman: Das Haus ist klein.\nEnglish: The house is small."
    tok.train_from_iterator([text] * 20, trainer)
    folder = tmp_path / "bpe"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "</s>",
                                                              "bos_token": "<s>"}))
    return folder, tok


def test_prompt_boundaries_that_tokenize_apart_are_reported(tmp_path, caplog):
    # Byte-level BPE: "German: " + "Das" encoded apart gives ':', ' ', 'Das'; the whole text ':', ' Das'.
    folder, tok = _byte_level_bpe_folder(tmp_path)
    fmt = prompts.PromptFormat()
    whole = tok.encode("Translate German to English.\nGerman: Das Haus ist klein.\nEnglish: The house is small.").tokens
    assert "ĠDas" in whole  # the tokenizer itself: the space belongs to the word
    vocab = vocab_lib.load_vocabulary(str(folder))
    message = fmt.boundary_mismatch(vocab)
    assert message is not None and "' Das'" in message and "' '" in message, message
    policy_lib._REPORTED_MISMATCHES.clear()  # pylint: disable=protected-access  (reported once per process)
    with caplog.at_level("WARNING"):
        policy_lib.build_network(vocab, architecture="decoder_only", prompt_format=fmt)
        policy_lib.build_network(vocab, architecture="decoder_only", prompt_format=fmt)
    assert caplog.text.count("PromptFormat:") == 1
    assert "PromptFormat: the prompt's pieces, tokenized apart, join differently" in caplog.text
    # A tokenizer that splits at whitespace joins pieces as the whole text does: nothing to report.
    word_folder, _ = _tokenizer_folder(tmp_path)
    word_fmt = prompts.PromptFormat(template="translate {source_language} : {source} {target_language} :",
                                    source_language="german", target_language="english")
    assert word_fmt.boundary_mismatch(vocab_lib.load_vocabulary(str(word_folder)), "das haus ist klein .",
                                      "the house is small .") is None


def test_add_prefix_space_makes_prompts_the_tokenizers_own_tokens_of_the_whole_text(tmp_path, caplog):
    # With add_prefix_space every source and completion is encoded word-initially (' Das'), the template's space
    # before them left out of its pieces: prompt + completion is then what the tokenizer makes of the whole text.
    folder, tok = _byte_level_bpe_folder(tmp_path)
    fmt = prompts.PromptFormat()
    plain = vocab_lib.load_vocabulary(str(folder))
    gin.bind_parameter("HuggingFaceVocabulary.add_prefix_space", True)
    try:
        vocab = vocab_lib.load_vocabulary(str(folder))
    finally:
        gin.clear_config()
    assert vocab.add_prefix_space and not plain.add_prefix_space
    assert fmt.boundary_mismatch(vocab) is None
    before, after = fmt.pieces(vocab)
    pairs = [("Das Haus ist klein.", "The house is small."), ("Katzen schlafen oft.", "Cats often sleep."),
             ("Ein Hund", "A dog")]
    for source, target in pairs:
        src = np.asarray([vocab.encode(source) + [EOS_ID]])
        prompt, mask = translation_lm.prompt_tokens(src, before, after, EOS_ID, vocab.prompt_start_id)
        ids = [int(i) for i in np.asarray(prompt)[np.asarray(mask)]][1:] + list(vocab.encode(target))  # no BOS
        whole = f"Translate German to English.\nGerman: {source}\nEnglish: {target}"
        assert vocab.to_hf(ids) == tok.encode(whole).ids, (source, [tok.id_to_token(i) for i in vocab.to_hf(ids)])
        assert vocab.decode(vocab.encode(source)) == source and vocab.decode(vocab.encode(target)) == target
        # The same assembly on the vocabulary without the option is not the tokenizer's whole-text encoding.
        b0, a0 = fmt.pieces(plain)
        p0, m0 = translation_lm.prompt_tokens(np.asarray([plain.encode(source) + [1]]), b0, a0, 1,
                                              plain.prompt_start_id)
        assert plain.to_hf([int(i) for i in np.asarray(p0)[np.asarray(m0)]][1:] + list(plain.encode(target))) != \
            tok.encode(whole).ids
    # Every id sequence changes, so the option is part of the vocabulary's identity (Grow stores, checkpoints).
    assert vocab != plain and vocab_lib.vocab_fingerprint(vocab) != vocab_lib.vocab_fingerprint(plain)
    assert vocab_lib.vocab_fingerprint(plain) == vocab_lib.vocab_fingerprint(str(folder))
    writer = grow_store.GrowStoreWriter(tmp_path / "store", 1, [0], 1, sources_per_shard=1)
    writer.write_shard(0, [{"source_id": 0, "sample_id": j, "source_text": "Ein Hund", "candidate_text": "A dog",
                            "reference_text": "A dog", "source_tokens": plain.encode("Ein Hund"),
                            "candidate_tokens": plain.encode("A dog"), "reward": 1.0}
                           for j in (grow_store.REFERENCE_SAMPLE_ID, 0)])
    writer.write_metadata(vocab=plain)
    grow_store.GrowStore(str(tmp_path / "store")).check_compatible(vocab=plain)
    with pytest.raises(grow_store.GrowStoreMismatchError, match="vocabulary differs"):
        grow_store.GrowStore(str(tmp_path / "store")).check_compatible(vocab=vocab)
    policy_lib._REPORTED_MISMATCHES.clear()  # pylint: disable=protected-access
    with caplog.at_level("WARNING"):
        policy_lib.build_network(vocab, architecture="decoder_only", prompt_format=fmt)
    assert "PromptFormat:" not in caplog.text


def test_llama3_configs_name_a_pad_token_and_encode_words_with_their_space(tmp_path):
    # A Llama 3-style tokenizer: byte-level BPE, no pad or unk, reserved special tokens.
    folder, tok = _byte_level_bpe_folder(tmp_path)
    tok.add_special_tokens(["<|reserved_special_token_0|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    with pytest.raises(ValueError, match="names no pad token"):
        vocab_lib.load_vocabulary(str(folder))
    from rest_jax import gin_utils  # pylint: disable=import-outside-toplevel

    for shape in ("llama3_8b", "llama3_1_8b", "llama3_2_1b", "llama3_2_3b"):
        try:
            gin_utils.parse([f"models/decoder_only/{shape}.gin"], [])
            vocab = vocab_lib.load_vocabulary(str(folder))
        finally:
            gin.clear_config()
        assert vocab.to_hf([0]) == [tok.token_to_id("<|reserved_special_token_0|>")], shape
        assert vocab.add_prefix_space and prompts.PromptFormat().boundary_mismatch(vocab) is None, shape
