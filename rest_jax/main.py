"""Command line for rest_jax, shaped like T5X's: `python -m rest_jax.main SUBCOMMAND [flags]`.

    rest_jax train --gin_file=models/t5_1_1_small.gin --model_dir=/tmp/bc --gin.TASK="'multi30k_de_en'"
    rest_jax rest  --gin_file=models/t5_1_1_small.gin --gin.MODEL_DIR="'gs://bucket/rest'" ...
    rest_jax train --help                 # run config, the macros it still needs, entry docstring
    rest_jax launch --num_processes=2 --devices_per_process=4 -- rest ...   # P local processes (launch.py)

Each subcommand calls one gin-configurable entry function with no arguments; every setting comes from
gin (the T5X habit).  Order of events: import every module with configurables (`rest_jax.configurables`), parse
the subcommand's run config `configs/runs/<subcommand>.gin` when it exists (train also
accepts runs/pretrain.gin, eval runs/evaluate.gin; --no_run_config skips it), then each --gin_file, then the
bindings (--model_dir, --gin_bindings, --gin.KEY=VALUE, in that order, later wins), validate (unbound or
%gin.REQUIRED macros, typos, required entry arguments, value types), start multi-host JAX if asked, refuse
a rerun whose settings differ from those of the work already in MODEL_DIR (`rest_jax.rerun`), print the
config and save it as MODEL_DIR/config.gin, run, and save MODEL_DIR/operative_config.gin (the values actually
used).  Configuration mistakes exit with status 2 and a short message with close matches (also a knob
whose value the run itself finds wrong: a GinConfigError raised inside it, e.g. convert.output_path
naming a folder it must not overwrite); other errors inside a run keep their traceback.  Ctrl-C exits
with status 130 and one line saying what was kept and that rerunning the same command resumes.

Quiet by default (`rest_jax.console`): progress bars, a summary line per stage and warnings; --verbose
(or REST_JAX_VERBOSE=1) also prints the config, library and detail logs and TF/XLA start-up lines.  The
config is printed to stderr so that subcommands writing results to stdout (infer, score) can be piped;
with --dry_run (parse, validate and print, run nothing) it goes to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import signal
import sys
import textwrap
import traceback
from typing import Any, Callable, Sequence

# TensorFlow (used by SeqIO for data only) logs device probing at start-up; keep the console for the run.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from rest_jax import configurables  # noqa: E402
from rest_jax import gin_utils  # noqa: E402
from rest_jax import rerun  # noqa: E402
from rest_jax.gin_utils import Binding, GinConfigError  # noqa: E402
from rest_jax.io import console  # noqa: E402

PROG = "rest_jax"
CONFIG_FILENAME = "config.gin"
OPERATIVE_CONFIG_FILENAME = "operative_config.gin"
EXIT_FAILED = 1  # the run failed (as Python's own exit status for an uncaught exception)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
DISTRIBUTED_ENV = "REST_JAX_DISTRIBUTED"


@dataclasses.dataclass(frozen=True)
class Subcommand:
    """One subcommand: `entry` is "module:function", imported only when the subcommand runs."""

    entry: str
    summary: str
    # Run configs to load first, relative to the search paths; the first that exists is used.
    # Empty: `runs/<subcommand>.gin`.
    run_configs: tuple[str, ...] = ()
    # For a subcommand without a run config: the gin file a user passes (named in the help).
    example_gin_file: str = ""

    @property
    def module(self) -> str:
        return self.entry.split(":", 1)[0]

    @property
    def function(self) -> str:
        return self.entry.split(":", 1)[1]


# Section numbers refer to ReST (Gulcehre et al. 2023, arXiv 2308.08998).
SUBCOMMANDS: dict[str, Subcommand] = {
    "train": Subcommand("rest_jax.train:train", "Supervised (behaviour cloning) training of the first policy.",
                        ("runs/train.gin", "runs/pretrain.gin")),
    "grow": Subcommand("rest_jax.grow:grow", "Grow step (Sec. 2): sample N translations per source and score them."),
    "improve": Subcommand("rest_jax.improve:improve",
                          "Improve step (Sec. 2): filter a Grow store by reward threshold and fine-tune."),
    "rest": Subcommand("rest_jax.rest:run_rest", "Full ReST loop (Algorithm 1): G Grow steps, I Improve steps each."),
    "online": Subcommand("rest_jax.online:online",
                         "Online RL baseline (Sec. 5): PPO, GRPO or RLOO from the BC policy, with its cost."),
    "eval": Subcommand("rest_jax.evaluate:evaluate", "Evaluate a checkpoint: BLEU, chrF, reward, best-of-N.",
                       ("runs/eval.gin", "runs/evaluate.gin")),
    "infer": Subcommand("rest_jax.evaluate:infer", "Translate inputs with a checkpoint."),
    "score": Subcommand("rest_jax.evaluate:score", "Score (source, translation) pairs with a reward model."),
    "convert": Subcommand("rest_jax.convert:convert", "Convert checkpoints: HF <-> rest_jax, T5X -> rest_jax."),
    "vocab": Subcommand("rest_jax.data.task_vocab:train_task_vocabulary", "Train a SentencePiece vocabulary."),
    "reward-model": Subcommand("rest_jax.reward_model:train_learned_reward",
                               "Train a learned (e.g. reference-free) reward model.",
                               example_gin_file="rewards/train_learned_qe.gin"),
}

FLAGS_HELP = """\
flags:
  --gin_file=PATH           gin file, repeatable; looked up as given, then under each search path
                            (--gin_file=models/tiny.gin finds configs/models/tiny.gin).
  --gin.KEY=VALUE           gin binding override, repeatable, applied after all files:
                            --gin.train.num_steps=100  --gin.MODEL_DIR="'/tmp/run'".
                            Unquoted strings are accepted only when unambiguous (no gin syntax
                            characters, not true/false/none): --gin.MODEL_DIR=gs://bucket/run.
  --gin_bindings=TEXT       a raw binding line, repeatable (T5X spelling): --gin_bindings="X = 1".
  --gin_search_paths=A,B    extra directories to search for gin files (before the defaults:
                            the current directory and the repository's configs/).
  --model_dir=DIR           shortcut for --gin.MODEL_DIR=DIR (local path or gs://).
  --no_run_config           do not load configs/runs/<subcommand>.gin automatically.
  --multihost               always call jax.distributed.initialize() (also REST_JAX_DISTRIBUTED=1);
                            otherwise gin initialize_multihost.mode decides ('auto': when the
                            environment shows several processes).  Needed on TPU pod slices.
  --dry_run                 parse, validate and print the config; run nothing.
  --verbose                 also print the config, library and per-step logs and TF/XLA start-up
                            lines (also REST_JAX_VERBOSE=1); by default: progress, one line per
                            stage, warnings.
  -h, --help                this help; `rest_jax SUBCOMMAND --help` for one subcommand.
exit status: 0 success, 1 the run failed (the error says why), 2 configuration or usage error,
             130 interrupted (Ctrl-C; rerun to resume)."""


class UsageError(GinConfigError):
    """Bad command-line usage (unknown flag or subcommand)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; keep one error style.
        raise UsageError(message)


def _build_parser() -> _Parser:
    parser = _Parser(prog=PROG, add_help=False, allow_abbrev=False)
    parser.add_argument("command", nargs="?")
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--gin_search_paths", action="append", default=[])
    parser.add_argument("--model_dir")
    parser.add_argument("--no_run_config", action="store_true")
    parser.add_argument("--multihost", action="store_true")
    parser.add_argument("--dry_run", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    return parser


def _known_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings]  # pylint: disable=protected-access


def _split_gin_flags(argv: Sequence[str]) -> tuple[list[Binding], list[str]]:
    """Pulls `--gin.KEY=VALUE` (or `--gin.KEY VALUE`) out of argv; argparse cannot declare them."""
    bindings, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--gin."):
            body = arg[len("--gin."):]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                key, value = body, argv[i + 1]
                i += 1
            else:
                raise UsageError(f"{arg}: expected --gin.KEY=VALUE")
            bindings.append(gin_utils.binding_from_flag(key, value))
        else:
            rest.append(arg)
        i += 1
    return bindings, rest


@dataclasses.dataclass
class Invocation:
    """What the command line asked for, before gin is touched."""

    command: str | None
    gin_files: list[str]
    bindings: list[Binding]
    search_paths: list[str]
    use_run_config: bool
    multihost: bool
    dry_run: bool
    help: bool
    verbose: bool = False


def parse_args(argv: Sequence[str]) -> Invocation:
    """Parses the command line (not gin); raises UsageError / GinConfigError with close matches."""
    gin_flags, rest = _split_gin_flags(list(argv))
    parser = _build_parser()
    args, unknown = parser.parse_known_args(rest)
    for extra in unknown:
        if extra.startswith("-"):
            name = extra.split("=", 1)[0]
            matches = gin_utils.close_matches(name, _known_flags(parser) + ["--gin.KEY"], cutoff=0.5)
            raise UsageError(f"unknown flag {name}." + (f" Did you mean: {', '.join(matches)}?" if matches else "")
                             + f" See `{PROG} --help`.")
        raise UsageError(f"unexpected argument {extra!r}; only one subcommand is allowed. See `{PROG} --help`.")
    if args.command is not None and args.command not in SUBCOMMANDS:
        matches = gin_utils.close_matches(args.command, SUBCOMMANDS, cutoff=0.5)
        raise UsageError(f"unknown subcommand {args.command!r}."
                         + (f" Did you mean: {', '.join(matches)}?" if matches else "")
                         + f" Choose from: {', '.join(SUBCOMMANDS)}.")
    bindings: list[Binding] = []
    if args.model_dir:
        model_dir = args.model_dir if "://" in args.model_dir else os.path.expanduser(args.model_dir)
        bindings.append(Binding(f"MODEL_DIR = {model_dir!r}", f"--model_dir={args.model_dir}"))
        for b in gin_flags:
            if b.key == "MODEL_DIR":
                raise UsageError(f"both --model_dir and {b.source} given; use one.")
    bindings += [Binding(text, f"--gin_bindings={text}") for text in args.gin_bindings]
    bindings += gin_flags
    extra_paths = [p for value in args.gin_search_paths for p in value.split(",") if p]
    search_paths = list(dict.fromkeys([*(os.path.abspath(p) if "://" not in p else p for p in extra_paths),
                                       *gin_utils.default_search_paths()]))
    return Invocation(command=args.command, gin_files=list(args.gin_file), bindings=bindings,
                      search_paths=search_paths, use_run_config=not args.no_run_config,
                      multihost=args.multihost, dry_run=args.dry_run, help=args.help,
                      verbose=args.verbose or console.verbose_from_env())


# --------------------------------------------------------------------------------------------------------
# Help.
# --------------------------------------------------------------------------------------------------------


def run_config_names(command: str) -> tuple[str, ...]:
    return SUBCOMMANDS[command].run_configs or (f"runs/{command}.gin",)


def run_config(command: str, search_paths: Sequence[str]) -> str | None:
    """The subcommand's run config (e.g. `runs/<command>.gin`) found on the search paths, or None."""
    for name in run_config_names(command):
        try:
            return gin_utils.resolve_gin_file(name, search_paths)
        except GinConfigError:
            continue
    return None


def _display_path(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path


def _required_text(files: Sequence[str], search_paths: Sequence[str], bindings: Sequence[Binding] = ()) -> str:
    try:
        required = gin_utils.required_macros(files, search_paths, [b.text for b in bindings])
    except (GinConfigError, SyntaxError, ValueError) as e:
        return f"(could not scan: {str(e).splitlines()[0]})"
    return ", ".join(required) if required else "none"


def _no_run_config(command: str) -> str:
    """What the help says of a subcommand whose run config is not found: which gin file to pass instead."""
    example = SUBCOMMANDS[command].example_gin_file
    if example:
        return f"none; pass --gin_file={example} (or your own)"
    return f"none ({' or '.join(run_config_names(command))} not found); pass --gin_file"


def general_help(search_paths: Sequence[str]) -> str:
    lines = [f"usage: {PROG} SUBCOMMAND [--gin_file=PATH]... [--gin.KEY=VALUE]... [--model_dir=DIR] [flags]",
             "       (same as: python -m rest_jax.main SUBCOMMAND ...)", "",
             "ReST (Reinforced Self-Training, Gulcehre et al. 2023) for machine translation; gin-configured",
             "like T5X.  Each subcommand loads its run config, then your gin files and overrides.", "",
             "subcommands:"]
    width = max(map(len, SUBCOMMANDS))
    for name, sub in SUBCOMMANDS.items():
        lines.append(f"  {name:<{width}} {sub.summary}")
        rc = run_config(name, search_paths)
        if rc:
            lines.append(f"  {'':<{width}}   run config: {_display_path(rc)}; "
                         f"required macros: {_required_text([rc], search_paths)}")
        else:
            lines.append(f"  {'':<{width}}   run config: {_no_run_config(name)}")
    lines += [f"  {'launch':<{width}} Run any subcommand as P local processes of one multi-process JAX job:",
              f"  {'':<{width}}   {PROG} launch --num_processes=2 --devices_per_process=4 -- rest --gin_file=...",
              "", FLAGS_HELP]
    return "\n".join(lines)


def subcommand_help(inv: Invocation) -> str:
    sub = SUBCOMMANDS[inv.command]
    rc = run_config(inv.command, inv.search_paths) if inv.use_run_config else None
    files = gin_files_for(inv)
    lines = [f"usage: {PROG} {inv.command} [--gin_file=PATH]... [--gin.KEY=VALUE]... [flags]", "",
             sub.summary, f"entry function: {sub.entry} (called with no arguments; configure it with gin)",
             f"run config: {_display_path(rc) if rc else _no_run_config(inv.command)}",
             f"gin files loaded: {', '.join(_display_path(f) for f in files) or 'none'}",
             f"macros still required: {_required_text(files, inv.search_paths, inv.bindings) if files else 'none'}",
             f"search paths: {', '.join(inv.search_paths)}"]
    try:
        with console.quiet_native_stderr(not inv.verbose):  # the entry's import starts TensorFlow, which logs
            doc = inspect_doc(sub)
    except ImportError as e:
        doc = f"(entry not importable: {e})"
    if doc:
        lines += ["", textwrap.indent(doc, "  ")]
    lines += ["", FLAGS_HELP]
    return "\n".join(lines)


def inspect_doc(sub: Subcommand) -> str:
    import inspect  # pylint: disable=import-outside-toplevel

    return inspect.getdoc(load_entry(sub)) or ""


# --------------------------------------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------------------------------------


def load_entry(sub: Subcommand) -> Callable[[], Any]:
    """Imports the entry function; a missing module is reported plainly, other import errors propagate."""
    try:
        module = importlib.import_module(sub.module)
    except ModuleNotFoundError as e:
        if e.name and sub.module.startswith(e.name):
            raise ImportError(f"module {sub.module} is not available ({e})") from e
        raise
    try:
        return getattr(module, sub.function)
    except AttributeError as e:
        raise ImportError(f"{sub.module} has no function {sub.function!r}") from e


def _process_index() -> int:
    # Only ask JAX when something already imported it: asking initialises the backends.
    if "jax" not in sys.modules:
        return 0
    return sys.modules["jax"].process_index()


def start_multihost(forced: bool) -> None:
    """Starts multi-host JAX before anything touches devices; every host runs this same command.

    The one place for it is `rest_jax.partitioning.initialize_multihost` (gin knob `mode`, default
    'auto': on when the environment shows a multi-process launch).  --multihost or REST_JAX_DISTRIBUTED=1
    (set by scripts/tpu/launch.sh) force mode='always', for TPU pods whose topology only the metadata
    server knows.
    """
    forced = forced or os.environ.get(DISTRIBUTED_ENV, "").strip().lower() in ("1", "true", "yes")
    from rest_jax import partitioning  # pylint: disable=import-outside-toplevel

    partitioning.initialize_multihost(**({"mode": "always"} if forced else {}))


def gin_files_for(inv: Invocation) -> list[str]:
    """The run config (unless disabled or listed explicitly), then the --gin_file files in order."""
    files = list(inv.gin_files)
    rc = run_config(inv.command, inv.search_paths) if inv.use_run_config else None
    if rc:
        listed = set()
        for f in files:
            try:
                listed.add(os.path.realpath(gin_utils.resolve_gin_file(f, inv.search_paths)))
            except GinConfigError:
                pass  # reported with close matches when parsing
        if os.path.realpath(rc) not in listed:
            files.insert(0, rc)
    return files


def configure(inv: Invocation, entry: Callable[..., Any] | None) -> list[str]:
    """Parses and validates gin for `inv`; returns the gin files loaded (run config first)."""
    files = gin_files_for(inv)
    gin_utils.parse(files, inv.bindings, inv.search_paths)
    gin_utils.validate(entry, cli_bindings=inv.bindings)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (configuration errors -> 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # not a gin entry: it starts P processes of the command after `--`
        from rest_jax import launch  # pylint: disable=import-outside-toplevel

        return launch.main(argv[1:])
    try:
        inv = parse_args(argv)
    except GinConfigError as e:
        return _fail(e)
    if inv.help or inv.command is None:
        if inv.command is None:
            print(general_help(inv.search_paths), file=sys.stdout if inv.help else sys.stderr)
            return 0 if inv.help else EXIT_USAGE
        print(subcommand_help(inv))
        return 0
    with console.verbosity(inv.verbose):
        return _run(inv)


def _run(inv: Invocation) -> int:
    """Configures, starts and runs the subcommand (logging levels already set for inv.verbose)."""
    quiet = not inv.verbose
    sub = SUBCOMMANDS[inv.command]
    try:
        with console.quiet_native_stderr(quiet):  # TensorFlow's import logs oneDNN and cuda probes
            configurables.register()
            entry = load_entry(sub)
    except ImportError as e:
        print(f"{PROG} {inv.command}: error: {e}", file=sys.stderr)
        return 1
    try:
        files = configure(inv, entry)
    except GinConfigError as e:
        return _fail(e, inv.command)

    with console.quiet_native_stderr(quiet):  # backend probing (cuInit, TPU) logs failed attempts
        try:
            start_multihost(inv.multihost)
        except ConnectionError as e:  # partitioning.CoordinatorUnreachableError: the address and the knob
            print(f"{PROG} {inv.command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 1
        chief = _process_index() == 0
        console.start_tensorflow()
    if not chief and not inv.verbose:
        # Process 0 speaks for a multi-process job (its summary lines, progress); the others say only what
        # goes wrong. `rest_jax launch` prefixes each line with the process index.
        console.logger.setLevel(logging.WARNING)

    import gin  # pylint: disable=import-outside-toplevel

    model_dir = gin_utils.macro_value("MODEL_DIR")
    text = gin.config_str()
    if model_dir:
        try:  # before config.gin is replaced: it describes the work already in MODEL_DIR
            rerun.check(inv.command, model_dir, text, CONFIG_FILENAME)
        except GinConfigError as e:
            return _fail(e, inv.command)
        except Exception as e:  # pylint: disable=broad-except
            # A dry run checks the config on a machine that may not reach MODEL_DIR (gs:// from a laptop);
            # the run itself must read it, so there the error stands.
            if not inv.dry_run:
                raise
            print(f"{PROG} {inv.command}: note: {model_dir} could not be read ({type(e).__name__}), so earlier "
                  "work there was not checked against this config.", file=sys.stderr)
    if chief and (inv.dry_run or inv.verbose):
        header = (f"# {PROG} {inv.command}: gin config from {', '.join(_display_path(f) for f in files) or 'flags'}"
                  f"{'' if not inv.bindings else ' + ' + str(len(inv.bindings)) + ' override(s)'}\n")
        print(header + text, file=sys.stdout if inv.dry_run else sys.stderr, flush=True)
    if inv.dry_run:
        return 0
    if chief:
        if model_dir:
            path = gin_utils.save_config(model_dir, text, CONFIG_FILENAME)
            console.logger.info("Saved gin config to %s%s", path, "" if inv.verbose else " (--verbose prints it)")
        else:  # eval, infer, score, convert, vocab: no run directory to describe (not worth a warning)
            logging.info("MODEL_DIR is not set; the gin config is not saved.")
    try:
        entry()
    except GinConfigError as e:
        # A knob whose value is found wrong only when the run uses it (e.g. convert.output_path naming a
        # folder of user files): one line, like the configuration errors above.
        return _fail(e, inv.command)
    except Exception as e:  # pylint: disable=broad-except
        if inv.verbose or _multiprocess() or not _explains_itself(e):
            raise
        _print_error(f"{PROG} {inv.command}", f"{type(e).__name__}: {e}")
        print(f"{PROG} {inv.command}: (--verbose shows the traceback)", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        if inv.verbose:
            traceback.print_exc()  # where it was: for a run that seemed stuck
        # Saves are atomic (a cut-short one is a tmp directory, never a step), so the files say what is kept.
        print(console.interrupted_line(inv.command, model_dir), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        if chief and model_dir:
            try:
                gin_utils.save_config(model_dir, gin.operative_config_str(), OPERATIVE_CONFIG_FILENAME)
            except Exception:  # pylint: disable=broad-except
                # Never mask the run's own exception with a bookkeeping failure.
                logging.exception("Could not save %s", OPERATIVE_CONFIG_FILENAME)
    return 0


def _fail(err: GinConfigError, command: str | None = None) -> int:
    _print_error(f"{PROG} {command}" if command else PROG, str(err))
    return EXIT_USAGE


def _print_error(prefix: str, message: str) -> None:
    """`<prefix>: error: <line>` for each line of `message`, without the call chain gin appends to it."""
    # gin appends "  In call to configurable 'name' (<function ...>)" to errors raised inside an entry.
    lines = [line for line in message.splitlines() if not line.startswith("  In call to configurable ")]
    for line in lines or ["(no message)"]:
        print(f"{prefix}: error: {line}", file=sys.stderr)


def _explains_itself(err: BaseException) -> bool:
    """True for errors whose message names the file or setting and what to do: rest_jax's own error classes
    (a damaged checkpoint, a mismatched Grow store, data not prepared, a NaN loss, ...) and a missing file.
    These print as one line; anything else keeps its traceback, since it may be a bug."""
    return isinstance(err, FileNotFoundError) or any(
        cls.__module__.startswith("rest_jax.") for cls in type(err).__mro__)


def _multiprocess() -> bool:
    """True when this process is one of a multi-process JAX job (jax.distributed started)."""
    jax = sys.modules.get("jax")
    return bool(jax) and jax.distributed.is_initialized()


def console_main() -> None:
    """Console script `rest_jax` (setup.py entry point); `python -m rest_jax.main` runs it too."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A shell starts background jobs with SIGINT ignored, and children inherit that: a process started by
    # `rest_jax launch` from such a job would ignore the Ctrl-C the launcher passes on.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main()
    except KeyboardInterrupt:  # before the run started (imports, configuration): nothing to keep
        print(f"{PROG}: interrupted.", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Exception:  # pylint: disable=broad-except
        if not _multiprocess():
            raise
        traceback.print_exc()
        code = 1
    # Interpreter teardown after Ctrl-C (freeing device buffers and compiled programs, library threads)
    # takes seconds and writes nothing: event files are closed and checkpoint saves are atomic. A failed
    # process of a multi-process job must not wait in jax.distributed's shutdown barrier for peers that
    # are still working (up to 5 minutes): exiting now lets them learn of it through the heartbeat.
    if code == EXIT_INTERRUPTED or (code != 0 and _multiprocess()):
        sys.stdout.flush()
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)  # pylint: disable=protected-access
    sys.exit(code)


if __name__ == "__main__":
    console_main()
