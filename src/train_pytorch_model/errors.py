"""Every error a user can meet, in one place.

Each class is a user-facing failure: the CLI prints ``<ClassName>: <message>`` as the last
line of stderr and exits with ``exit_code``. Messages name the file, row or value at fault
and say how to fix it. Values from inputs are quoted with ``quote`` so that no input can make a
message long or slow to build.
"""

from __future__ import annotations

import reprlib

MAX_MESSAGE_CHARS = 2000  # one stderr line; an input can never make it longer

_quoter = reprlib.Repr()  # (keyword arguments need Python 3.12)
_quoter.maxlevel, _quoter.maxstring, _quoter.maxother = 3, 120, 120
_quoter.maxlist = _quoter.maxtuple = _quoter.maxdict = _quoter.maxset = 8


def quote(value, limit: int = 120) -> str:
    """`repr(value)` for a message, bounded in length and in the work it takes (nested or aliased YAML,
    a 100 MB label): at most a few levels, a few items and `limit` characters."""
    text = _quoter.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TrainPyTorchModelError(Exception):
    """Base class: a failure the user can fix by changing inputs or parameters."""

    exit_code = 1
    # Raised by every process of a distributed job at the same point (a bad checkpoint all read, an agreed stop):
    # nothing to tell the others. Otherwise distributed.teardown tells them, so none is left waiting.
    raised_on_every_rank = False

    def __init__(self, message: str):
        # One line: the CLI's contract is that the last stderr line is the whole error.
        text = " ".join(str(message)[: 2 * MAX_MESSAGE_CHARS].split())
        if len(text) > MAX_MESSAGE_CHARS:
            text = text[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(text)


class InvalidParameterError(TrainPyTorchModelError):
    """A parameter value is out of range (epochs, batch size, learning rate, ...)."""


    def __init__(self, name: str, value, rule: str):
        self.name, self.value = name, value
        super().__init__(f'Parameter "{name}" value {quote(value)} is invalid: {rule}.')


class DirectoryNotFoundError(TrainPyTorchModelError):
    """An input path does not exist or is not a folder."""


class DirectoryEmptyError(TrainPyTorchModelError):
    """An input folder holds nothing."""


class OutputDirectoryError(TrainPyTorchModelError):
    """The output folder cannot be written: not empty, not writable, or a file."""


class TemporaryFolderError(TrainPyTorchModelError):
    """The temporary folder (TMPDIR) cannot hold what a command unpacks there (an archive given to `score`):
    full, over quota or not writable. Not the output's fault."""


class InvalidDatasetError(TrainPyTorchModelError):
    """An ImageDirectory cannot be used for training: bad files, bad rows, bad categories."""



class NotLabeledDatasetError(InvalidDatasetError):
    """An ImageDirectory has no classification labels (e.g. a flat folder of images)."""



class SingleLabelFormatError(InvalidDatasetError):
    """A multi-label run got a dataset whose format holds one label per image (a designer ImageDirectory or
    <class>/<image> folders), or a multi-class run got label lists."""


class ValidationSplitError(InvalidDatasetError):
    """Without validation data, the training data cannot be split: a class has too few images."""


class InvalidModelDirectoryError(TrainPyTorchModelError):
    """A ModelDirectory is missing files, names an unsupported model, or holds foreign weights."""



class InvalidPreprocessingError(InvalidModelDirectoryError, ValueError):
    """A preprocessing recipe out of range (from a damaged or tampered training_info.json, or bad arguments).
    A ValueError too, so model_directory's existing handling of a bad recipe still applies."""


class PretrainedWeightsNotFoundError(InvalidModelDirectoryError):
    """`pretrained: true` but no ImageNet weights are available without the network."""



class WeightsHashMismatchError(InvalidModelDirectoryError):
    """A downloaded weights file does not have the sha256 its file name promises."""


class CheckpointMismatchError(TrainPyTorchModelError):
    """A resume checkpoint was written for other inputs (other classes or model)."""


class CheckpointWriteError(OutputDirectoryError):
    """The file system refused a checkpoint (disk full, quota): logged as a warning, training goes on."""


class CommandInterruptedError(TrainPyTorchModelError):
    """SIGTERM stopped a command (preemption, a cancelled job); nothing was written: run it again."""

    exit_code = 143  # 128 + SIGTERM, as if the signal had ended the process: never mistaken for success


class TrainingInterruptedError(CommandInterruptedError):
    """SIGTERM stopped training; the command can be run again to resume from the last checkpoint."""


class ModuleOutOfMemoryError(TrainPyTorchModelError):
    """Host or GPU memory ran out; the message carries the batch-size hint."""



class TrainingFailedError(TrainPyTorchModelError):
    """Training broke for a reason that is not the input's fault (a crashed worker, a dead peer)."""




class TrainingDivergedError(TrainPyTorchModelError):
    """The loss or the weights became NaN/infinite: no model is written (lower the learning rate)."""


class ExportError(TrainPyTorchModelError):
    """A model could not be exported, its export dependencies are missing, or the exported file does not
    reproduce the PyTorch model's probabilities."""


class ComponentSpecError(TrainPyTorchModelError):
    """A component YAML or a binding given to the local component runner is wrong."""


class UsageError(TrainPyTorchModelError):
    """The command line itself is wrong: an unknown flag, a missing one, a value of the wrong type."""

    exit_code = 2  # the usual exit status of a command-line usage error


class UnexpectedError(TrainPyTorchModelError):
    """Anything we did not foresee. The traceback is printed above the one-line error."""
