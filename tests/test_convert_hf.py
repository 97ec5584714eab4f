"""Parity of rest_jax's T5 with Hugging Face PyTorch T5/mT5 through `rest_jax.convert`.

The reference is HF `T5ForConditionalGeneration` / `MT5ForConditionalGeneration` in float32 with random
weights; encoder outputs and logits must agree within 1e-4. Inputs have encoder padding (masking) and are
longer than `relative_attention_max_distance` (logarithmic buckets and the clamp to the last bucket).
"""

import json
import pathlib

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from rest_jax import convert  # noqa: E402
from rest_jax.model.t5 import T5Config, Transformer  # noqa: E402

ATOL = 1e-4
VOCAB = 101
SRC_LEN, TGT_LEN = 40, 40
MAX_DISTANCE, BUCKETS = 20, 8  # offsets up to 39 > max_distance: every bucket branch is used


def _hf_config(kind: str):
    common = dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_heads=4, dropout_rate=0.0,
                  relative_attention_num_buckets=BUCKETS, relative_attention_max_distance=MAX_DISTANCE)
    if kind == "t5_v1_1":
        return transformers.T5Config(num_layers=2, num_decoder_layers=2, feed_forward_proj="gated-gelu",
                                     tie_word_embeddings=False, **common)
    if kind == "t5_1_0_relu_tied":
        return transformers.T5Config(num_layers=2, num_decoder_layers=2, feed_forward_proj="relu",
                                     tie_word_embeddings=True, **common)
    if kind == "mt5_3enc_1dec":
        return transformers.MT5Config(num_layers=3, num_decoder_layers=1, feed_forward_proj="gated-gelu",
                                      tie_word_embeddings=False, **common)
    if kind in ("tied_unscaled", "untied_scaled"):
        # transformers >= 5 ties lm_head to `shared` unless the file has its own lm_head, and rescales
        # only when tie_word_embeddings is not false: the two mixed cases.
        return transformers.T5Config(num_layers=2, num_decoder_layers=2, feed_forward_proj="gated-gelu",
                                     tie_word_embeddings=(kind == "untied_scaled"), **common)
    raise ValueError(kind)


def _build_hf(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    config = _hf_config(kind)
    cls = (transformers.MT5ForConditionalGeneration if kind.startswith("mt5")
           else transformers.T5ForConditionalGeneration)
    model = cls(config).eval()
    if kind in ("t5_v1_1", "mt5_3enc_1dec", "untied_scaled"):
        # A separate output projection, as in published T5 v1.1 / mT5 files.
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 64) * 0.3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # HF initialises norms to 1 and relative biases small; randomise them so that a swapped norm
            # or a wrong bucket shows up in the outputs.
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
    return model


def _inputs(seed: int = 1):
    rng = np.random.RandomState(seed)
    enc = rng.randint(2, VOCAB, size=(3, SRC_LEN))
    for row, length in enumerate([SRC_LEN, 27, 9]):
        enc[row, length:] = 0
    dec = rng.randint(2, VOCAB, size=(3, TGT_LEN))
    dec[:, 0] = 0  # decoder start token
    return enc.astype(np.int32), dec.astype(np.int32)


def _hf_outputs(model, enc, dec):
    with torch.no_grad():
        ids, mask = torch.tensor(enc, dtype=torch.long), torch.tensor(enc > 0, dtype=torch.long)
        encoded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        logits = model(input_ids=ids, attention_mask=mask,
                       decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
    return encoded, logits


def _our_outputs(config, params, enc, dec):
    model = Transformer(config)
    with jax.default_matmul_precision("float32"):
        encoded = model.apply({"params": params}, jnp.asarray(enc), method=Transformer.encode)
        logits = model.apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec))
    return np.asarray(encoded), np.asarray(logits)


KINDS = ["t5_v1_1", "t5_1_0_relu_tied", "mt5_3enc_1dec", "tied_unscaled", "untied_scaled"]


@pytest.fixture(scope="module", params=KINDS)
def hf_checkpoint(request, tmp_path_factory):
    model = _build_hf(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder


def test_parity_with_hf(hf_checkpoint):
    kind, model, folder = hf_checkpoint
    config, params = convert.load_hf_checkpoint(folder)
    hf = model.config
    assert (config.emb_dim, config.head_dim, config.mlp_dim, config.num_heads) == (64, 16, 96, 4)
    assert (config.num_encoder_layers, config.num_decoder_layers) == (hf.num_layers, hf.num_decoder_layers)
    assert config.relative_attention_max_distance == MAX_DISTANCE
    assert config.relative_attention_num_buckets == BUCKETS
    assert config.mlp_activations == (("relu",) if kind == "t5_1_0_relu_tied" else ("gelu", "linear"))
    # Only T5 1.0's tied-and-rescaled head maps onto T5X's logits_via_embedding.
    assert config.logits_via_embedding == (kind == "t5_1_0_relu_tied")

    enc, dec = _inputs()
    hf_encoded, hf_logits = _hf_outputs(model, enc, dec)
    encoded, logits = _our_outputs(config, params, enc, dec)
    real = enc > 0  # padded encoder positions are never attended to; their values are unspecified
    np.testing.assert_allclose(encoded[real], hf_encoded[real], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits, hf_logits, atol=ATOL, rtol=0)
    # A shifted relative-position bucket or a missed mask moves logits by far more than the tolerance.
    assert np.abs(hf_logits).max() > 1.0


def test_structure_equals_model_init(hf_checkpoint):
    _, _, folder = hf_checkpoint
    config, params = convert.load_hf_checkpoint(folder)
    tokens = jnp.ones((1, 4), jnp.int32)
    init = jax.eval_shape(lambda: Transformer(config).init(jax.random.PRNGKey(0), tokens, tokens)["params"])
    expected = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), nn.unbox(init))
    got = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), params)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
    assert got == expected
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("kind", ["t5_v1_1", "t5_1_0_relu_tied", "mt5_3enc_1dec"])
def test_hf_roundtrip_identical_tensors(kind, tmp_path):
    model = _build_hf(kind, seed=3)
    model.save_pretrained(tmp_path / "hf")
    config, params = convert.load_hf_checkpoint(tmp_path / "hf")
    convert.save_hf_checkpoint(config, params, tmp_path / "back")
    original = safetensors_numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    exported = safetensors_numpy.load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    # And HF reads it back as the same model.
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    enc, dec = _inputs(seed=4)
    np.testing.assert_allclose(_hf_outputs(reloaded, enc, dec)[1], _hf_outputs(model, enc, dec)[1],
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("tied,acts", [(False, ("gelu", "linear")), (True, ("relu",)),
                                       (False, ("gelu_exact", "linear"))])
def test_export_loads_in_hf_with_same_logits(tied, acts, tmp_path):
    config = T5Config(vocab_size=VOCAB, emb_dim=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=2,
                      head_dim=8, mlp_dim=48, mlp_activations=acts, logits_via_embedding=tied,
                      relative_attention_num_buckets=BUCKETS, relative_attention_max_distance=MAX_DISTANCE)
    enc, dec = _inputs(seed=5)
    params = nn.unbox(Transformer(config).init(jax.random.PRNGKey(7), jnp.asarray(enc), jnp.asarray(dec))["params"])
    # Non-trivial norms and biases so that a mapping error is visible.
    rng = np.random.RandomState(0)
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(np.asarray(x) * (1.0 + 0.3 * rng.standard_normal(x.shape)), jnp.float32), params)
    convert.save_hf_checkpoint(config, params, tmp_path / "hf")
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    hf_encoded, hf_logits = _hf_outputs(hf, enc, dec)
    encoded, logits = _our_outputs(config, params, enc, dec)
    real = enc > 0
    np.testing.assert_allclose(encoded[real], hf_encoded[real], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits, hf_logits, atol=ATOL, rtol=0)
    # And back: identical parameters.
    config_back, params_back = convert.load_hf_checkpoint(tmp_path / "hf")
    assert config_back == config.replace(dropout_rate=config_back.dropout_rate)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_back, params)


@pytest.mark.parametrize("cls_name", ["T5EncoderModel", "MT5EncoderModel"])
def test_encoder_only_checkpoint(cls_name, tmp_path):
    hf_config = _hf_config("t5_v1_1")
    torch.manual_seed(2)
    encoder = getattr(transformers, cls_name)(hf_config).eval()
    encoder.save_pretrained(tmp_path)
    config, params = convert.load_hf_checkpoint(tmp_path)
    assert sorted(params) == ["encoder", "token_embedder"]
    enc, _ = _inputs(seed=6)
    with torch.no_grad():
        expected = encoder(input_ids=torch.tensor(enc, dtype=torch.long),
                           attention_mask=torch.tensor(enc > 0, dtype=torch.long)).last_hidden_state.numpy()
    got = np.asarray(Transformer(config).apply({"params": params}, jnp.asarray(enc), method=Transformer.encode))
    np.testing.assert_allclose(got[enc > 0], expected[enc > 0], atol=ATOL, rtol=0)


def test_pytorch_bin_and_bfloat16_safetensors(tmp_path):
    model = _build_hf("t5_v1_1", seed=8)
    model.save_pretrained(tmp_path / "st")
    _, reference = convert.load_hf_checkpoint(tmp_path / "st")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
    config_json = (tmp_path / "st" / "config.json").read_text()

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(config_json)
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    _, from_bin = convert.load_hf_checkpoint(tmp_path / "bin")
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_bin, reference)

    import safetensors.torch
    (tmp_path / "bf16").mkdir()
    (tmp_path / "bf16" / "config.json").write_text(config_json)
    safetensors.torch.save_file({k: v.bfloat16().contiguous() for k, v in state.items()},
                                str(tmp_path / "bf16" / "model.safetensors"), metadata={"format": "pt"})
    _, from_bf16 = convert.load_hf_checkpoint(tmp_path / "bf16")
    expected = {k: v.bfloat16().float().numpy() for k, v in state.items()}
    np.testing.assert_array_equal(np.asarray(from_bf16["encoder"]["layers_1"]["mlp"]["wo"]["kernel"]),
                                  expected["encoder.block.1.layer.1.DenseReluDense.wo.weight"].T)
    np.testing.assert_array_equal(np.asarray(from_bf16["token_embedder"]["embedding"]), expected["shared.weight"])


def test_clear_errors_name_the_parameter(tmp_path):
    model = _build_hf("t5_v1_1", seed=9)
    model.save_pretrained(tmp_path / "ok")
    state = safetensors_numpy.load_file(str(tmp_path / "ok" / "model.safetensors"))
    hf_config = json.loads((tmp_path / "ok" / "config.json").read_text())

    def write(name, cfg, st):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
        safetensors_numpy.save_file(st, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder

    wrong_ff = write("wrong_ff", dict(hf_config, d_ff=128), state)
    with pytest.raises(ValueError, match=r"encoder/layers_0/mlp/wi_0/kernel \(from "
                                         r"encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0\.weight\) "
                                         r"has shape \(64, 96\), the model expects \(64, 128\)"):
        convert.load_hf_checkpoint(wrong_ff)

    missing = dict(state)
    del missing["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
    with pytest.raises(ValueError, match=r"decoder\.block\.1\.layer\.2\.DenseReluDense\.wo\.weight"):
        convert.load_hf_checkpoint(write("missing", hf_config, missing))

    extra = dict(state, **{"classification_head.dense.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected HF parameter\(s\) \['classification_head"):
        convert.load_hf_checkpoint(write("extra", hf_config, extra))

    with pytest.raises(ValueError, match=r"config\.json.*unsupported feed_forward_proj 'gelu-gated'"):
        convert.load_hf_checkpoint(write("act", dict(hf_config, feed_forward_proj="gelu-gated"), state))

    with pytest.raises(FileNotFoundError, match="config.json"):
        convert.load_hf_checkpoint(tmp_path / "nowhere")


def test_gin_convert_entry_hf_to_rest_jax_to_hf(tmp_path):
    model = _build_hf("mt5_3enc_1dec", seed=10)
    model.save_pretrained(tmp_path / "hf")
    gin.clear_config()
    try:
        gin.parse_config([
            "convert.source_format = 'hf'",
            f"convert.source_path = '{tmp_path / 'hf'}'",
            "convert.target_format = 'rest_jax'",
            f"convert.output_path = '{tmp_path / 'rj'}'",
        ])
        convert.convert()
        gin.clear_config()
        gin.parse_config([
            "convert.source_format = 'rest_jax'",
            f"convert.source_path = '{tmp_path / 'rj'}'",
            "convert.target_format = 'hf'",
            f"convert.output_path = '{tmp_path / 'hf2'}'",
        ])
        convert.convert()
    finally:
        gin.clear_config()
    config, params = convert.load_rest_jax(tmp_path / "rj")
    enc, dec = _inputs(seed=11)
    np.testing.assert_allclose(_our_outputs(config, params, enc, dec)[1], _hf_outputs(model, enc, dec)[1],
                               atol=ATOL, rtol=0)
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf2").eval()
    np.testing.assert_allclose(_hf_outputs(back, enc, dec)[1], _hf_outputs(model, enc, dec)[1], atol=ATOL, rtol=0)
    assert not [p for p in pathlib.Path(tmp_path).iterdir() if ".tmp-" in p.name]  # no temp dirs left

    with pytest.raises(ValueError, match="convert.source_path is required"):
        convert.convert(source_format="hf", output_path=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="convert.target_format='onnx'"):
        convert.convert(source_path=str(tmp_path / "hf"), target_format="onnx", output_path=str(tmp_path / "x"))


# -- output_path: only a new or empty folder, or a previous export of the same kind, is written -----------


def _tiny_params(seed):
    config = T5Config(vocab_size=VOCAB, emb_dim=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                      head_dim=8, mlp_dim=24, mlp_activations=("gelu", "linear"), logits_via_embedding=False)
    tokens = jnp.ones((1, 4), jnp.int32)
    return config, nn.unbox(Transformer(config).init(jax.random.PRNGKey(seed), tokens, tokens)["params"])


def _tree(folder):
    """{relative path: bytes} of every file under `folder`: what must survive a refused convert."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_hf_export_into_new_or_empty_folder_and_over_its_previous_export(tmp_path, capsys):
    config, first = _tiny_params(0)
    _, second = _tiny_params(1)
    convert.save_hf_checkpoint(config, first, tmp_path / "new" / "hf")  # parents created
    (tmp_path / "empty").mkdir()
    convert.save_hf_checkpoint(config, first, tmp_path / "empty")
    for folder in (tmp_path / "new" / "hf", tmp_path / "empty"):
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        jax.tree_util.tree_map(np.testing.assert_array_equal, convert.load_hf_checkpoint(folder)[1], first)
    # A folder holding only an earlier export of this tool is replaced, and the summary says so.
    assert convert.check_output_path(tmp_path / "empty", "hf")
    convert.save_hf_checkpoint(config, second, tmp_path / "empty")
    jax.tree_util.tree_map(np.testing.assert_array_equal, convert.load_hf_checkpoint(tmp_path / "empty")[1], second)
    capsys.readouterr()
    convert.convert(source_format="hf", source_path=str(tmp_path / "new" / "hf"), target_format="hf",
                    output_path=str(tmp_path / "empty"))
    assert "replaced the previous export there" in capsys.readouterr().out
    jax.tree_util.tree_map(np.testing.assert_array_equal, convert.load_hf_checkpoint(tmp_path / "empty")[1], first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]  # no temporary or old copies left


def _run_dir(root):
    """A `rest_jax train` run directory: config, a checkpoint, TensorBoard events."""
    from rest_jax import checkpoints  # pylint: disable=import-outside-toplevel

    run = root / "run"
    manager = checkpoints.CheckpointManager(run / "checkpoints", period=1)
    manager.save(1, {"params": {"w": jnp.arange(4.0)}})
    manager.close()
    (run / "config.gin").write_text("train.num_steps = 1\n")
    (run / "train").mkdir()
    (run / "train" / "events.out.tfevents.1").write_bytes(b"\x00\x01")
    return run


@pytest.mark.parametrize("target_format", ["hf", "rest_jax"])
def test_convert_refuses_folders_that_are_not_its_own_export_and_keeps_them(tmp_path, target_format):
    """Before, output_path was deleted whatever it held (a user's files, a whole run directory), rc 0."""
    config, params = _tiny_params(0)
    convert.save_hf_checkpoint(config, params, tmp_path / "source")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("my notes")
    foreign_hf = tmp_path / "foreign_hf"  # the two file names of an export, written by someone else
    foreign_hf.mkdir()
    (foreign_hf / "config.json").write_text("{}")
    safetensors_numpy.save_file({"x": np.zeros(2, np.float32)}, str(foreign_hf / "model.safetensors"),
                                metadata={"format": "pt"})
    (tmp_path / "a_file").write_text("data")
    run = _run_dir(tmp_path)
    other_kind = tmp_path / "other_kind"  # an export of the other format
    if target_format == "hf":
        convert.save_rest_jax(config, params, other_kind, source="test")
    else:
        convert.save_hf_checkpoint(config, params, other_kind)
    cases = {user: "notes.txt", foreign_hf: "config.json, model.safetensors", run: "checkpoints, config.gin, train",
             run / "checkpoints": "1", tmp_path / "a_file": "is a file", other_kind: ""}
    before = _tree(tmp_path)
    for folder, listed in cases.items():
        with pytest.raises(ValueError) as info:
            convert.convert(source_format="hf", source_path=str(tmp_path / "source"), target_format=target_format,
                            output_path=str(folder))
        assert isinstance(info.value, convert.OutputPathError)
        msg = str(info.value)
        assert f"convert.output_path={folder} " in msg and listed in msg and "nothing was written" in msg
        if folder == foreign_hf and target_format == "hf":
            assert "was not written by rest_jax convert" in msg
        with pytest.raises(ValueError, match="nothing was written"):  # the library savers refuse too
            convert._SAVERS[target_format](config, params, folder)
    assert _tree(tmp_path) == before  # every file is still there, byte for byte, and nothing was added
    from rest_jax import checkpoints  # pylint: disable=import-outside-toplevel
    np.testing.assert_array_equal(checkpoints.load_params(run / "checkpoints")["w"], np.arange(4.0))


def test_cli_convert_refusal_is_one_line_with_status_2(tmp_path, capsys):
    from rest_jax import main as cli  # pylint: disable=import-outside-toplevel

    config, params = _tiny_params(0)
    convert.save_hf_checkpoint(config, params, tmp_path / "source")
    run = _run_dir(tmp_path)
    before = _tree(run)
    gin.clear_config()
    try:
        code = cli.main(["convert", "--gin.SOURCE_FORMAT='hf'", f"--gin.SOURCE='{tmp_path}/source'",
                         "--gin.TARGET_FORMAT='hf'", f"--gin.OUTPUT='{run}'"])
    finally:
        gin.clear_config()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("rest_jax convert: error:")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and f"convert.output_path={run} is not empty" in errors[0], err[-2000:]
    assert "Traceback" not in err
    assert _tree(run) == before
