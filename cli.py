"""What every script shares on the command line: bad input is one line and exit code 2.

A script raises UserError for anything the user can fix (a bad argument, a missing file, a
config value out of range); run_cli turns it into `error: ...` on stderr, with no traceback.
"""

import argparse
import os
import sys


class UserError(Exception):
    """Bad input from the user: one line on stderr, exit code 2, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are bad input like any other: one line, exit 2 (via run_cli)."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def run_cli(main) -> None:
    """Run a script's main(): a UserError becomes `error: ...` and exit 2; Ctrl-C exits 130 quietly."""
    try:
        main()
    except UserError as e:
        print("error:", " ".join(str(e).splitlines()), file=sys.stderr)  # one line, whatever e holds
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # `... | head` closed stdout: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
