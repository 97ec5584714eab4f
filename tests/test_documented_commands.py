"""Every command the documentation tells a user to type runs as written (issue 11: docs as tests).

Commands are collected from the shell blocks of README.md and docs/*.md, the usage lines in the comments of
configs/**/*.gin, and the examples that `scripts/tpu/*.sh --help` prints. Each must match one rule in
`RULES`, which says how it is checked:

  run       through bash, exactly as written, in a temporary working directory (the README's `runs/...`
            paths land there), with only size-reducing overrides appended; then the output it promises is
            checked, against a reference where there is one (sacreBLEU for scores, the original parameters
            for a conversion round trip);
  dry_run   the gin config is parsed and validated (`--dry_run`): runs on a TPU pod, GCS or data we lack;
  tpu       `scripts/tpu` with DRY_RUN=1 and a recording fake `gcloud` (prints the gcloud commands, runs
            none); the rest_jax command given to launch.sh is dry-run here too;
  help      the program's `--help` (it would download data);
  ci        `.ci/run` calls exactly this command;
  not_run   with the reason.

A command without a rule fails `test_every_documented_command_has_one_rule`, so new documentation is tested
from the day it is written; `pytest tests/test_documented_commands.py -rP` prints the whole list. Commands that
build on others (everything after the README's first command uses `runs/demo`) run their prerequisites first,
once per session.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest

from rest_jax import inspection as run_inspect
from rest_jax import tree as tree_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
MULTI30K_DIR = REPO.parent / "shared" / "data" / "multi30k"
TIMEOUT_S = 1200
_PROGRAMS = ("rest_jax ", "python ", "python3 ", "pip ", "scripts/", "tfds ", "huggingface-cli ", "tensorboard ",
             "jupyter ", "export ", "REST_JAX_RUN_DIR=", "gcloud ", "BC=")


# --------------------------------------------------------------------------------------------------------
# Finding the commands.
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DocCommand:
    """A command as the documentation writes it (`text` is what bash gets) and where it is written."""

    where: str
    text: str

    @property
    def line(self) -> str:
        """The command on one line, continuation backslashes removed (what rules match)."""
        return re.sub(r"\s*\\\n\s*", " ", self.text).strip()


def _split_shell(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Splits shell lines into commands as bash would: a trailing backslash or an open quote continues."""
    commands, buf, start = [], [], None
    for number, line in lines:
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        start = number if start is None else start
        buf.append(line.strip() if not buf else line)
        text = "\n".join(buf).rstrip()
        if text.endswith("\\"):
            continue
        try:
            shlex.split(text, comments=True)
        except ValueError:  # an open quote: the command goes on, as in bash
            continue
        commands.append((start, text))
        buf, start = [], None
    assert not buf, f"unterminated shell command at line {start}"
    return commands


def markdown_commands(path: pathlib.Path) -> list[DocCommand]:
    """Commands in the ```bash / ```sh / ```shell blocks of a Markdown file."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            j += 1
        if fence.group(1) in ("bash", "sh", "shell", "console"):
            body = [(n + 1, lines[n]) for n in range(i + 1, j)]
            found += [DocCommand(f"{path.relative_to(REPO)}:{n}", text) for n, text in _split_shell(body)]
        i = j + 1
    return found


def gin_comment_commands(path: pathlib.Path) -> list[DocCommand]:
    """Commands in the comments of a gin file: `#   rest_jax ...` lines and their continuations."""
    found, buf, start = [], [], None
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        body = raw.lstrip()[1:].strip() if raw.lstrip().startswith("#") else None
        if buf:
            buf.append(body or "")
            if not (body or "").endswith("\\"):
                found.append(DocCommand(f"{path.relative_to(REPO)}:{start}", "\n".join(buf)))
                buf = []
            continue
        if body and body.startswith(_PROGRAMS):
            if body.endswith("\\"):
                buf, start = [body], number
            else:
                found.append(DocCommand(f"{path.relative_to(REPO)}:{number}", body))
    return found


def script_help_commands(path: pathlib.Path) -> list[DocCommand]:
    """The `Example:` commands that a scripts/tpu script's --help prints."""
    proc = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=60, check=True)
    lines = proc.stdout.splitlines()
    found = []
    for k, line in enumerate(lines):
        if line.startswith("Example: "):
            buf = [line[len("Example: "):]]
            while buf[-1].endswith("\\"):
                k += 1
                buf.append(lines[k].strip())
            found.append(DocCommand(f"{path.relative_to(REPO)} --help", "\n".join(buf)))
    return found


def documented_commands() -> list[DocCommand]:
    """Every documented command, each text once (the first place it is written), in reading order."""
    found = markdown_commands(REPO / "README.md")
    for md in sorted((REPO / "docs").glob("*.md")):
        found += markdown_commands(md)
    for gin_file in sorted((REPO / "configs").rglob("*.gin")):
        found += gin_comment_commands(gin_file)
    for script in sorted((REPO / "scripts" / "tpu").glob("*.sh")):
        if script.name != "common.sh":
            found += script_help_commands(script)
    unique = {}
    for command in found:
        unique.setdefault(command.line, command)
    return list(unique.values())


# --------------------------------------------------------------------------------------------------------
# Rules.
# --------------------------------------------------------------------------------------------------------

SMALL_REST = list(run_inspect.TINY_RUN_OVERRIDES)
SMALL = {  # Size-reducing overrides by subcommand: tiny steps, few sources.
    "rest": SMALL_REST,
    "train": ["--gin.TRAIN_STEPS=4", "--gin.EVAL_PERIOD=2", "--gin.CHECKPOINT_PERIOD=2", "--gin.BATCH_SIZE=8"],
    "eval": ["--gin.evaluate.limit=16"],
    "grow": ["--gin.grow.max_sources=16", "--gin.grow_dataset.num_samples=2", "--gin.grow_dataset.batch_size=16"],
    "improve": ["--gin.improve_step.num_steps=4", "--gin.improve_step.eval_period=2",
                "--gin.improve_step.batch_size=16", "--gin.improve.num_validation_sources=16"],
}
README_MAIN = r"python -m rest_jax\.main rest --gin_file=experiments/demo\.gin --gin\.MODEL_DIR=\"'runs/demo'\"$"
DEMO_CORPUS = r"^python -m rest_jax\.data\.demo_corpus --output=demo_data$"


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one documented command is checked (see the module docstring)."""

    kind: str
    reason: str = ""
    extra: tuple[str, ...] = ()  # appended overrides (size-reducing, or paths pointed at what exists here)
    after: tuple[str, ...] = ()  # patterns of commands that must have run first
    check: Callable[[pathlib.Path, subprocess.CompletedProcess], None] | None = None
    slow: bool = False
    cwd_repo: bool = False  # run in the repository (the command names repository files by relative path)
    substitute: tuple[tuple[str, str], ...] = ()  # (written, replacement; {work}: work dir, {repo}: repository)


def _lines(path: pathlib.Path) -> list[str]:
    return path.read_text().splitlines()


def _demo_split(work: pathlib.Path, split: str, side: str) -> list[str]:
    """A split of the generated demo corpus (`Runner` points REST_JAX_DEMO_DIR beside the work dir)."""
    return _lines(work.parent / "demo_corpus" / f"{split}.{side}")


def check_demo_run(work, proc):
    report = json.loads((work / "runs/demo/report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["BC G=0 I=0", "ReST G=1 I=0", "ReST G=1 I=1"]
    assert (work / "runs/demo/report.md").exists() and (work / "runs/demo/config.gin").exists()
    assert (work / "runs/demo/plots/grow_rewards.png").exists()


def check_bfloat16_run(work, proc):
    """The one knob reaches every stage: each builds its model from gin and names the dtype it ran in."""
    assert "ACTIVATION_DTYPE = 'bfloat16'" in (work / "runs/demo_bf16/config.gin").read_text()
    assert json.loads((work / "runs/demo_bf16/report.json").read_text())["rows"]
    for stage in ("train done in", "Grow 1 done in", "Improve 1 done in", "eval runs/demo_bf16/bc/test.greedy"):
        lines = [line for line in proc.stderr.splitlines() if stage in line]
        assert lines and all("of the bfloat16 peak" in line for line in lines), (stage, proc.stderr[-3000:])
    assert "float32 peak" not in proc.stderr


def check_decoder_only_run(work, proc):
    """The ReST loop on a decoder-only policy: every stage ran, and the Grow store's behaviour log-probs (the
    sampler's, KV cache) equal teacher forcing of the stored samples under the BC checkpoint (the full forward)."""
    import gin  # pylint: disable=import-outside-toplevel

    from rest_jax.data import grow_store  # pylint: disable=import-outside-toplevel
    from rest_jax.model import translation_lm  # pylint: disable=import-outside-toplevel

    run = work / "runs/demo_lm"
    report = json.loads((run / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["BC G=0 I=0", "ReST G=1 I=0", "ReST G=1 I=1"]
    # The demo's SentencePiece vocabulary joins the prompt's pieces as the whole text tokenizes
    # (`PromptFormat.boundary_mismatch`): no warning.
    assert "PromptFormat:" not in proc.stdout + proc.stderr
    rows = grow_store.GrowStore(str(run / "grow_1" / "store")).as_numpy(
        ["source_tokens", "candidate_tokens", "behaviour_logprob_sum", "is_reference"])
    try:
        policy = run_inspect.load_stage_policy(run, "bc")
        assert isinstance(policy.model, translation_lm.TranslationLM)
        scores = policy.score(list(rows["source_tokens"]), list(rows["candidate_tokens"]))
        # Another prompt than the one the checkpoint was trained with is refused, not silently used.
        run_inspect.load_run_config(run, bindings=["PromptFormat.target_language = 'yy'"])
        with pytest.raises(ValueError, match="trained with the prompt tokens"):
            run_inspect.load_stage_policy(run, "final", configure=False)
    finally:
        gin.clear_config()
    np.testing.assert_allclose([s.sum() for s in scores], rows["behaviour_logprob_sum"], rtol=1e-4, atol=1e-3)
    assert (~rows["is_reference"]).sum() == 48 * 2


def check_finetune(work, proc):
    # TRAIN_STEPS=4 steps on top of the BC checkpoint, saved as step 4 (the step count starts at 0).
    assert (work / "runs/demo_ft/checkpoints/4").is_dir()


def check_eval(work, proc):
    import sacrebleu  # pylint: disable=import-outside-toplevel

    result = json.loads((work / "runs/demo/eval/validation.greedy.json").read_text())
    hyps = _lines(work / "runs/demo/eval/validation.greedy.txt")
    refs = _demo_split(work, "validation", "tgt")[:len(hyps)]
    assert len(hyps) == 16 == result["num_sentences"]
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)


def check_grow(work, proc):
    from rest_jax.data import grow_store  # pylint: disable=import-outside-toplevel

    store = work / "runs/steps/grow_1/store"
    meta = json.loads((store / "metadata.json").read_text())
    # The store records the policy that grew it (it used to fail here: the macro, not the path, was read).
    assert meta["vocab"]["path"] == "runs/demo/vocab/sentencepiece.model"
    assert meta["checkpoint"] == "runs/demo/bc/checkpoints"
    data = grow_store.GrowStore(str(store)).as_numpy(["source_id", "is_reference"])
    assert len(data["source_id"]) == 16 * (2 + 1)  # N = 2 samples and the reference per source


def check_improve(work, proc):
    result = json.loads((work / "runs/steps/improve_1/improve.json").read_text())
    assert result["start"] == "runs/demo/bc/checkpoints"
    assert result["grow_store"] == ["runs/steps/grow_1/store"]
    assert (work / "runs/steps/improve_1/checkpoints").is_dir()


def check_demo_corpus(work, proc):
    assert proc.stderr == "", proc.stderr  # no TensorFlow start-up lines
    assert len(_lines(work / "demo_data/test.src")) == len(_lines(work / "demo_data/test.tgt")) == 500


def check_infer(work, proc):
    assert len(_lines(work / "runs/demo/test.bc.txt")) == 500


def check_score(work, proc):
    import sacrebleu  # pylint: disable=import-outside-toplevel

    hyps = (work / "runs/demo/test.bc.txt").read_text().split("\n")[:-1]
    refs = _lines(work / "demo_data/test.tgt")
    expected = [sacrebleu.sentence_chrf(h, [r]).score / 100 for h, r in zip(hyps, refs)]
    scores = [float(x) for x in _lines(work / "runs/demo/test.bc.chrf.txt")]
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert f"mean chrf reward: {np.mean(expected):.4f} over 500 sentences" in proc.stdout


def check_hf_export(work, proc):
    config = json.loads((work / "runs/demo/bc_hf/config.json").read_text())
    assert config["d_model"] == 64 and config["vocab_size"] == 512
    assert (work / "runs/demo/bc_hf/model.safetensors").exists()


DEMO_HF_EXPORT = r"^rest_jax convert .*runs/demo/bc/checkpoints.*--gin\.TARGET_FORMAT=\"'hf'\""


def check_decoder_only_hf_export(work, proc):
    # transformers loads the exported folder alone as a Llama and computes the BC policy's logits.
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    from rest_jax import convert  # pylint: disable=import-outside-toplevel
    from rest_jax.model import decoder_only  # pylint: disable=import-outside-toplevel

    config, params = convert.load_rest_jax(work / "runs/demo_lm/bc/checkpoints")
    assert isinstance(config, decoder_only.DecoderOnlyConfig)  # from the training checkpoint's metadata
    hf = transformers.AutoModelForCausalLM.from_pretrained(work / "runs/demo_lm/bc_hf",
                                                           attn_implementation="eager").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = np.random.default_rng(0).integers(2, config.vocab_size, size=(2, 24))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(decoder_only.DecoderOnly(config).apply({"params": params}, tokens))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def check_hf_round_trip(work, proc):
    from rest_jax import convert  # pylint: disable=import-outside-toplevel

    config_a, original = convert.load_rest_jax(work / "runs/demo/bc/checkpoints")
    config_b, round_trip = convert.load_rest_jax(work / "runs/demo/bc_from_hf")
    assert config_a == config_b
    flat_a, flat_b = tree_lib.flatten(original), tree_lib.flatten(round_trip)
    assert flat_a.keys() == flat_b.keys()
    for name in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[name]), np.asarray(flat_b[name]), err_msg=name)


def check_t5x_export(work, proc):
    from rest_jax import convert  # pylint: disable=import-outside-toplevel

    config_a, original = convert.load_rest_jax(work / "runs/demo/bc/checkpoints")
    config_b, exported = convert.load_t5x_checkpoint(work / "runs/demo/bc_t5x")
    assert config_a == config_b and (work / "runs/demo/bc_t5x/checkpoint_0/checkpoint").is_file()
    flat_a, flat_b = tree_lib.flatten(original), tree_lib.flatten(exported)
    assert flat_a.keys() == flat_b.keys()
    for name in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[name]), np.asarray(flat_b[name]), err_msg=name)


def check_vocab(work, proc):
    import sentencepiece  # pylint: disable=import-outside-toplevel

    model = sentencepiece.SentencePieceProcessor(model_file=str(work / "runs/vocab_demo/sentencepiece.model"))
    assert model.get_piece_size() == 512 and model.eos_id() == 1


def check_reward_model(work, proc):
    from rest_jax import rewards  # pylint: disable=import-outside-toplevel

    reward = rewards.get("learned", model_dir=str(work / "runs/demo/qe"))
    scores = rewards.score_pairs(reward, ["a b c", "d e"], ["a b c", "x"], None)
    assert np.all((scores >= 0) & (scores <= 1)) and len(scores) == 2


def check_rest_tiny(work, proc):
    assert json.loads((work / "runs/rest_tiny/report.json").read_text())["rows"]


def _printed_table(report: dict) -> list[tuple]:
    """A report's table and best-of-N rows as printed (rewards and BLEU to one decimal)."""
    return ([(r["name"], f"{100 * r['reward']:.1f}", f"{r['bleu']:.1f}", f"{r['chrf']:.1f}", r["kept_fraction"])
             for r in report["rows"]]
            + [(b["policy"], b["n"], f"{100 * b['reward']:.1f}", f"{b['bleu']:.1f}") for b in report["best_of_n"]])


def check_launch(work, proc):
    """2 processes x 4 devices give the report of the main command's run (1 process, 1 device).

    The fast suite's multi-process test (test_multiprocess.py compares more: curves, checkpoints, every
    sample; slow there) is this one."""
    from rest_jax.data import grow_store  # pylint: disable=import-outside-toplevel

    got = json.loads((work / "runs/demo_2x4/report.json").read_text())
    want = json.loads((work / "runs/demo/report.json").read_text())
    assert _printed_table(got) == _printed_table(want)
    assert [s.get("num_kept") for s in got["stages"]] == [s.get("num_kept") for s in want["stages"]]
    assert proc.stdout.count("[0] # ReST on demo_synthetic") == 1 and "[1] # ReST" not in proc.stdout
    assert "[launch] all 2 processes finished." in proc.stdout
    # Each process grew its share of the sources: together every (source, sample) exactly once, mostly the
    # same text as the one-process run (sampling keys follow the source, not the process).
    stores = [grow_store.GrowStore(str(work / run / "grow_1/store")).as_numpy(["source_id", "sample_id",
                                                                               "candidate_text"])
              for run in ("runs/demo", "runs/demo_2x4")]
    one, two = ({(int(s), int(i)): t for s, i, t in zip(d["source_id"], d["sample_id"], d["candidate_text"])}
                for d in stores)
    assert len(two) == len(stores[1]["source_id"]) and two.keys() == one.keys()
    assert np.mean([two[k] == one[k] for k in one]) >= 0.95


def check_rest_em(work, proc):
    names = [r["name"] for r in json.loads((work / "runs/demo_em/report.json").read_text())["rows"]]
    assert names[0] == "BC G=0 I=0" and len(names) >= 2


def check_dpo(work, proc):
    report = json.loads((work / "runs/demo_dpo/report.json").read_text())
    assert [r["name"] for r in report["rows"]][:2] == ["BC G=0 I=0", "ReST G=1 I=1"]
    improve = json.loads((work / "runs/demo_dpo/grow_1/improve_1/stage.json").read_text())
    assert improve["loss"] == "dpo" and improve["filter"]["method"] == "none"


def check_online(algorithm, run=None, bc_run="demo", warmup=0):
    run = run or f"demo_{algorithm}"

    def check(work, proc):
        report = json.loads((work / f"runs/{run}/report.json").read_text())
        assert report["algorithm"] == algorithm
        assert [r["name"] for r in report["rows"]] == ["BC G=0 I=0", f"{algorithm.upper()} (2 it.)"]
        # Two iterations (+ value warm-up ones) of 8 sources x 4 samples, each sample scored once; the policy
        # starts from the BC run's.
        assert report["cost"]["reward_calls"] == (2 + warmup) * 8 * 4
        stage = json.loads((work / f"runs/{run}/online/stage.json").read_text())
        assert [c[0] for c in stage["curve"]] == [0, 1, 2]
        assert (stage["value_warmup"] or {}).get("iterations", 0) == warmup
        bc = json.loads((work / f"runs/{bc_run}/bc/stage.json").read_text())
        assert report["stages"][0]["checkpoint"] == bc["checkpoint"]
    return check


SMALL_WARMUP = ("--gin.online.value_warmup_iterations=1",)  # PPO: one round of value warm-up
SMALL_ONLINE = ("--gin.online.num_iterations=2", "--gin.online.sources_per_iteration=8",
                "--gin.online.minibatch_size=16", "--gin.online.eval_period=1",
                "--gin.online.num_validation_sources=16", "--gin.online.num_test_sources=16")


def check_multi30k(work, proc):
    report = json.loads((work / "runs/m30k/report.json").read_text())
    assert report["rows"][0]["name"] == "BC G=0 I=0"


def check_multi30k_lm(work, proc):
    report = json.loads((work / "runs/m30k_lm/report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["BC G=0 I=0", "ReST G=1 I=0", "ReST G=1 I=1"]
    assert "build_network.architecture = 'decoder_only'" in (work / "runs/m30k_lm/config.gin").read_text()


def check_notebook(work, proc):
    import nbformat  # pylint: disable=import-outside-toplevel

    notebook = nbformat.read("/tmp/inspected.ipynb", as_version=4)
    assert f"{work}/runs/demo" in "".join(str(c.get("outputs")) for c in notebook.cells)


def check_study(work, proc):
    for seed in (0, 1, 2):
        for row in ("rest", "control"):
            rows = json.loads((work / f"runs/m30k_study/s{seed}/{row}/report.json").read_text())["rows"]
            assert rows[0]["name"] == "BC G=0 I=0" and "vs_bc" in rows[1], (seed, row)


def check_half_study(work, proc):
    """BC saw train[:14500] only; half_same grew on sources from that half, half_new on the other half."""
    from rest_jax.data import grow_store  # pylint: disable=import-outside-toplevel

    de = (MULTI30K_DIR / "train.de").read_text(encoding="utf-8").split("\n")[:29000]
    steps = sorted((work / "runs/m30k_study/s0/bc_half/bc/checkpoints").iterdir(), key=lambda p: int(p.name))
    meta = json.loads((steps[-1] / "metadata" / "metadata").read_text())
    assert meta["train_split"] == "train[:14500]"
    for row, part in (("half_same", de[:14500]), ("half_new", de[14500:])):
        run = work / f"runs/m30k_study/s0/{row}"
        assert json.loads((run / "report.json").read_text())["rows"][0]["name"] == "BC G=0 I=0"
        data = grow_store.GrowStore(str(run / "grow_1" / "store")).as_numpy(["source_id", "source_text"])
        ids = sorted(set(int(i) for i in data["source_id"]))
        texts = {int(i): t.decode() if isinstance(t, bytes) else str(t)
                 for i, t in zip(data["source_id"], data["source_text"])}
        assert [texts[i] for i in ids] == part[:len(ids)], row  # the first K sources of its half, in order


def check_half_compare(work, proc):
    """half_new − half_same of seed 0 over the test sentences: the greedy reward's difference by hand (mean
    sentence chrF of each row's saved translations against the first references)."""
    import sacrebleu  # pylint: disable=import-outside-toplevel

    refs = (MULTI30K_DIR / "test_2016_flickr.en").read_text(encoding="utf-8").split("\n")
    table = proc.stdout.split("each seed over its test sentences")[1]
    rows = {line.split("|")[2].strip(): line for line in table.splitlines() if line.startswith("| s0 |")}
    assert rows, proc.stdout

    def mean_reward(row, stage):
        report = json.loads((work / f"runs/m30k_study/s0/{row}/report.json").read_text())
        found = next(s for s in report["stages"] if s["name"].endswith(stage))
        hyps = (work / found["scores"][report["split"]]["translations"]).read_text().split("\n")[:-1]
        return np.mean([sacrebleu.sentence_chrf(h, [r]).score / 100 for h, r in zip(hyps, refs)])

    for stage, line in rows.items():
        got = float(line.split("|")[3].split("[")[0])
        assert abs(got - 100 * (mean_reward("half_new", stage) - mean_reward("half_same", stage))) < 0.051, line


def check_multi30k_cost(work, proc):
    """Every method of seed 0 starts from the study's BC policy and reports on test_2016 (1,000 sentences; the
    size-reducing overrides cut it); online runs sample the experiment's training sources and count one call
    per sample."""
    bc = json.loads((work / "runs/m30k_study/s0/bc/report.json").read_text())["rows"][0]
    for method in ("rest", "dpo", "grpo", "ppo"):
        report = json.loads((work / f"runs/m30k_cost/s0/{method}/report.json").read_text())
        assert report["rows"][0]["reward"] == bc["reward"], method
        assert report["split"] == "test_2016", method
    assert not (work / "runs/m30k_cost/s0/bc").exists()  # no BC of its own
    # DPO at the command's DPO_LR, not the script's default (the demo's AdamW rate).
    assert "improve/learning_rate_schedule.base_learning_rate = 0.0005" in (
        work / "runs/m30k_cost/s0/dpo/config.gin").read_text()
    for method in ("grpo", "ppo"):
        report = json.loads((work / f"runs/m30k_cost/s0/{method}/report.json").read_text())
        assert report["cost"]["reward_calls"] == 2 * 8 * 4, method
        assert report["task"] == "multi30k_de_en", method


def check_multi30k_cost_table(work, proc):
    """One seed, every method; GRPO's calls: iterations x sources x samples."""
    lines = proc.stdout.splitlines()
    assert any(line.startswith("| BC | 1 | 0 | 0 |") for line in lines), proc.stdout
    for label in ("ReST G=1 I=1", "ReST G=2 I=1", "DPO: ReST G=1 I=1", "PPO (2 it.)"):
        assert any(line.startswith(f"| {label} | 1 |") for line in lines), (label, proc.stdout)
    assert any(line.startswith(f"| GRPO (2 it.) | 1 | {2 * 8 * 4} |") for line in lines), proc.stdout
    # Per seed against its BC: the report's paired interval, and the words per translation counted by hand.
    grpo = json.loads((work / "runs/m30k_cost/s0/grpo/report.json").read_text())
    words = [len(line.split()) for line in (work / "runs/m30k_cost/s0/grpo/online/test_2016.greedy.txt").read_text()
             .splitlines()]
    row = next(line for line in lines if line.startswith(f"| GRPO (2 it.) | s0 | {2 * 8 * 4} |"))
    assert row.endswith(f" | {np.mean(words):.1f} |"), (row, np.mean(words))
    assert f"{grpo['rows'][1]['vs_bc']['reward']['delta'] * 100:+.1f} [" in row, row
    # The two --compare tables, one row per seed (one seed here).
    for pair in ("GRPO (2 it.) − ReST G=1 I=1", "DPO: ReST G=2 I=1 − GRPO (2 it.)"):
        table = proc.stdout.split(f"| {pair} |")[1]
        assert table.splitlines()[2].startswith("| | s0 | "), (pair, proc.stdout)


def check_study_table(work, proc):
    """The BC row of the printed table: mean ± t-interval of the three seeds' BC rewards, by hand."""
    rewards = [100 * json.loads((work / f"runs/m30k_study/s{s}/bc/report.json").read_text())["rows"][0]["reward"]
               for s in (0, 1, 2)]
    half = 4.302653 * np.std(rewards, ddof=1) / np.sqrt(3)  # t(0.975, 2 degrees of freedom), from a table
    assert f"| BC G=0 I=0 | 3 | {np.mean(rewards):.1f} ± {half:.1f} |" in proc.stdout, proc.stdout
    assert "| rest: ReST G=1 I=1 | 3 |" in proc.stdout and "| control: Control G=1 I=1 | 3 |" in proc.stdout
    assert "| G=1 I=1 | 3 |" in proc.stdout.split("schedule-matched control")[1]


def check_cost_runs(work, proc):
    for seed in (0, 1, 2):
        bc = json.loads((work / f"runs/demo_cost/s{seed}/bc/report.json").read_text())["rows"][0]
        for method in ("rest", "dpo", "grpo", "ppo"):
            report = json.loads((work / f"runs/demo_cost/s{seed}/{method}/report.json").read_text())
            assert report["rows"][0]["reward"] == bc["reward"], (seed, method)  # every method from the seed's BC


def check_cost_table(work, proc):
    """The cost columns by hand: a Grow store's records (ReST), iterations x sources x samples (online)."""
    store = json.loads((work / "runs/demo_cost/s0/rest/grow_1/store/metadata.json").read_text())
    assert store["counts"]["records"] == 48 * 3  # SMALL_REST: 48 sources, 2 samples and the reference each
    lines = proc.stdout.splitlines()
    assert any(line.startswith(f"| ReST G=1 I=1 | 3 | {48 * 3:,} |") for line in lines), proc.stdout
    assert any(line.startswith(f"| GRPO (2 it.) | 3 | {2 * 8 * 4} |") for line in lines), proc.stdout
    assert (work / "runs/demo_cost/plots/cost_vs_reward.png").stat().st_size > 10_000


def _small_study() -> tuple[str, ...]:
    small = [o for o in SMALL_REST if not o.startswith("--gin.TASK=")]
    return (*small, f"--gin.MULTI30K_DIR='{MULTI30K_DIR}'", "--gin.VOCAB_SIZE=1000")


def _small_multi30k() -> tuple[str, ...]:
    small = [o for o in SMALL_REST if not o.startswith("--gin.TASK=")]
    return (*small, f"--gin.MULTI30K_DIR='{MULTI30K_DIR}'", "--gin.VOCAB_SIZE=1000", "--gin.run_rest.num_grow_steps=1")


# Ordered: the first pattern that matches a command's one-line form decides.
RULES: list[tuple[str, Rule]] = [
    # README command 1: the install part is what .ci/run does on a fresh machine; the run part runs here.
    (r"^python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e \. && (python -m rest_jax\.main rest .*)$",
     Rule("run", "install as .ci/run does; the run follows", extra=tuple(SMALL_REST), check=check_demo_run)),
    (r"^pip install -e \"\.\[test\]\" && (python -m pytest -q -m \"not slow\")$", Rule("ci")),
    (r"^python -m rest_jax\.main rest --gin_file=experiments/multi30k_de_en\.gin ",
     Rule("run", "real data (../shared), tiny sizes", extra=_small_multi30k(), check=check_multi30k, slow=True)),
    (r"^python -m rest_jax\.main rest --gin_file=experiments/multi30k_decoder_only\.gin ",
     Rule("run", "real data (../shared), tiny sizes", extra=_small_multi30k(), check=check_multi30k_lm, slow=True)),
    (r"^scripts/multi30k_study\.sh 0 1 2$",
     Rule("run", "real data (../shared), tiny sizes", extra=_small_study(), check=check_study, slow=True,
          substitute=(("scripts/", "{repo}/scripts/"),))),
    (r"^BC=bc_half ROWS=\"half_same half_new\" scripts/multi30k_study\.sh 0$",
     Rule("run", "real data (../shared), tiny sizes", extra=_small_study(), check=check_half_study, slow=True,
          substitute=(("scripts/", "{repo}/scripts/"),))),
    (r"^python scripts/study_table\.py runs/m30k_study --compare half_new half_same --references ",
     Rule("run", after=(r"^BC=bc_half ROWS=\"half_same half_new\" scripts/multi30k_study\.sh 0$",),
          check=check_half_compare, slow=True,
          substitute=(("scripts/", "{repo}/scripts/"), ("../shared/data/multi30k/", f"{MULTI30K_DIR}/")))),
    (r"^python scripts/study_table\.py runs/m30k_study$",
     Rule("run", after=(r"^scripts/multi30k_study\.sh 0 1 2$",), check=check_study_table, slow=True,
          substitute=(("scripts/", "{repo}/scripts/"),))),
    (r"^EXPERIMENT=experiments/multi30k_de_en\.gin BC_DIR=runs/m30k_study COST_DIR=runs/m30k_cost .*"
     r"scripts/cost_comparison\.sh 0$",
     Rule("run", "real data (../shared), tiny sizes", extra=(*_small_study(), *SMALL_ONLINE),
          after=(r"^scripts/multi30k_study\.sh 0 1 2$",), check=check_multi30k_cost, slow=True,
          substitute=(("scripts/", "{repo}/scripts/"),))),
    (r"^python scripts/cost_table\.py runs/m30k_cost --compare ",
     Rule("run", after=(r"^EXPERIMENT=experiments/multi30k_de_en\.gin ",), check=check_multi30k_cost_table,
          slow=True, substitute=(("scripts/", "{repo}/scripts/"), ("(156 it.)", "(2 it.)"),
                                 ("../shared/data/multi30k/", f"{MULTI30K_DIR}/")))),
    (r"^python -m rest_jax\.main rest --gin_file=experiments/demo\.gin --gin\.ACTIVATION_DTYPE=",
     Rule("run", extra=tuple(SMALL_REST), check=check_bfloat16_run)),
    (r"^python -m rest_jax\.main rest --gin_file=experiments/demo_decoder_only\.gin ",
     # No best-of-N table (the encoder-decoder demo checks it; sampling this family is checked below).
     Rule("run", extra=(*SMALL_REST, "--gin.run_rest.best_of_n_ns=()"), check=check_decoder_only_run)),
    (r"^python -m rest_jax\.main online --gin_file=experiments/demo_decoder_only\.gin --gin_file=runs/grpo\.gin ",
     Rule("run", extra=(*SMALL_REST, *SMALL_ONLINE),
          after=(r"^python -m rest_jax\.main rest --gin_file=experiments/demo_decoder_only\.gin ",),
          # Slow (CI time): the fast suite runs GRPO on the encoder-decoder demo and the decoder-only pieces.
          check=check_online("grpo", run="demo_lm_grpo", bc_run="demo_lm"), slow=True)),
    (r"^python -m rest_jax\.main online --gin_file=experiments/demo_decoder_only\.gin --gin_file=runs/ppo\.gin ",
     Rule("run", extra=(*SMALL_REST, *SMALL_ONLINE, *SMALL_WARMUP),
          after=(r"^python -m rest_jax\.main rest --gin_file=experiments/demo_decoder_only\.gin ",),
          check=check_online("ppo", run="demo_lm_ppo", bc_run="demo_lm", warmup=1), slow=True)),
    (r"^rest_jax train --gin_file=runs/finetune\.gin ",
     Rule("run", extra=tuple(SMALL["train"]), after=(README_MAIN,), check=check_finetune)),
    (r"^rest_jax train --gin_file=models/tiny\.gin --gin\.MODEL_DIR=\"'runs/demo_bc'\"",
     Rule("run", extra=tuple(SMALL["train"]), after=(README_MAIN,))),
    (r"^python -m rest_jax\.main eval --gin_file=runs/eval\.gin ",
     Rule("run", extra=tuple(SMALL["eval"]), after=(README_MAIN,), check=check_eval)),
    (r"^rest_jax eval --gin_file=runs/eval\.gin ",
     Rule("run", extra=tuple(SMALL["eval"]), after=(README_MAIN,), check=check_eval)),
    (r"^rest_jax grow ", Rule("run", extra=tuple(SMALL["grow"]), after=(README_MAIN,), check=check_grow)),
    (r"^rest_jax improve ",
     Rule("run", extra=tuple(SMALL["improve"]), after=(README_MAIN, r"^rest_jax grow "), check=check_improve)),
    (r"^rest_jax launch --num_processes=2 --devices_per_process=4 -- rest --gin_file=experiments/demo\.gin ",
     Rule("run", extra=tuple(SMALL_REST), after=(README_MAIN,), check=check_launch)),
    (DEMO_CORPUS, Rule("run", check=check_demo_corpus)),
    (r"^rest_jax infer ", Rule("run", after=(README_MAIN, DEMO_CORPUS), check=check_infer)),
    (r"^rest_jax score ", Rule("run", after=(r"^rest_jax infer ",), check=check_score)),
    (r"^rest_jax convert .*runs/demo_lm/bc/checkpoints.*--gin\.TARGET_FORMAT=\"'hf'\"",
     Rule("run", after=(r"^python -m rest_jax\.main rest --gin_file=experiments/demo_decoder_only\.gin ",),
          check=check_decoder_only_hf_export)),
    (DEMO_HF_EXPORT, Rule("run", after=(README_MAIN,), check=check_hf_export)),
    (r"^rest_jax convert .*--gin\.SOURCE_FORMAT=\"'hf'\"",
     Rule("run", after=(DEMO_HF_EXPORT,), check=check_hf_round_trip)),
    (r"^rest_jax convert .*--gin\.TARGET_FORMAT=\"'t5x'\"",
     Rule("run", after=(README_MAIN,), check=check_t5x_export)),
    (r"^rest_jax vocab ", Rule("run", check=check_vocab)),
    (r"^rest_jax reward-model --gin_file=rewards/train_learned_qe\.gin ",
     Rule("run", extra=("--gin.train_learned_reward.num_steps=4", "--gin.train_learned_reward.eval_period=2",
                        "--gin.train_learned_reward.checkpoint_period=2", "--gin.train_learned_reward.batch_size=8"),
          after=(README_MAIN,), check=check_reward_model)),
    (r"^python -m rest_jax\.main rest --gin_file=models/tiny\.gin --gin_file=runs/rest\.gin ",
     Rule("run", extra=tuple(SMALL_REST), check=check_rest_tiny, slow=True)),
    (r"^python -m rest_jax\.main rest --gin_file=experiments/demo\.gin --gin_file=runs/rest_em\.gin ",
     # Without references, the tiny BC policy's samples (chrF ~0.1) are all below the 0.7 threshold.
     Rule("run", extra=(*SMALL_REST, "--gin.NUM_ITERATIONS=1", "--gin.threshold_for_step.schedule=[0.0, 0.05]"),
          check=check_rest_em, slow=True)),
    (r"^python -m rest_jax\.main rest --gin_file=experiments/demo\.gin --gin_file=runs/dpo\.gin ",
     Rule("run", extra=(*SMALL_REST, "--gin.run_rest.num_grow_steps=1"), check=check_dpo, slow=True)),
    (r"^python -m rest_jax\.main online --gin_file=experiments/demo\.gin --gin_file=runs/grpo\.gin ",
     Rule("run", extra=(*SMALL_REST, *SMALL_ONLINE), after=(README_MAIN,), check=check_online("grpo"))),
    (r"^python -m rest_jax\.main online --gin_file=experiments/demo\.gin --gin_file=runs/ppo\.gin ",
     Rule("run", extra=(*SMALL_REST, *SMALL_ONLINE, *SMALL_WARMUP), after=(README_MAIN,),
          check=check_online("ppo", warmup=1), slow=True)),
    (r"^scripts/cost_comparison\.sh 0 1 2$",
     Rule("run", extra=(*SMALL_REST, *SMALL_ONLINE), check=check_cost_runs, slow=True,
          substitute=(("scripts/", "{repo}/scripts/"),))),
    (r"^python scripts/cost_table\.py runs/demo_cost$",
     Rule("run", after=(r"^scripts/cost_comparison\.sh 0 1 2$",), check=check_cost_table, slow=True,
          substitute=(("scripts/", "{repo}/scripts/"),))),
    (r"^python -m rest_jax\.main rest --gin_file=experiments/(iwslt14_de_en|wmt_zh_en)\.gin ",
     Rule("dry_run", "the paper's tasks: a TPU pod, GCS paths and downloaded data")),
    (r"^python scripts/prepare_iwslt14\.py --output=DIR$", Rule("help", "downloads IWSLT14")),
    (r"^tfds build ", Rule("not_run", "downloads WMT from the internet (gigabytes)")),
    (r"^huggingface-cli download ", Rule("not_run", "downloads MetricX weights from the Hugging Face hub")),
    (r"^pip install -e \"\.\[test\]\" jupyterlab", Rule("not_run", "installs packages; .ci/run installs the test extra")),
    (r"^REST_JAX_RUN_DIR=/path/to/run jupyter lab ",
     Rule("not_run", "starts a browser server; the next command executes the same notebook headless")),
    (r"^REST_JAX_RUN_DIR=/path/to/run python -c ",
     Rule("run", after=(README_MAIN,), check=check_notebook, slow=True, cwd_repo=True,
          substitute=(("/path/to/run", "{work}/runs/demo"),))),
    (r"^export TPU_PROJECT=", Rule("not_run", "sets the environment of the scripts/tpu commands after it")),
    (r"^scripts/tpu/", Rule("tpu", "creates and uses Cloud TPU VMs: dry run with a fake gcloud")),
    (r"^tensorboard --logdir gs://",
     Rule("not_run", "a viewer of event files in GCS (needs gcloud credentials; `pip install tensorboard`)")),
]


def rule_for(command: DocCommand) -> tuple[re.Match, Rule] | tuple[None, None]:
    for pattern, rule in RULES:
        match = re.search(pattern, command.line)
        if match:
            return match, rule
    return None, None


COMMANDS = documented_commands()


# --------------------------------------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------------------------------------


FAKE_GCLOUD = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$GCLOUD_CALLS"
"""


class Runner:
    """Runs documented commands in one working directory, each once, prerequisites first."""

    def __init__(self, work: pathlib.Path):
        self.work = work
        self.done: dict[str, subprocess.CompletedProcess] = {}
        fake_bin = work.parent / "fake_bin"
        fake_bin.mkdir(exist_ok=True)
        (fake_bin / "gcloud").write_text(FAKE_GCLOUD)
        (fake_bin / "gcloud").chmod(0o755)
        self.env = dict(os.environ)
        # One CPU device, as a user has (conftest simulates 8 for the sharding tests).
        self.env["XLA_FLAGS"] = self.env.get("XLA_FLAGS", "").replace(
            "--xla_force_host_platform_device_count=8", "")
        # `python` and `rest_jax` are this environment's, as after `. .venv/bin/activate`.
        self.env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"
        self.env["REST_JAX_DEMO_DIR"] = str(work.parent / "demo_corpus")
        self.tpu_env = dict(self.env, PATH=f"{fake_bin}{os.pathsep}{self.env['PATH']}", DRY_RUN="1",
                            GCLOUD_CALLS=str(work.parent / "gcloud_calls.txt"), TMPDIR=str(work.parent),
                            TPU_PROJECT="my-project", TPU_ZONE="us-central2-b")

    def _bash(self, text: str, cwd: pathlib.Path, env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", text], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)

    def run(self, command: DocCommand) -> subprocess.CompletedProcess:
        if command.line in self.done:
            return self.done[command.line]
        match, rule = rule_for(command)
        for pattern in rule.after:
            before = [c for c in COMMANDS if re.search(pattern, c.line)]
            assert before, f"{command.where}: no documented command matches the prerequisite {pattern!r}"
            self.run(before[0])
        proc = getattr(self, f"_run_{rule.kind}")(command, match, rule)
        self.done[command.line] = proc
        return proc

    def _run_run(self, command, match, rule):
        text = match.group(1) if match.groups() else command.text
        for written, replacement in rule.substitute:
            text = text.replace(written, replacement.format(work=self.work, repo=REPO))
        text = " ".join([text, *(shlex.quote(o) for o in rule.extra)])
        proc = self._bash(text, REPO if rule.cwd_repo else self.work, self.env)
        assert proc.returncode == 0, f"{command.where}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
        if rule.check:
            rule.check(self.work, proc)
        return proc

    def _run_dry_run(self, command, match, rule):
        proc = self._bash(command.text + " --dry_run", self.work, self.env)
        assert proc.returncode == 0, f"{command.where}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
        return proc

    def _run_help(self, command, match, rule):
        program = shlex.split(command.line)[:2]
        proc = self._bash(" ".join([*program, "--help"]), REPO, self.env)
        assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stderr[-2000:]
        return proc

    def _run_tpu(self, command, match, rule):
        calls = pathlib.Path(self.tpu_env["GCLOUD_CALLS"])
        calls.unlink(missing_ok=True)
        proc = self._bash(command.text, REPO, self.tpu_env)
        assert proc.returncode == 0, f"{command.where}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert not calls.exists() or "tpus" not in calls.read_text(), "a dry run must not call gcloud tpus"
        assert "gcloud " in proc.stdout, proc.stdout  # the commands it would run
        argv = shlex.split(command.line, comments=True)
        if "--" in argv and argv[0].endswith("launch.sh"):
            # The workers run `python -m rest_jax.main <this>`: its gin must parse and validate here too.
            inner = argv[argv.index("--") + 1:]
            dry = self._bash(shlex.join(["python", "-m", "rest_jax.main", *inner, "--dry_run"]), self.work,
                             self.env)
            assert dry.returncode == 0, f"{command.where}: the launched command fails: {dry.stderr[-3000:]}"
        return proc

    def _run_ci(self, command, match, rule):
        ci = (REPO / ".ci" / "run").read_text().splitlines()
        assert match.group(1) in [line.strip() for line in ci], f".ci/run does not run {match.group(1)!r}"
        return subprocess.CompletedProcess([], 0, "", "")

    def _run_not_run(self, command, match, rule):
        return subprocess.CompletedProcess([], 0, "", "")


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    work = tmp_path_factory.mktemp("docs") / "work"
    work.mkdir()
    return Runner(work)


# --------------------------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------------------------


def test_every_documented_command_has_one_rule():
    """The list of documented commands and how each is checked (shown with -rP)."""
    assert len(COMMANDS) >= 30, [c.where for c in COMMANDS]  # the collectors found the docs
    missing = [f"{c.where}: {c.line}" for c in COMMANDS if rule_for(c)[1] is None]
    assert not missing, "documented commands without a rule in tests/test_documented_commands.py:\n" + "\n".join(
        missing)
    unused = [p for p, _ in RULES if not any(re.search(p, c.line) for c in COMMANDS)]
    assert not unused, f"rules that match no documented command (stale): {unused}"
    print(f"\n{len(COMMANDS)} documented commands:")
    for command in COMMANDS:
        rule = rule_for(command)[1]
        note = f" ({rule.reason})" if rule.reason else ""
        print(f"  {rule.kind + (' slow' if rule.slow else ''):<12} {command.where:<40} {command.line[:110]}{note}")


def test_every_subcommand_is_documented_with_a_command_that_runs():
    from rest_jax import main as cli  # pylint: disable=import-outside-toplevel

    ran = {m.group(1) for c in COMMANDS if rule_for(c)[1].kind == "run"
           for m in [re.search(r"(?:rest_jax|rest_jax\.main) ([a-z-]+)", c.line)] if m}
    assert set(cli.SUBCOMMANDS) <= ran, set(cli.SUBCOMMANDS) - ran


def test_cli_help_in_a_fresh_process(runner):
    proc = runner._bash("rest_jax --help", runner.work, runner.env)  # pylint: disable=protected-access
    assert proc.returncode == 0, proc.stderr
    for name in ("train", "grow", "improve", "rest", "eval", "infer", "score", "convert", "vocab"):
        # Each subcommand a user runs has a run config, named under it with the macros it needs.
        assert re.search(rf"^  {name} .*\n\s+run config: \S*configs/runs/", proc.stdout, re.M), (name, proc.stdout)


def _params():
    params = []
    for command in COMMANDS:
        rule = rule_for(command)[1]
        if rule is None or rule.kind == "not_run":
            continue
        marks = [pytest.mark.slow] if rule.slow else []
        params.append(pytest.param(command, marks=marks, id=f"{command.where}"))
    return params


@pytest.mark.parametrize("command", _params())
def test_documented_command(command, runner):
    if ("multi30k" in command.line or "m30k" in command.line) and not (MULTI30K_DIR / "train.de").exists():
        if os.environ.get("CI"):
            pytest.fail(f"Multi30k not found at {MULTI30K_DIR} (CI is set: real-data tests may not skip)")
        pytest.skip(f"Multi30k not found at {MULTI30K_DIR}")
    runner.run(command)
