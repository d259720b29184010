"""adbench's exceptions. Library code raises these; only ``adbench.cli`` turns them into one-line messages."""


class AdbenchError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ConfigError(AdbenchError):
    """An unknown name, a bad option value or an unknown config field."""


class DatasetError(AdbenchError):
    """Missing data root, wrong layout, unreadable image, missing or mismatched mask, empty split."""


class TrainingError(AdbenchError):
    """Training diverged (NaN/inf loss) or could not run."""


class DownloadError(AdbenchError):
    """A dataset could not be downloaded or verified."""
