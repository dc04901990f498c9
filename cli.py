"""How every script talks to its user: flags with their ranges, and mistakes as one line.

    p = cli.parser(__doc__, "train.py")              # -h shows each default once
    p.add_argument("--epochs", type=cli.positive(int), default=100)
    cli.run(main, "train.py")                        # UserError, OSError, Ctrl-C: one line

A user's mistake (a flag out of range, a missing or foreign file, a full disk) is a `UserError` or
an OSError: the script prints one line that names the flag or file and says what to do, and exits
with 2 (a flag) or 1 (a file, the data, the machine). Anything else is a bug in the code and keeps
its traceback. Ctrl-C ends with one line too; what a script saves, it saves atomically, so an
interrupt never leaves a half-written file behind.
"""

import argparse
import io
import math
import os
import signal
import sys
from pathlib import Path


TITLES = {"simclr": "SimCLR", "gim": "GIM", "loco": "LoCo"}    # the methods' names in figures


class UserError(Exception):
    """A mistake in a flag or a file, shown to the user as one line."""

    def __init__(self, message: str, flag: bool = False):
        # Raised in a DataLoader worker (a bad image), it reaches the main process rebuilt as
        # UserError("Caught UserError in DataLoader worker process 0. Original Traceback ...
        # UserError: <message>"): keep the message, say where it came from.
        if "Original Traceback" in message:
            message = message.rsplit("UserError: ", 1)[-1].strip() + " (in a DataLoader worker)"
        super().__init__(message)
        self.exit_code = 2 if flag else 1


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in -h, except where the help text already says what happens without the flag."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A bad flag: one line (argparse would print the whole usage first), exit code 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def parser(doc: str, prog: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=doc.split("\n")[0], formatter_class=_Help)


def _number(kind, low: float, strict: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    parse.__name__ = kind.__name__    # argparse names the type in its messages
    return parse


def positive(kind=float):
    """A flag type: a number above 0."""
    return _number(kind, 0, True, "above 0")


def at_least_zero(kind=float):
    """A flag type: a number of 0 or more."""
    return _number(kind, 0, False, "0 or more")


ROOT = Path(__file__).resolve().parent        # the repository


def portable(path: str | Path) -> str:
    """A path as results record it: relative to the repository when inside it (a committed
    result then names no machine's folders), else as given."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def resolve(path: str | Path) -> Path:
    """A recorded path, back to one this machine can open: relative ones are the repository's."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def check_writable(path: str | Path, flag: str, is_dir: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot be written: its nearest existing
    ancestor must be a writable directory (and the path itself not a file where a directory is
    wanted, nor a directory where a file is)."""
    path = Path(path)
    if path.exists() and path.is_dir() != is_dir:
        raise UserError(f"{flag} {path}: is a {'file' if is_dir else 'directory'}; give "
                        f"{'a directory' if is_dir else 'a file name'}", flag=True)
    parent = path if is_dir else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: {parent} is not a writable directory", flag=True)
    return path


def write_atomic(path: str | Path, content: str | bytes) -> None:
    """Write a file whole or not at all: a temporary file beside it, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    except OSError:                      # a full disk: leave no half-written temporary behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def save_figure(fig, path: str | Path) -> None:
    """A matplotlib figure as a PNG (dpi 100: small enough to commit), written atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_atomic(path, buffer.getvalue())
    print(f"wrote {path}")


def _terminated(signum, frame):
    raise KeyboardInterrupt            # SIGTERM (a kill; torchrun stopping a job): as Ctrl-C


_abandon = False                       # set by stopping(abandon=True)


def stopping(abandon: bool = False) -> None:
    """A process that is already ending (and saying why) ignores SIGTERM from here on: torchrun
    sends it to the survivors when one process dies, and it must not cut that message short.
    abandon: the process's group of processes is broken (a peer is gone), so once its line is
    out the process leaves at once (os._exit), running no teardown of that group: destroying it,
    or letting the interpreter's exit destroy it, can block or abort ("terminate called without
    an active exception") on a connection the peer has already dropped."""
    global _abandon
    _abandon = _abandon or abandon
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def abandoned() -> bool:
    return _abandon


def run(main, script: str) -> None:
    """Call main(); turn a user's mistake or an interrupt into one line and an exit code."""
    global _abandon
    _abandon = False
    signal.signal(signal.SIGTERM, _terminated)
    try:
        main()
    except UserError as e:
        _exit(_line(script, e, e.exit_code))
    except OSError as e:                # missing, unreadable or unwritable file, full disk
        where = f"{e.filename}: " if e.filename else ""
        _exit(_line(script, f"{where}{e.strerror or e}", 1))
    except KeyboardInterrupt as e:
        print(f"\n{script}: interrupted. {str(e) or 'Nothing was left half-written.'}",
              file=sys.stderr)
        _exit(130)


def _exit(code: int) -> None:
    if _abandon:                        # what is saved is saved, the line is out: leave now
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _line(script: str, message, code: int) -> int:
    print(f"{script}: error: {message}", file=sys.stderr)
    return code
