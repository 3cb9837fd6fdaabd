"""Command-line entry points: `automodel-jax COMMAND` and the modules behind `python -m automodel_jax.COMMAND`.

`automodel-jax COMMAND ARGS...` runs `python -m automodel_jax.COMMAND ARGS...`: every argument after the command goes
to that module's main() untouched, so each command keeps its own options, help and errors. Commands are imported only
when chosen, so a typo fails fast.
"""
from __future__ import annotations

import difflib
import importlib
import sys
import traceback
from collections.abc import Callable, Sequence

PROG = "automodel-jax"
# command -> (module whose main(argv) it runs, one-line summary)
COMMANDS = {
    "finetune": ("automodel_jax.cli.finetune", "fine-tune a model (LoRA or full SFT): --config FILE[:PRESET] "
                                           "--config.KEY=VALUE ..."),
    "export": ("automodel_jax.cli.export", "export a run's checkpoint as an HF model or PEFT adapter"),
    "generate": ("automodel_jax.cli.generate", "stream a model's continuation of prompts to the terminal"),
    "evaluate": ("automodel_jax.cli.evaluate", "score a model on HellaSwag or SQuAD"),
    "launch": ("automodel_jax.cli.launch", "write and submit a multi-node Slurm job for a fine-tuning run"),
    "plan": ("automodel_jax.cli.plan", "print the mesh, remat, loss and micro-batch plan=auto would choose, and why "
                                       "(compiles on abstract shapes; trains nothing)"),
}


def quiet_libraries() -> None:
    """Keep library chatter out of a command's output: `datasets` progress bars ("Generating train split", "Map")
    and INFO logs. Called when the cli package is imported, so it holds for every command."""
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_warning()


quiet_libraries()


# What a command reports as bad input (one `error:` line, exit code 2) rather than as a crash with a traceback.
BAD_INPUT = (FileNotFoundError, FileExistsError, ValueError)


def exit_code(action: Callable[[], object], errors: tuple[type[BaseException], ...] = BAD_INPUT,
              rerun: str | None = None) -> int:
    """Run a command's `action`: 0 when it succeeds; one of `errors` becomes one `error:` line on stderr and 2; a
    signal (`Interrupted`, or Ctrl-C where no handler is installed) one line, with `rerun` (the command that resumes)
    when given, and 128 + the signal number. In a multi-process run the process then leaves the cluster
    (`leave_cluster`): cleanly when every process ends alike, else announcing its failure so the others stop at once
    (a crash is announced after Python's traceback)."""
    from automodel_jax.launcher.distributed import leave_cluster
    from automodel_jax.training.interrupt import Interrupted
    try:
        action()
    except Interrupted as error:
        print(f"{error}{f'; resume with: {rerun}' if rerun else ''}", file=sys.stderr, flush=True)
        return leave_cluster(error.exit_code, None if error.agreed else str(error))
    except KeyboardInterrupt:
        print("interrupted by SIGINT", file=sys.stderr, flush=True)
        return leave_cluster(130, "interrupted by SIGINT")
    except errors as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return leave_cluster(2, str(error))
    except SystemExit:  # --help and the like
        raise
    except BaseException as error:
        traceback.print_exc()
        raise SystemExit(leave_cluster(1, f"{type(error).__name__}: {error}")) from None
    return leave_cluster(0)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} COMMAND [ARGS...]", "", "Fine-tune Hugging Face LLMs with LoRA or full SFT in JAX/Flax.",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", f"A command's options: {PROG} COMMAND --help (finetune's are the keys of its config file, set "
                  "with --config.KEY=VALUE)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the command's main(); returns its exit code (2 for a missing or unknown command)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not args or args[0].startswith("-"):
        given = f"unknown option '{args[0]}'" if args else "missing command"
        print(f"{usage()}\n\nerror: {given}; give one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        print(f"error: unknown command '{command}'; {hint}commands: {', '.join(COMMANDS)} (see {PROG} --help)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
