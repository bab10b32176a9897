"""The one error type for bad user input.

Every check of user input (flags, files, shapes, Hessians, dimensions) raises
`UserInputError` with a message that names the problem and the fix. The
command-line entry points turn it into one log line and exit status 2.
"""
import sys

import glog


class UserInputError(ValueError):
    """Bad input from the user; the message names the problem and the fix."""


def run_cli(main, argv=None):
    """Run `main(argv)`; a UserInputError becomes one error line and exit 2."""
    try:
        return main(argv)
    except UserInputError as err:
        glog.error(str(err))
        sys.exit(2)
