import sys

from .preemption import install_early_handler

install_early_handler()  # first: a SIGTERM while torch is imported still ends with a named error

from .cli import main  # noqa: E402

sys.exit(main())
