"""``python -m vtc SUBCOMMAND [ARGS...]``: the ``vtc`` command (see :mod:`vtc.cli`)."""
from vtc.cli import main

if __name__ == "__main__":
    main()
