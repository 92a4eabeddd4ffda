"""The ``alcs`` sub-commands: argument parsing and printing only; the work is done by the library modules."""
from . import compile, device, flow, profile, prune, run, tune  # noqa: A004 - named after the commands

#: in the order ``alcs --help`` lists them
COMMANDS = (compile, run, device, profile, tune, prune, flow)
