from integrations.common import run_command

from .cli import PROG, main

if __name__ == "__main__":
    # ValueError: bad arguments or data (one line, exit 1); RunInterrupted: 130 / 143 without a traceback
    raise SystemExit(run_command(main, PROG, errors=(ValueError,)))
