"""User errors and the one way every command-line entry point reports them.

A UserError is a problem with the user's input: it is printed as one `error: ...` line and the
process exits with status 2, never with a traceback. `run_cli` wraps every entry point.
"""
import argparse
import sys


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""

    def __init__(self, message=""):
        super().__init__(_unwrap_worker_message(str(message)))

    def for_command_line(self):
        """The message as a command line prints it (common.config.FieldError names the flag)."""
        return str(self)


def _unwrap_worker_message(message):
    """A DataLoader worker re-raises our error with its whole traceback in the message: keep
    only the original message (the last line, after `ClassName: `)."""
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    head, sep, tail = last.partition(": ")
    return tail if sep and "Error" in head else last


class ArgumentParser(argparse.ArgumentParser):
    """argparse that shows defaults in --help and turns its errors into UserErrors."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserError(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows every default (a None default is
    explained by the flag's own help)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def first_line(error, limit=200):
    """The first non-empty line of an exception's text (its type name when it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(error).__name__


class Terminated(Exception):
    """SIGTERM arrived (a scheduler's pre-emption or time limit, `kill`)."""


def _terminate(signum, frame):
    raise Terminated()


def run_cli(main, argv=None, extra_errors=None, stopped=None):
    """Call `main(argv)`; return the exit status the process should end with.

    A UserError prints `error: <message>` (status 2), and so does a file-system failure
    (read-only, full, a name too long); Ctrl-C (status 130) and SIGTERM (status 143) print one
    line, with `stopped()` (what is saved, where a rerun resumes) when given.
    `extra_errors(exc)` may turn another exception into a message (or return None).
    """
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        status = main(argv)
        return status if isinstance(status, int) and not isinstance(status, bool) else 0
    except UserError as e:
        print(f"error: {e.for_command_line()}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
        more = stopped() if stopped is not None else "files already written are complete"
        print(f"{what}: stopped; {more}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except OSError as e:  # the file system: read-only, full, a name too long, a vanished file
        where = f" {e.filename}" if e.filename else ""
        print(f"error: file system error{where}: {e.strerror or first_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        message = extra_errors(e) if extra_errors is not None else None
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


def parse_first(make_parser, argv=None):
    """Parse the flags before a command's heavy imports: --help prints, and a bad flag is one
    `error:` line (exit status 2), without waiting for torch to load. main() parses again."""
    try:
        make_parser().parse_args(argv)
    except UserError as e:
        print(f"error: {e.for_command_line()}", file=sys.stderr)
        sys.exit(2)
