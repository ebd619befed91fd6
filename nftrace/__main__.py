"""The `nftrace` command, and `python -m nftrace`.

This module imports nothing heavy, so that the command line (typer and what it loads) is
imported under a Ctrl-C handler of its own: a Ctrl-C in that first fraction of a second has
nothing to undo, and ends with the one line any other Ctrl-C gives, not a traceback of the
import under way. Once the command line is loaded, Ctrl-C is KeyboardInterrupt again and
every command undoes what it did (see cli.run).
"""

import os
import signal


def _interrupted_while_starting(_signum, _frame):
    os.write(2, b"nftrace: interrupted\n")
    os._exit(130)


def main() -> None:
    # SIGINT may be ignored (a background job of a script): then it stays ignored.
    starting = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if starting:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    from .cli import run

    if starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    run()


if __name__ == "__main__":
    main()
