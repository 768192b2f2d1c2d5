"""Every error a user can meet, in one place.

Each class is a user-facing failure: the CLI prints ``<ClassName>: <message>`` as the last
line of stderr and exits with ``exit_code``. Messages name the file, row or value at fault
and say how to fix it. ``legacy_code`` is the error code the original designer module used
for the same condition, kept so Azure ML dashboards that group by it keep working.
"""

from __future__ import annotations


class TrainPyTorchModelError(Exception):
    """Base class: a failure the user can fix by changing inputs or parameters."""

    exit_code = 1
    legacy_code = 2000  # designer's generic UserError

    def __init__(self, message: str):
        # One line: the CLI's contract is that the last stderr line is the whole error.
        super().__init__(" ".join(str(message).split()))


class InvalidParameterError(TrainPyTorchModelError):
    """A parameter value is out of range (epochs, batch size, learning rate, ...)."""

    legacy_code = 5

    def __init__(self, name: str, value, rule: str):
        self.name, self.value = name, value
        super().__init__(f'Parameter "{name}" value {value!r} is invalid: {rule}.')


class DirectoryNotFoundError(TrainPyTorchModelError):
    """An input path does not exist or is not a folder."""


class DirectoryEmptyError(TrainPyTorchModelError):
    """An input folder holds nothing."""


class OutputDirectoryError(TrainPyTorchModelError):
    """The output folder cannot be written: not empty, not writable, or a file."""


class InvalidDatasetError(TrainPyTorchModelError):
    """An ImageDirectory cannot be used for training: bad files, bad rows, bad categories."""

    legacy_code = 18


class NotLabeledDatasetError(InvalidDatasetError):
    """An ImageDirectory has no classification labels (e.g. a flat folder of images)."""

    legacy_code = 24


class InvalidModelDirectoryError(TrainPyTorchModelError):
    """A ModelDirectory is missing files, names an unsupported model, or holds foreign weights."""

    legacy_code = 159


class PretrainedWeightsNotFoundError(InvalidModelDirectoryError):
    """`pretrained: true` but no ImageNet weights are available without the network."""

    legacy_code = 162


class CheckpointMismatchError(TrainPyTorchModelError):
    """A resume checkpoint was written for other inputs (other classes or model)."""


class TrainingInterruptedError(TrainPyTorchModelError):
    """SIGTERM stopped training; the command can be run again to resume from the last checkpoint."""

    exit_code = 143  # 128 + SIGTERM, as if the signal had ended the process: never mistaken for success
    all_ranks = True  # every rank raises it at the same step: nothing to tell the others


class ModuleOutOfMemoryError(TrainPyTorchModelError):
    """Host or GPU memory ran out; the message carries the batch-size hint."""

    legacy_code = 138


class TrainingFailedError(TrainPyTorchModelError):
    """Training broke for a reason that is not the input's fault (a crashed worker, a dead peer)."""

    legacy_code = 1000


class TimeoutOccurredError(TrainingFailedError):
    """A distributed peer stopped answering."""

    legacy_code = 72


class ComponentSpecError(TrainPyTorchModelError):
    """A component YAML or a binding given to the local component runner is wrong."""


class UsageError(TrainPyTorchModelError):
    """The command line itself is wrong: an unknown flag, a missing one, a value of the wrong type."""

    exit_code = 2  # the usual exit status of a command-line usage error


class UnexpectedError(TrainPyTorchModelError):
    """Anything we did not foresee. The traceback is printed above the one-line error."""

    legacy_code = 1000  # the original's LibraryExceptionError
