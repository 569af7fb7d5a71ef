"""Every exception type Graft raises; every message names the bad value and the fix.
"""

from __future__ import annotations


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


class WeightsError(ModelError):
    """A backbone's weights file is missing, could not be downloaded, or failed its checksum."""


class TrainingError(GraftError):
    """Training diverged or could not start."""


class ExportError(GraftError):
    """The ONNX export failed its checks or its parity gate."""


class RegistryError(GraftError):
    """The model registry refused an operation or holds something unexpected."""


class DiskFullError(GraftError):
    """A file could not be written because the disk (or the process's file-size limit) is full."""


class BundleError(GraftError):
    """A deploy bundle is incomplete, altered, or cannot be written where asked."""


class CalibrationError(GraftError):
    """Temperature scaling cannot be fitted on the validation data given."""


class PromotionError(RegistryError):
    """A version may not become champion, or there is nothing to roll back to."""


class TrackingAuthError(RegistryError):
    """The MLflow server refused who we are (HTTP 401) or what we may do (HTTP 403)."""


class TrackingStoreError(RegistryError):
    """There is no MLflow store to read from here, or it cannot be opened (never created by accident)."""


class UnsafeModelError(GraftError):
    """An ONNX file refers to data outside its own folder."""


class IntegrityError(GraftError):
    """A model file is not what registration recorded: its sha256 differs, or no digest was recorded to check it by."""


class SignatureError(IntegrityError):
    """A model is unsigned or wrongly signed while verification is on, or a signing or verification key is unusable."""


class UntrustedSourceError(IntegrityError):
    """A model version's source lies outside the artifact folder of its own run (the CVE-2023-1177 family)."""


class VariantError(ExportError):
    """A variant could not be built (the fp32 model is unaffected)."""


class RequestProblem(Exception):
    """A request `graft serve` refuses, with its HTTP status and a plain-words reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class OrchestrationError(GraftError):
    """Prefect's API could not be started or reached (its home folder, its database, its address)."""


def error_text(exc: BaseException) -> str:
    """An error in the words a user reads: a GraftError's own message (it names the value and the fix), else its type
    and message."""
    return str(exc) if isinstance(exc, GraftError) else f"{type(exc).__name__}: {exc}"
