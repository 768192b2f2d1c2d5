import sys

from .preemption import Terminated, command_interrupted, install_early_handler

install_early_handler()  # first: a SIGTERM while the modules (torch) are imported still ends with a named error
try:
    from .cli import main
except Terminated:
    error = command_interrupted()
    print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
    sys.exit(error.exit_code)

sys.exit(main())
