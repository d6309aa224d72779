import sys

from integrations.common import run_command

from .cli import PROG, main

if __name__ == "__main__":
    sys.exit(run_command(main, PROG))
