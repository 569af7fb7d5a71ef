"""Exception types Graft raises; every message names the bad value and the fix."""


class GraftError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ConfigError(GraftError):
    """A `params.yaml` key or `--set` override is unknown, mistyped or out of range."""


class DataError(GraftError):
    """The image folder is missing, empty, corrupt or inconsistent."""


class RemoteError(DataError):
    """The DVC remote could not be reached or did not have the files (worth retrying)."""


class ModelError(GraftError):
    """A backbone cannot be built or its weights cannot be loaded."""


class TrainingError(GraftError):
    """Training diverged or could not start."""


class ExportError(GraftError):
    """The ONNX export failed its checks or its parity gate."""


class RegistryError(GraftError):
    """The model registry refused an operation or holds something unexpected."""
